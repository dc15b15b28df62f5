"""Evaluation metrics for semantic segmentation, depth and surface normals, and Delta_MTL.

Batch functions (`semantic_stats`, `depth_stats`, `normal_stats`) are pure jax.numpy, jit
friendly (static shapes, no branching on values, no host sync) and take NHWC arrays. They
return a dict of float32 sums and counts, so results from several batches or devices combine
with `add_stats` (a tree-wise sum) and are turned into final numbers only once, on the host,
by `semantic_metrics`, `depth_metrics` and `normal_metrics`. Every batch function takes an
optional `example_mask` of shape (B,) (1.0 = real example, 0.0 = padding in a padded last
eval batch); padded examples contribute nothing to any sum or count.

Differences from the MTAN reference (lorenmt/mtan, `utils.py`), all deliberate:
  * Depth and normal errors are pooled over all valid pixels of the evaluation set (sum /
    count). The reference averages per-batch means, which weights batches with few valid
    pixels as much as full ones and depends on the batch size.
  * The normal median comes from a 0.01 degree histogram of the whole evaluation set; the
    reference averages per-batch `np.median`s.
  * mIoU ignores classes that occur neither in the targets nor in the predictions; the
    reference gets NaN for them and `torch.mean` propagates it.

Sums are float32 (so that they add up under `jax.tree.map`): counts are exact up to 2**24
per batch and the accumulated totals have a relative error of about 1e-7 per addition,
far below the precision at which these metrics are reported.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Histogram of normal angles over [0, 180] degrees in bins of 0.01 degree.
NORMAL_HIST_BINS = 18000
NORMAL_HIST_BIN_WIDTH = 180.0 / NORMAL_HIST_BINS

# Angle thresholds (degrees) of the standard surface-normal accuracy metrics.
_NORMAL_THRESHOLDS = (('11_25', 11.25), ('22_5', 22.5), ('30', 30.0))

HIGHER_IS_BETTER = {
    'miou': True,
    'pix_acc': True,
    'abs_err': False,
    'rel_err': False,
    'mean': False,
    'median': False,
    'within_11_25': True,
    'within_22_5': True,
    'within_30': True,
    'fg_f1': True,
    # Image-level tasks (mtan_jax.image_tasks).
    'acc': True,
    'mse_px': False,
    'l2_px': False,
    'iou': True,
    # Self-supervised tasks (mtan_jax.auxiliary_tasks).
    'l1': False,
    'f1': True,
    'mse': False,
    'psnr': True,
}


def _apply_example_mask(pixel_mask, example_mask):
  """Removes the pixels of padded examples from a per-pixel validity mask.

  Args:
    pixel_mask: bool (B, H, W), True where the pixel counts.
    example_mask: optional (B,) array, non-zero for real examples; None keeps all.

  Returns:
    bool (B, H, W) mask.
  """
  if example_mask is None:
    return pixel_mask
  real = jnp.asarray(example_mask) != 0
  return pixel_mask & real[:, None, None]


def _masked_sum(mask, values):
  """Float32 sum of `values` where `mask`; `where` (not a product) so NaN/Inf can't leak."""
  return jnp.sum(jnp.where(mask, values, 0.0), dtype=jnp.float32)


def _count(mask):
  return jnp.sum(mask, dtype=jnp.float32)


def ratio(numerator, denominator):
  """numerator / denominator as a Python float, NaN when nothing was counted."""
  numerator = float(numerator)
  denominator = float(denominator)
  return numerator / denominator if denominator != 0 else float('nan')


