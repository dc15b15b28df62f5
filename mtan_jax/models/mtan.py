"""MTAN: the shared SegNet plus one soft-attention network per task (Liu et al., CVPR 2019).

Per task and encoder level j, a mask is computed from the level's first shared feature
(concatenated with the previous attended feature after level 0) and multiplies the level's
last shared feature; a 3x3 conv shared by all tasks (`encoder_block_att[j]`) and a 2x2
max-pool follow. The decoder mirrors this with x2 bilinear upsampling (align_corners=True),
the shared `decoder_block_att`, and masks over the max-unpooled shared features. Each task
ends in its own prediction head. Attribute names follow the PyTorch reference so that
weights import one to one; heads are `pred_task1`, `pred_task2`, ... in task order.

By default the attention path runs all tasks in lockstep on task-stacked activations
(B, T, H, W, C) (see `MTAN`); `stack_tasks=False` keeps the reference's one-task-at-a-time loop.

Image-level tasks (pet species, head box; not in the reference) attend over the encoder
only: their `ImageHead` reads the task's attended deepest encoder features (after the last
`encoder_block_att` and pool), and they have no decoder masks (`decoder_att[t]` is empty).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtan_jax.errors import ConfigError
from mtan_jax.models.layers import (AttentionMask, ConvLayer, attention_masks,
                                    max_pool, upsample2x_bilinear)
from mtan_jax.models.segnet import (DEFAULT_HEAD_HIDDEN, DEFAULT_WIDTHS, NUM_LEVELS, SegNetBackbone,
                                    SegNetFeatures, make_head)
from mtan_jax.tasks import Task


class MTAN(SegNetBackbone):
  """SegNet-MTAN for any list of dense tasks.

  Call it on images (B, H, W, C_in) to get one prediction (B, H, W, task.channels) per task,
  each passed through its task's output activation. `logsigma` holds one learned log-variance
  per task for uncertainty weighting (initialised to -0.5, as in the reference).

  Two forward passes compute the same function (and the same BatchNorm running-statistics
  updates) from the same parameters and state:

  - `stack_tasks=True` (default): all tasks advance in lockstep on task-stacked activations
    (B, T, H, W, C), the task axis right after the batch axis so that a batch sharded across
    devices stays contiguous per device when (B, T) is merged. The shared attention convs run
    once on (B*T, H, W, C) with per-task BatchNorm statistics, the per-task masks run as
    batched einsums (`layers.attention_masks`), and pooling / upsampling run on the merged
    view. Fewer, larger ops than the loop.
  - `stack_tasks=False`: the reference's order, one task at a time through every level. Kept
    as the reference-order path that tests check the stacked one against, and for A/B timing
    (benchmarks/ab_stack_tasks.py).

  Args:
    tasks: the tasks, in head order.
    widths: channel widths of the five SegNet levels.
    in_channels: input image channels.
    rngs: parameter initialisation keys.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    stack_tasks: run the attention path task-stacked (True) or task by task (False).
    image_size: input (height, width); needed by image-level tasks' heads.
    head_hidden: hidden width of image-level heads.
  """

  # Parameters only one task's loss reaches (per-task masks, heads, log-sigma). The rest (the
  # SegNet and the attention convs all tasks run through) is what gradient-based weighting
  # methods act on (`mtan_jax.steps.shared_mask`).
  TASK_SPECIFIC = ('encoder_att', 'decoder_att', 'pred_task', 'logsigma')

  def __init__(self, tasks: Sequence[Task], widths: Sequence[int] = DEFAULT_WIDTHS,
               in_channels: int = 3, *, rngs: nnx.Rngs, dtype=jnp.float32,
               stack_tasks: bool = True, image_size: Sequence[int] | None = None,
               head_hidden: int = DEFAULT_HEAD_HIDDEN):
    super().__init__(widths, in_channels, rngs=rngs, dtype=dtype)
    if not tasks:
      raise ConfigError('MTAN needs at least one task')
    self.tasks = tuple(tasks)
    self.stack_tasks = bool(stack_tasks)
    f = self.widths
    # Encoder masks: level 0 sees the first shared feature; deeper levels see it concatenated
    # with the previous level's attended feature (which encoder_block_att brought to f[j]).
    self.encoder_att = nnx.List([
        nnx.List([AttentionMask(f[0] if j == 0 else 2 * f[j], f[j], f[j], rngs=rngs, dtype=dtype)
                  for j in range(NUM_LEVELS)])
        for _ in self.tasks])
    # The attention path entering decoder level i is upsampled and brought to dec_att_out[i]
    # channels by decoder_block_att[i]: the next shallower width, except the deepest level, which
    # keeps f[4] (in the reference, decoder_block_att = [f0->f0, f1->f0, f2->f1, f3->f2, f4->f4]).
    dec_out = (f[0],) + f[:-1]
    dec_att_out = dec_out[:-1] + (f[-1],)
    self.decoder_block_att = nnx.List([ConvLayer(f[i], dec_att_out[i], rngs=rngs, dtype=dtype)
                                       for i in range(NUM_LEVELS)])
    # Decoder masks, indexed by level: decoder_att[t][i] sees the unpooled shared feature (f[i])
    # concatenated with the attention path and gates the level's shared decoder output (dec_out[i]).
    self.decoder_att = nnx.List([
        nnx.List([AttentionMask(f[i] + dec_att_out[i], dec_out[i], dec_out[i], rngs=rngs, dtype=dtype)
                  for i in range(NUM_LEVELS if not task.image_level else 0)])
        for task in self.tasks])
    enc_att_out = f[1:] + (f[-1],)
    self.encoder_block_att = nnx.List([ConvLayer(f[j], enc_att_out[j], rngs=rngs, dtype=dtype)
                                       for j in range(NUM_LEVELS)])
    for k, task in enumerate(self.tasks):
      setattr(self, f'pred_task{k + 1}',
              make_head(task, f, image_size, head_hidden, rngs=rngs, dtype=dtype))
    self.logsigma = nnx.Param(jnp.full((len(self.tasks),), -0.5, jnp.float32))

  def heads(self) -> list[nnx.Module]:
    return [getattr(self, f'pred_task{k + 1}') for k in range(len(self.tasks))]

  @property
  def dense_indices(self) -> tuple[int, ...]:
    """Indices of the tasks that run the decoder attention (all but image-level ones)."""
    return tuple(t for t, task in enumerate(self.tasks) if not task.image_level)

  def __call__(self, x: jax.Array, return_attention: bool = False):
    """Per-task predictions; with `return_attention`, also the attention masks.

    The masks come as {'enc{j}': (B, T, H_j, W_j, C_j) for encoder level j = 0..4 (0 is the
    first, full-resolution layer), 'dec{i}': (B, T_dense, ...) for decoder level i (the
    level of `decoder_att[t][i]`; dec0 is the last, full-resolution one)}, tasks in
    `self.tasks` order (decoder masks only for `dense_indices`). They are what MTAN's paper
    visualises; `scripts/predict.py` draws them.
    """
    feats = self.features(x, decoder=bool(self.dense_indices))
    masks: dict[str, jax.Array] = {}
    if self.stack_tasks:
      outputs = self._attend_stacked(feats, masks)
    else:
      outputs = self._attend_per_task(feats, masks)
    return (outputs, masks) if return_attention else outputs

  def _attend_per_task(self, feats: SegNetFeatures, record: dict[str, jax.Array]) -> list[jax.Array]:
    """The attention path and heads one task at a time, in the reference's order."""
    outputs = []
    per_task: dict[str, list[jax.Array]] = {}
    for t, (task, head) in enumerate(zip(self.tasks, self.heads())):
      a = None
      for j in range(NUM_LEVELS):
        inp = feats.enc_first[j] if j == 0 else jnp.concatenate([feats.enc_first[j], a], axis=-1)
        mask = self.encoder_att[t][j](inp)
        per_task.setdefault(f'enc{j}', []).append(mask)
        a = mask * feats.enc_last[j]
        a = max_pool(self.encoder_block_att[j](a))
      if task.image_level:
        outputs.append(task.activate(head(a)))
        continue
      for j in range(NUM_LEVELS):
        level = NUM_LEVELS - 1 - j
        a = self.decoder_block_att[level](upsample2x_bilinear(a))
        mask = self.decoder_att[t][level](jnp.concatenate([feats.unpooled[j], a], axis=-1))
        per_task.setdefault(f'dec{level}', []).append(mask)
        a = mask * feats.dec_last[j]
      outputs.append(task.activate(head(a)))
    record.update({name: jnp.stack(masks, axis=1) for name, masks in per_task.items()})
    return outputs

  def _attend_stacked(self, feats: SegNetFeatures, record: dict[str, jax.Array]) -> list[jax.Array]:
    """The attention path of all tasks at once on (B, T, H, W, C) activations; heads per task."""
    num_tasks = len(self.tasks)
    a = None  # (B, T, H, W, C) attended features of every task
    for j in range(NUM_LEVELS):
      masks = attention_masks([self.encoder_att[t][j] for t in range(num_tasks)],
                              feats.enc_first[j], a)
      record[f'enc{j}'] = masks
      a = masks * feats.enc_last[j][:, None]
      a = _merge_tasks(max_pool, self.encoder_block_att[j](a, per_task=True))
    encoded = a
    dense = self.dense_indices
    if dense:
      # Only dense tasks continue through the decoder; image-level ones stop at `encoded`.
      if len(dense) < num_tasks:
        a = a[:, jnp.asarray(dense)]
      for j in range(NUM_LEVELS):
        level = NUM_LEVELS - 1 - j
        a = self.decoder_block_att[level](_merge_tasks(upsample2x_bilinear, a), per_task=True)
        masks = attention_masks([self.decoder_att[t][level] for t in dense], feats.unpooled[j], a)
        record[f'dec{level}'] = masks
        a = masks * feats.dec_last[j][:, None]
    # Heads differ in output width per task, so they stay separate.
    outputs = []
    for t, (task, head) in enumerate(zip(self.tasks, self.heads())):
      source = encoded[:, t] if task.image_level else a[:, dense.index(t)]
      outputs.append(task.activate(head(source)))
    return outputs


def _merge_tasks(fn: Callable[[jax.Array], jax.Array], a: jax.Array) -> jax.Array:
  """Applies a per-image op `fn` to (B, T, H, W, C) through its (B*T, H, W, C) view.

  Batch-major merging keeps each device's batch shard contiguous, so no data moves.
  """
  b, t = a.shape[:2]
  y = fn(a.reshape((b * t,) + a.shape[2:]))
  return y.reshape((b, t) + y.shape[1:])
