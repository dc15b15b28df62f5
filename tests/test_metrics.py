"""Tests for mtan_jax.metrics against hand-computed cases and numpy reimplementations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax import metrics


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _reference_conf_matrix(pred, target, n):
  """numpy port of the MTAN reference ConfMatrix.update / get_metrics."""
  k = (target >= 0) & (target < n)
  inds = n * target[k].astype(np.int64) + pred[k]
  mat = np.bincount(inds, minlength=n**2).reshape(n, n).astype(np.float64)
  acc = np.diag(mat).sum() / mat.sum()
  with np.errstate(invalid='ignore'):  # 0/0 -> NaN for absent classes, as in torch
    iu = np.diag(mat) / (mat.sum(1) + mat.sum(0) - np.diag(mat))
  return mat, np.mean(iu), acc


def _random_semantic(seed, batch=4, size=6, classes=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, size, size, classes)).astype(np.float32)
  labels = rng.integers(0, classes, size=(batch, size, size))
  # Ignored pixels: the ignore label -1 and labels beyond the class range.
  labels[rng.random(labels.shape) < 0.15] = -1
  labels[rng.random(labels.shape) < 0.05] = classes + 2
  return _log_softmax(logits), labels


def _unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _assert_stats_close(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-5, atol=1e-5,
                               err_msg=key)


# --- semantic ---------------------------------------------------------------------------


def test_confusion_matrix_hand_case():
  # Predictions as one-hot scores (argmax is what counts); labels with -1 and 3 >= C.
  pred = np.array([[[0, 2], [2, 1]], [[1, 1], [0, 0]]])
  labels = np.array([[[0, 1], [2, -1]], [[1, 3], [2, 0]]])
  scores = np.eye(3, dtype=np.float32)[pred]
  stats = metrics.semantic_stats(scores, labels, 3)
  expected = np.zeros((3, 3))
  expected[0, 0] = 2  # (0,0) in both images
  expected[1, 2] = 1  # image 0: target 1 predicted 2
  expected[2, 2] = 1
  expected[1, 1] = 1  # image 1: target 1 predicted 1
  expected[2, 0] = 1
  np.testing.assert_array_equal(np.asarray(stats['confusion']), expected)
  assert stats['confusion'].dtype == jnp.float32
  assert float(stats['loss_count']) == 6

  result = metrics.semantic_metrics(stats)
  assert result['pix_acc'] == pytest.approx(4 / 6)
  # IoU = diag / (row + col - diag): class 0: 2/(2+3-2); class 1: 1/(2+1-1); class 2:
  # 1/(2+2-1).
  assert result['miou'] == pytest.approx(np.mean([2 / 3, 1 / 2, 1 / 3]))


def test_semantic_metrics_match_reference_conf_matrix():
  log_probs, labels = _random_semantic(0)
  stats = metrics.semantic_stats(log_probs, labels, 5)
  mat, miou, acc = _reference_conf_matrix(log_probs.argmax(-1), labels, 5)
  np.testing.assert_array_equal(np.asarray(stats['confusion']), mat)
  result = metrics.semantic_metrics(stats)
  assert result['miou'] == pytest.approx(miou, rel=1e-6)
  assert result['pix_acc'] == pytest.approx(acc, rel=1e-6)


def test_nll_loss_ignores_invalid_labels():
  log_probs, labels = _random_semantic(1)
  stats = metrics.semantic_stats(log_probs, labels, 5)
  valid = (labels >= 0) & (labels < 5)
  picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
  expected = -picked[valid].astype(np.float64).mean()
  assert float(stats['loss_count']) == valid.sum()
  assert metrics.semantic_metrics(stats)['loss'] == pytest.approx(expected, rel=1e-5)


def test_nll_loss_with_minus_inf_log_probs_is_finite():
  log_probs = np.array([[[[0.0, -np.inf], [-np.inf, 0.0]]]], np.float32)
  stats = metrics.semantic_stats(log_probs, np.array([[[0, 1]]]), 2)
  assert float(stats['loss_sum']) == 0.0


def test_miou_skips_classes_absent_from_target_and_prediction():
  # Class 2 never occurs: the reference gives NaN, here it is left out of the mean.
  scores = np.eye(3, dtype=np.float32)[np.array([[[0, 1], [1, 1]]])]
  labels = np.array([[[0, 1], [0, 1]]])
  mat, reference_miou, _ = _reference_conf_matrix(scores.argmax(-1), labels, 3)
  assert np.isnan(reference_miou)
  result = metrics.semantic_metrics(metrics.semantic_stats(scores, labels, 3))
  assert result['miou'] == pytest.approx(np.mean([1 / 2, 2 / 3]))


def test_semantic_padded_examples_contribute_nothing():
  log_probs, labels = _random_semantic(2, batch=3)
  garbage = log_probs.copy()
  garbage[2] = np.nan
  mask = np.array([1.0, 1.0, 0.0], np.float32)
  padded = metrics.semantic_stats(garbage, labels, 5, example_mask=mask)
  _assert_stats_close(padded, metrics.semantic_stats(log_probs[:2], labels[:2], 5))


def test_semantic_halves_add_up_to_whole_batch():
  log_probs, labels = _random_semantic(3)
  whole = metrics.semantic_stats(log_probs, labels, 5)
  halves = metrics.add_stats(metrics.semantic_stats(log_probs[:2], labels[:2], 5),
                             metrics.semantic_stats(log_probs[2:], labels[2:], 5))
  _assert_stats_close(whole, halves)


def test_semantic_rejects_wrong_class_count():
  with pytest.raises(ValueError, match='4 classes'):
    metrics.semantic_stats(np.zeros((1, 2, 2, 3), np.float32), np.zeros((1, 2, 2), int), 4)


# --- depth ------------------------------------------------------------------------------


def test_depth_hand_case_with_invalid_pixels():
  pred = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)[..., None]
  target = np.array([[[2.0, 0.0], [1.0, 4.0]]], np.float32)[..., None]
  stats = metrics.depth_stats(pred, target)
  # Valid pixels: (0,0) |1-2|=1, rel 1/2; (1,0) |3-1|=2, rel 2; (1,1) 0.
  assert float(stats['abs_sum']) == pytest.approx(3.0)
  assert float(stats['rel_sum']) == pytest.approx(2.5)
  assert float(stats['count']) == 3
  result = metrics.depth_metrics(stats)
  assert result['abs_err'] == pytest.approx(1.0)
  assert result['rel_err'] == pytest.approx(2.5 / 3)
  assert result['loss'] == result['abs_err']


def test_depth_gradients_are_finite_and_zero_on_invalid_pixels():
  pred = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)[..., None]
  target = np.array([[[2.0, 0.0], [1.0, 0.0]]], np.float32)[..., None]

  def loss(p, t):
    stats = metrics.depth_stats(p, t)
    return stats['rel_sum'] + stats['abs_sum']

  grad_pred, grad_target = jax.grad(loss, argnums=(0, 1))(pred, target)
  assert np.all(np.isfinite(grad_pred)) and np.all(np.isfinite(grad_target))
  assert grad_pred[0, 0, 1, 0] == 0 and grad_pred[0, 1, 1, 0] == 0
  # d/dp (|p-t| + |p-t|/t) at p < t is -(1 + 1/t).
  assert grad_pred[0, 0, 0, 0] == pytest.approx(-1.5)


def test_depth_padded_examples_and_halves():
  rng = np.random.default_rng(4)
  pred = rng.random((4, 3, 3, 1)).astype(np.float32)
  target = rng.random((4, 3, 3, 1)).astype(np.float32) * (rng.random((4, 3, 3, 1)) > 0.3)
  garbage = pred.copy()
  garbage[3] = np.inf
  padded = metrics.depth_stats(garbage, target, example_mask=np.array([1.0, 1.0, 1.0, 0.0]))
  _assert_stats_close(padded, metrics.depth_stats(pred[:3], target[:3]))
  halves = metrics.add_stats(metrics.depth_stats(pred[:1], target[:1]),
                             metrics.depth_stats(pred[1:], target[1:]))
  _assert_stats_close(halves, metrics.depth_stats(pred, target))


# --- normals ----------------------------------------------------------------------------


def _known_normals():
  """One image of 2x3 pixels: angles 0, 90, 180, 10 degrees and two invalid pixels."""
  up = [0.0, 0.0, 1.0]
  ten = np.radians(10.0)
  pred = [[up, [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]],
          [[np.sin(ten), 0.0, np.cos(ten)], [1.0, 0.0, 0.0], up]]
  target = [[up, up, up], [up, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
  return np.array([pred], np.float32), np.array([target], np.float32)


def test_normal_angles_for_known_vectors():
  pred, target = _known_normals()
  stats = metrics.normal_stats(pred, target)
  assert float(stats['count']) == 4
  assert float(stats['angle_sum']) == pytest.approx(280.0, abs=1e-3)
  assert float(stats['dot_sum']) == pytest.approx(np.cos(np.radians(10.0)), abs=1e-6)
  for name in ('under_11_25', 'under_22_5', 'under_30'):
    assert float(stats[name]) == 2
  hist = np.asarray(stats['hist'])
  assert hist.shape == (metrics.NORMAL_HIST_BINS,) and hist.sum() == 4
  assert hist[0] == 1 and hist[9000] == 1 and hist[-1] == 1  # 180 goes to the last bin
  assert hist[999:1001].sum() == 1  # 10 degrees up to float32 rounding

  result = metrics.normal_metrics(stats)
  assert result['mean'] == pytest.approx(70.0, abs=1e-3)
  assert result['within_11_25'] == result['within_22_5'] == result['within_30'] == 0.5
  assert result['loss'] == pytest.approx(1 - np.cos(np.radians(10.0)) / 4, abs=1e-6)


def test_normal_median_hand_case():
  pred, target = _known_normals()
  # Drop the 180 degree pixel: angles 0, 10, 90 have median 10.
  target[0, 0, 2] = 0.0
  result = metrics.normal_metrics(metrics.normal_stats(pred, target))
  assert result['median'] == pytest.approx(10.0, abs=0.01)


def _random_normals(seed, shape=(3, 33, 33)):
  rng = np.random.default_rng(seed)
  target = _unit(rng.normal(size=shape + (3,)))
  pred = _unit(target + rng.normal(scale=0.6, size=shape + (3,)))
  target[0, 0, :2] = 0.0  # two invalid pixels keep the valid count odd
  return pred.astype(np.float32), target.astype(np.float32)


def _numpy_angles(pred, target):
  valid = target.sum(-1) != 0
  dot = (pred.astype(np.float64) * target).sum(-1)[valid]
  return np.degrees(np.arccos(np.clip(dot, -1, 1))), dot


def test_normal_metrics_match_numpy_on_random_data():
  pred, target = _random_normals(5)
  angles, dot = _numpy_angles(pred, target)
  assert angles.size % 2 == 1
  result = metrics.normal_metrics(metrics.normal_stats(pred, target))
  assert abs(result['median'] - np.median(angles)) <= 0.01
  assert result['mean'] == pytest.approx(angles.mean(), abs=1e-3)
  assert result['within_11_25'] == pytest.approx(np.mean(angles < 11.25))
  assert result['within_22_5'] == pytest.approx(np.mean(angles < 22.5))
  assert result['within_30'] == pytest.approx(np.mean(angles < 30))
  assert result['loss'] == pytest.approx(1 - dot.mean(), abs=1e-5)


def test_normal_accumulated_median_is_pooled_median():
  pred, target = _random_normals(6)
  whole = metrics.normal_stats(pred, target)
  halves = metrics.add_stats(metrics.normal_stats(pred[:1], target[:1]),
                             metrics.normal_stats(pred[1:], target[1:]))
  _assert_stats_close(whole, halves)
  angles, _ = _numpy_angles(pred, target)
  assert abs(metrics.normal_metrics(halves)['median'] - np.median(angles)) <= 0.01


def test_normal_padded_examples_contribute_nothing():
  pred, target = _random_normals(7)
  garbage = pred.copy()
  garbage[1] = np.nan
  padded = metrics.normal_stats(garbage, target, example_mask=np.array([1.0, 0.0, 1.0]))
  expected = metrics.normal_stats(pred[[0, 2]], target[[0, 2]])
  _assert_stats_close(padded, expected)


def test_normal_loss_gradient_is_finite():
  pred, target = _known_normals()
  grad = jax.grad(lambda p: metrics.normal_stats(p, target)['dot_sum'])(pred)
  np.testing.assert_array_equal(np.asarray(grad), target)


# --- Delta_MTL --------------------------------------------------------------------------

_HAND_BASELINES = {'a': {'x': 100.0, 'y': 1.0}, 'b': {'z': 1.0}}
_HAND_RESULTS = {'a': {'x': 110.0, 'y': 0.9, 'unused': 5.0}, 'b': {'z': 2.0}}
_HAND_HIGHER = {'a': {'x': True, 'y': False}, 'b': {'z': False}}


def test_delta_mtl_libmtl_hand_case():
  # Task a: +10% on both metrics -> 0.10; task b: z doubled, lower is better -> -1.0.
  delta = metrics.delta_mtl_libmtl(_HAND_RESULTS, _HAND_BASELINES, _HAND_HIGHER)
  assert delta == pytest.approx(100 / 2 * (0.10 - 1.0))


def test_delta_m_hand_case():
  # Degradations -0.1, -0.1, +1.0 averaged over the three metrics.
  delta = metrics.delta_m(_HAND_RESULTS, _HAND_BASELINES, _HAND_HIGHER)
  assert delta == pytest.approx(100 / 3 * 0.8)


@pytest.mark.parametrize('fn', [metrics.delta_m, metrics.delta_mtl_libmtl])
def test_delta_missing_result_metric_raises_naming_it(fn):
  results = {'a': {'x': 110.0, 'y': 0.9}, 'b': {}}
  with pytest.raises(KeyError, match='b/z'):
    fn(results, _HAND_BASELINES, _HAND_HIGHER)


_CITYSCAPES_STL = {'semantic': {'miou': 74.01, 'pix_acc': 93.16},
                   'depth': {'abs_err': 0.0125, 'rel_err': 27.77}}


@pytest.mark.parametrize('method, values, published', [
    ('dwa', (75.24, 93.52, 0.0160, 44.37), 21.45),
    ('uncertainty', (72.02, 92.85, 0.0140, 30.13), 5.89),
])
def test_delta_m_published_cityscapes(method, values, published):
  del method  # only names the case
  miou, pix_acc, abs_err, rel_err = values
  results = {'semantic': {'miou': miou, 'pix_acc': pix_acc},
             'depth': {'abs_err': abs_err, 'rel_err': rel_err}}
  higher = {task: {m: metrics.HIGHER_IS_BETTER[m] for m in ms}
            for task, ms in _CITYSCAPES_STL.items()}
  assert metrics.delta_m(results, _CITYSCAPES_STL, higher) == pytest.approx(published, abs=0.05)
  # The default looks the metric names up in HIGHER_IS_BETTER; with two metrics per task
  # the LibMTL value is exactly the negation.
  assert metrics.delta_m(results, _CITYSCAPES_STL) == pytest.approx(published, abs=0.05)
  assert metrics.delta_mtl_libmtl(results, _CITYSCAPES_STL) == pytest.approx(
      -metrics.delta_m(results, _CITYSCAPES_STL))


# --- accumulation and jit ---------------------------------------------------------------


def test_zeros_like_stats_is_identity_for_add():
  pred, target = _random_normals(8, shape=(1, 4, 4))
  stats = metrics.normal_stats(pred, target)
  zeros = metrics.zeros_like_stats(stats)
  assert all(float(jnp.abs(v).sum()) == 0 for v in zeros.values())
  _assert_stats_close(metrics.add_stats(zeros, stats), stats)


def test_all_batch_functions_work_under_jit():
  log_probs, labels = _random_semantic(9)
  pred, target = _random_normals(9, shape=(4, 6, 6))
  depth_pred, depth_target = pred[..., :1] + 1.5, np.abs(target[..., :1])
  mask = np.array([1.0, 1.0, 1.0, 0.0], np.float32)

  semantic = functools.partial(metrics.semantic_stats, num_classes=5)
  cases = [
      (semantic, (log_probs, labels)),
      (metrics.depth_stats, (depth_pred, depth_target)),
      (metrics.normal_stats, (pred, target)),
  ]
  for fn, args in cases:
    eager = fn(*args, example_mask=mask)
    jitted = jax.jit(fn)(*args, example_mask=mask)
    _assert_stats_close(jitted, eager)
    _assert_stats_close(jax.jit(metrics.add_stats)(jitted, eager),
                        metrics.add_stats(eager, eager))
    _assert_stats_close(jax.jit(metrics.zeros_like_stats)(eager),
                        metrics.zeros_like_stats(eager))