def semantic_stats(logits_or_logprobs, labels, num_classes, example_mask=None):
  """Confusion matrix and NLL-loss sums for one batch of semantic segmentation.

  The prediction is the argmax over classes, which is the same for logits and
  log-probabilities. The loss is the negative log-likelihood of the input as given, so it
  equals cross-entropy only if the input is log-probabilities (the MTAN reference applies
  `log_softmax` in the network and `F.nll_loss(..., ignore_index=-1)` in the loss).

  Pixels with label < 0 (the ignore label -1) or label >= num_classes are ignored by both
  the confusion matrix and the loss (the reference's `ConfMatrix` ignores both; its
  `nll_loss` only knows -1 and would fail on labels >= num_classes).

  Args:
    logits_or_logprobs: float (B, H, W, C) with C == num_classes; log-probabilities for a
      meaningful loss.
    labels: int (B, H, W) class indices, -1 for ignored pixels.
    num_classes: number of classes C (static).
    example_mask: optional (B,), 1.0 for real examples and 0.0 for padding.

  Returns:
    Dict with 'confusion' (C, C) float32 (row = target class, column = predicted class),
    'loss_sum' (negative log-likelihood summed over valid pixels) and 'loss_count' (number
    of valid pixels), both float32 scalars.

  Raises:
    ValueError: if the class axis of the input is not num_classes.
  """
  if logits_or_logprobs.shape[-1] != num_classes:
    raise ValueError(
        f'semantic_stats: expected {num_classes} classes in the last axis, got shape '
        f'{logits_or_logprobs.shape}')
  log_probs = jnp.asarray(logits_or_logprobs, jnp.float32)
  labels = jnp.asarray(labels)
  valid = _apply_example_mask((labels >= 0) & (labels < num_classes), example_mask)

  # one_hot gives all-zero rows for out-of-range labels, so only the example/validity mask
  # has to be applied on top.
  target_1h = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_) & valid[..., None]
  pred_1h = jax.nn.one_hot(jnp.argmax(log_probs, axis=-1), num_classes, dtype=jnp.float32)
  # A matmul of one-hots instead of a scatter/bincount: deterministic, dense and cheap for
  # the few classes of dense-prediction datasets. 0/1 inputs are exact in any matmul
  # precision (bf16/tf32 passes included) and the accumulation is float32.
  confusion = jnp.einsum(
      'nt,np->tp',
      target_1h.reshape(-1, num_classes).astype(jnp.float32),
      pred_1h.reshape(-1, num_classes),
      preferred_element_type=jnp.float32)

  # Select with `where` rather than multiply by the one-hot: log_softmax may give -inf for
  # non-target classes and 0 * -inf would be NaN.
  target_log_prob = jnp.sum(jnp.where(target_1h, log_probs, 0.0), axis=-1)
  return {
      'confusion': confusion,
      'loss_sum': -_masked_sum(valid, target_log_prob),
      'loss_count': _count(valid),
  }


def semantic_metrics(stats):
  """Final semantic segmentation metrics from accumulated `semantic_stats`.

  As the MTAN reference's `ConfMatrix`, the metrics come from one confusion matrix over
  the whole evaluation set: IoU_c = diag_c / (row_c + col_c - diag_c) and pixel accuracy =
  trace / total. Unlike the reference, whose IoU is 0/0 = NaN for a class that occurs
  neither in the targets nor in the predictions (and `torch.mean` then makes mIoU NaN),
  mIoU here is the mean over the classes that occur in targets or predictions (nanmean).

  Args:
    stats: dict from `semantic_stats`, possibly summed over batches with `add_stats`.

  Returns:
    Dict of Python floats: 'miou', 'pix_acc' (both fractions in [0, 1]) and 'loss' (mean
    NLL over valid pixels). A quantity with nothing to average over is NaN.
  """
  confusion = np.asarray(stats['confusion'], np.float64)
  diag = np.diag(confusion)
  union = confusion.sum(axis=1) + confusion.sum(axis=0) - diag
  present = union > 0
  miou = float(np.mean(diag[present] / union[present])) if present.any() else float('nan')
  out = {
      'miou': miou,
      'pix_acc': ratio(diag.sum(), confusion.sum()),
      'loss': ratio(stats['loss_sum'], stats['loss_count']),
  }
  if confusion.shape[0] == 2:
    # Binary segmentation (class 1 = foreground): F1 = Dice = 2 TP / (2 TP + FP + FN).
    out['fg_f1'] = ratio(2 * diag[1], confusion[1].sum() + confusion[:, 1].sum())
  return out


def depth_stats(pred, target, example_mask=None):
  """Absolute and relative depth error sums for one batch.

  A pixel is valid where the target is non-zero summed over channels (MTAN reference:
  `binary_mask = sum(target, channels) != 0`). Errors are summed over channels and
  counted per valid pixel, as the reference does for its single depth channel.

  Args:
    pred: float (B, H, W, 1) predicted depth.
    target: float (B, H, W, 1) ground-truth depth, 0 where missing.
    example_mask: optional (B,), 1.0 for real examples and 0.0 for padding.

  Returns:
    Dict of float32 scalars: 'abs_sum' (sum of |pred - target|), 'rel_sum' (sum of
    |pred - target| / target) and 'count' (number of valid pixels).
  """
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  valid = _apply_example_mask(jnp.sum(target, axis=-1) != 0, example_mask)

  abs_err = jnp.abs(pred - target)
  # A safe denominator, not only a masked result: with target 0 the division would be Inf
  # and its gradient NaN, which `where` alone does not stop in the backward pass.
  safe_target = jnp.where(target != 0, target, 1.0)
  rel_err = abs_err / safe_target
  return {
      'abs_sum': _masked_sum(valid, jnp.sum(abs_err, axis=-1)),
      'rel_sum': _masked_sum(valid, jnp.sum(rel_err, axis=-1)),
      'count': _count(valid),
  }


def depth_metrics(stats):
  """Final depth metrics from accumulated `depth_stats`.

  Args:
    stats: dict from `depth_stats`, possibly summed over batches with `add_stats`.

  Returns:
    Dict of Python floats: 'abs_err' and 'rel_err' (means over all valid pixels) and
    'loss', the L1 training loss, which is the same number as 'abs_err'. NaN if no pixel
    was valid.
  """
  abs_err = ratio(stats['abs_sum'], stats['count'])
  return {
      'abs_err': abs_err,
      'rel_err': ratio(stats['rel_sum'], stats['count']),
      'loss': abs_err,
  }


def normal_stats(pred, target, example_mask=None):
  """Angular error sums, threshold counts and an angle histogram for one batch of normals.

  A pixel is valid where the target is non-zero summed over channels (as the MTAN
  reference). The angle is degrees(arccos(clip(<pred, target>, -1, 1))) without
  normalising either vector, exactly as the reference. Only 'dot_sum' is meant to be
  differentiated (the loss); arccos has an infinite slope at +-1.

  Args:
    pred: float (B, H, W, 3) predicted unit normals.
    target: float (B, H, W, 3) ground-truth unit normals, 0 where missing.
    example_mask: optional (B,), 1.0 for real examples and 0.0 for padding.

  Returns:
    Dict of float32 arrays: 'angle_sum' (degrees), 'count' (valid pixels), 'under_11_25',
    'under_22_5', 'under_30' (valid pixels with angle strictly below the threshold),
    'dot_sum' (sum of <pred, target>) and 'hist' (NORMAL_HIST_BINS,) counts of angles in
    bins of NORMAL_HIST_BIN_WIDTH degrees over [0, 180], 180 falling in the last bin.
  """
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  valid = _apply_example_mask(jnp.sum(target, axis=-1) != 0, example_mask)

  dot = jnp.sum(pred * target, axis=-1)
  # Invalid pixels get dot 0 (90 degrees) so that arccos stays finite there in both passes.
  safe_dot = jnp.where(valid, dot, 0.0)
  angle = jnp.degrees(jnp.arccos(jnp.clip(safe_dot, -1.0, 1.0)))

  # A one-hot over 18000 bins per pixel would need pixels x 18000 floats (gigabytes for a
  # batch), and a scatter-free sort + searchsorted was ~10x slower than bincount on CPU.
  # bincount with a static length is a scatter-add of int32 ones: integer atomic adds are
  # exact and order independent, so the result is deterministic on any device.
  bins = jnp.clip(
      jnp.floor(angle / NORMAL_HIST_BIN_WIDTH).astype(jnp.int32), 0, NORMAL_HIST_BINS - 1)
  hist = jnp.bincount(
      jnp.where(valid, bins, 0).reshape(-1),
      weights=valid.astype(jnp.int32).reshape(-1),
      length=NORMAL_HIST_BINS)

  stats = {
      'angle_sum': _masked_sum(valid, angle),
      'count': _count(valid),
      'dot_sum': _masked_sum(valid, dot),
      'hist': hist.astype(jnp.float32),
  }
  for name, threshold in _NORMAL_THRESHOLDS:
    stats[f'under_{name}'] = _count(valid & (angle < threshold))
  return stats


def normal_metrics(stats):
  """Final surface-normal metrics from accumulated `normal_stats`.

  The median is the centre of the first histogram bin at which the cumulative count
  reaches half of all valid pixels, so it is within one bin (0.01 degree) of the exact
  median of the pooled evaluation set. The MTAN reference instead averages the per-batch
  `np.median`s, which depends on the batch size.

  Args:
    stats: dict from `normal_stats`, possibly summed over batches with `add_stats`.

  Returns:
    Dict of Python floats: 'mean' and 'median' angular error in degrees, 'within_11_25',
    'within_22_5', 'within_30' (fractions of valid pixels in [0, 1]) and 'loss'
    (1 - mean dot product, the MTAN training loss). NaN if no pixel was valid.
  """
  count = float(stats['count'])
  hist = np.asarray(stats['hist'], np.float64)
  if hist.sum() > 0:
    first = int(np.argmax(np.cumsum(hist) >= hist.sum() / 2))
    median = (first + 0.5) * NORMAL_HIST_BIN_WIDTH
  else:
    median = float('nan')
  metrics = {
      'mean': ratio(stats['angle_sum'], count),
      'median': median,
      'loss': 1.0 - ratio(stats['dot_sum'], count),
  }
  for name, _ in _NORMAL_THRESHOLDS:
    metrics[f'within_{name}'] = ratio(stats[f'under_{name}'], count)
  return metrics


def _relative_changes(results, baselines, higher_is_better):
  """Signed relative changes (N - B) / B, positive meaning the model beats the baseline.

  Args:
    results: results[task][metric] of the evaluated (multi-task) model.
    baselines: baselines[task][metric] of the single-task baselines; defines which
      metrics count.
    higher_is_better: higher_is_better[task][metric]; None looks the metric name up in
      HIGHER_IS_BETTER.

  Returns:
    Dict task -> list of improvements, one per baseline metric, tasks without baseline
    metrics left out.

  Raises:
    KeyError: a baseline metric is missing in results or in higher_is_better.
    ValueError: a baseline value is 0.
  """
  changes = {}
  for task, task_baselines in baselines.items():
    task_changes = []
    for metric, baseline in task_baselines.items():
      name = f'{task}/{metric}'
      if task not in results or metric not in results[task]:
        raise KeyError(f'metric {name} is in baselines but missing in results')
      if higher_is_better is None:
        if metric not in HIGHER_IS_BETTER:
          raise KeyError(f'metric {name} has no entry in HIGHER_IS_BETTER')
        higher = HIGHER_IS_BETTER[metric]
      elif task not in higher_is_better or metric not in higher_is_better[task]:
        raise KeyError(f'metric {name} is missing in higher_is_better')
      else:
        higher = higher_is_better[task][metric]
      if baseline == 0:
        raise ValueError(f'baseline of metric {name} is 0; relative change undefined')
      change = (float(results[task][metric]) - float(baseline)) / float(baseline)
      task_changes.append(change if higher else -change)
    if task_changes:
      changes[task] = task_changes
  return changes


def delta_mtl_libmtl(
    results: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]] | None = None,
) -> float:
  """Delta_MTL in the LibMTL convention: averaged per task, HIGHER is better.

  Delta = 100 / T * sum_t 1 / M_t * sum_m (-1)^w_{t,m} (B_{t,m} - N_{t,m}) / B_{t,m},
  with N the evaluated multi-task model (`results`), B the single-task baseline
  (`baselines`) and w = 1 if higher is better for that metric, else 0. Each term is the
  relative improvement over the baseline, so a positive Delta means the multi-task model
  is better, and every task weighs the same regardless of its number of metrics. Only
  metrics present in `baselines` count (T and M_t included).

  Args:
    results: results[task][metric] of the multi-task model.
    baselines: baselines[task][metric] of the single-task models.
    higher_is_better: higher_is_better[task][metric]; None looks each metric name up in
      HIGHER_IS_BETTER.

  Returns:
    Delta_MTL in percent.

  Raises:
    KeyError: naming a baseline metric missing in results or in higher_is_better.
    ValueError: a baseline value is 0, or baselines has no metric at all.
  """
  changes = _relative_changes(results, baselines, higher_is_better)
  if not changes:
    raise ValueError('delta_mtl_libmtl: baselines contain no metric')
  return 100.0 * float(np.mean([np.mean(task) for task in changes.values()]))


def delta_m(
    results: Mapping[str, Mapping[str, float]],
    baselines: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, Mapping[str, bool]] | None = None,
) -> float:
  """Delta_m in the Nash-MTL / CAGrad / FAMO convention: flat over metrics, LOWER is better.

  Delta_m = 100 / M * sum_m (-1)^d_m (M_m - M_stl,m) / M_stl,m over all M metrics of all
  tasks pooled together, with M_m the evaluated model (`results`), M_stl,m the single-task
  baseline (`baselines`) and d = 1 if higher is better for that metric, else 0. Each term
  is the relative degradation, so a negative Delta_m means the multi-task model is better.
  It is the negated LibMTL value only when every task has the same number of metrics.
  Only metrics present in `baselines` count (M included).

  Args:
    results: results[task][metric] of the multi-task model.
    baselines: baselines[task][metric] of the single-task models.
    higher_is_better: higher_is_better[task][metric]; None looks each metric name up in
      HIGHER_IS_BETTER.

  Returns:
    Delta_m in percent.

  Raises:
    KeyError: naming a baseline metric missing in results or in higher_is_better.
    ValueError: a baseline value is 0, or baselines has no metric at all.
  """
  changes = _relative_changes(results, baselines, higher_is_better)
  if not changes:
    raise ValueError('delta_m: baselines contain no metric')
  return -100.0 * float(np.mean([c for task in changes.values() for c in task]))


def add_stats(a, b):
  """Sums two stats dicts (or any matching pytrees) leaf by leaf, e.g. across batches."""
  return jax.tree.map(jnp.add, a, b)


def zeros_like_stats(stats):
  """A stats dict of the same structure, shapes and dtypes filled with zeros."""
  return jax.tree.map(jnp.zeros_like, stats)
