"""The MTAN paper's multi-task baselines on SegNet: Split, Dense and Cross-Stitch.

Each follows the structure of the PyTorch reference's script of the same name
(lorenmt/mtan, `im2im_pred/model_segnet_{split,dense,cross}.py`), generalised from NYUv2's
three hard-coded tasks to any list of tasks, with the same parameter counts:

- `Split`: one SegNet shared by all tasks, one prediction head per task (hard parameter
  sharing). Variants `standard` (exactly `SegNet` with several heads), `wide` (the deepest
  level twice as wide: 1024 channels at full width) and `deep` (every 3x3 conv-BN-ReLU layer
  of the shared network doubled).
- `Dense`: one SegNet per task plus a shared SegNet; every task network level reads its own
  pooled (encoder) or unpooled (decoder) features concatenated with the shared network's.
- `CrossStitch`: one SegNet per task; between levels, learned cross-stitch units mix the
  task networks' features.

STAN (single-task attention network) needs no class of its own: it is `MTAN` with one task.

Every model follows `MTAN`'s conventions: NHWC, `dtype` compute dtype with float32
parameters, heads `pred_task1`, `pred_task2`, ... in task order, `heads()`, a `logsigma`
parameter (T,) initialised to -0.5 for uncertainty weighting, and `__call__(x)` returning one
prediction per task passed through `task.activate`. Each class lists in `TASK_SPECIFIC` the
top-level attributes whose parameters only one task's loss depends on (a prefix match on
the first element of a parameter's path, `mtan_jax.steps.shared_mask`), `logsigma` included
as in `MTAN` (element t only enters task t's uncertainty-weighted term); gradient-manipulation
weightings treat every other parameter as shared.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtan_jax.errors import ConfigError
from mtan_jax.models.layers import ConvLayer, PredictionHead, max_pool_with_argmax, max_unpool
from mtan_jax.models.segnet import (DEFAULT_HEAD_HIDDEN, DEFAULT_WIDTHS, NUM_LEVELS,
                                    SegNetBackbone, check_widths, make_head)
from mtan_jax.tasks import Task

SPLIT_VARIANTS = ('standard', 'wide', 'deep')
STITCH_KINDS = ('reference', 'matrix')
# Cross-stitch matrix init (Misra et al., CVPR 2016): each task keeps 0.9 of its own feature
# and takes the remaining 0.1 from the other tasks.
STITCH_SELF_WEIGHT = 0.9


def _as_tasks(tasks: Task | Sequence[Task], model: str) -> tuple[Task, ...]:
  tasks = (tasks,) if isinstance(tasks, Task) else tuple(tasks)
  if not tasks:
    raise ConfigError(f'{model} needs at least one task')
  return tasks


def _dense_only(tasks: Sequence[Task], model: str) -> None:
  """Raises ConfigError for image-level tasks, which only Split, SegNet and MTAN support."""
  image_level = [t.name for t in tasks if t.image_level]
  if image_level:
    raise ConfigError(f'{model} supports dense (per-pixel) tasks only, but {", ".join(image_level)} '
                      f'is image-level; use MTAN, SegNet or Split for image-level tasks')


def _xavier_normal_to_uniform(module: nnx.Module) -> None:
  """Turns every conv kernel below `module` from its Xavier-normal draw into a Xavier-uniform one.

  With sigma = sqrt(2 / (fan_in + fan_out)), a Xavier-normal entry k ~ N(0, sigma^2) maps to
  sqrt(3) * sigma * erf(k / (sigma * sqrt(2))) ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out))
  (the probability integral transform), so the result is an exact Xavier-uniform draw.
  Transforming the draws `ConvLayer` already made, rather than drawing again, saves eager
  JAX from compiling a second random-number kernel per kernel shape (most of the time it
  takes to build a small model).
  """
  for _, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Conv):
      kernel = node.kernel.get_value()
      *window, cin, cout = kernel.shape
      sigma = math.sqrt(2.0 / (math.prod(window) * (cin + cout)))
      uniform = math.sqrt(3.0) * sigma * jax.scipy.special.erf(kernel / (sigma * math.sqrt(2.0)))
      # Whole-value set_value: under nnx.eval_shape an indexed `kernel[...] =` makes JAX
      # inspect the traced program so far, once per conv (seconds for the larger models).
      node.kernel.set_value(uniform.astype(kernel.dtype))


def _uncertainty_logsigma(num_tasks: int) -> nnx.Param:
  return nnx.Param(jnp.full((num_tasks,), -0.5, jnp.float32))


def _run(layers: Sequence[nnx.Module], x: jax.Array) -> jax.Array:
  for layer in layers:
    x = layer(x)
  return x


class DoubleConvLayer(nnx.Module):
  """Two 3x3 conv-BN-ReLU layers (cin -> cout -> cout): the Split `deep` reference's `conv_layer`."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.layer1 = ConvLayer(cin, cout, rngs=rngs, dtype=dtype)
    self.layer2 = ConvLayer(cout, cout, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layer2(self.layer1(x))


class Split(SegNetBackbone):
  """Hard parameter sharing: one SegNet for all tasks, one head per task.

  `standard` is `SegNet` with several heads (plus `logsigma`). `wide` doubles the deepest
  level's width (the reference goes from widths 64..512 to 64, 128, 256, 512, 1024).
  `deep` replaces each conv-BN-ReLU layer of the shared network by two (the second keeping
  the width), as the reference's `--type deep` does; the heads are unchanged. The layer
  lists keep `SegNetBackbone`'s names and nesting, so `features()` runs all three variants.

  Image-level tasks get an `ImageHead` on the deepest pooled encoder features, as in
  `SegNet` (they need `image_size`).

  `TASK_SPECIFIC`: the heads (`pred_task*`) and `logsigma`; the whole SegNet is shared.

  Args:
    tasks: the tasks, in head order.
    widths: channel widths of the five SegNet levels (before `wide` doubles the last).
    in_channels: input image channels.
    rngs: parameter initialisation keys.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    image_size: input (height, width); needed by image-level tasks' heads.
    head_hidden: hidden width of image-level heads.
    variant: 'standard', 'wide' or 'deep'.
  """

  TASK_SPECIFIC: tuple[str, ...] = ('pred_task', 'logsigma')

  def __init__(self, tasks: Task | Sequence[Task], widths: Sequence[int] = DEFAULT_WIDTHS,
               in_channels: int = 3, *, rngs: nnx.Rngs, dtype=jnp.float32,
               image_size: Sequence[int] | None = None, head_hidden: int = DEFAULT_HEAD_HIDDEN,
               variant: str = 'standard'):
    if variant not in SPLIT_VARIANTS:
      raise ConfigError(f'unknown split variant {variant!r}; expected one of '
                        f'{", ".join(SPLIT_VARIANTS)}')
    self.tasks = _as_tasks(tasks, 'Split')
    self.variant = variant
    f = check_widths(widths)
    if variant == 'wide':
      f = f[:-1] + (2 * f[-1],)
    if variant == 'deep':
      self._init_deep(f, in_channels, rngs=rngs, dtype=dtype)
    else:
      super().__init__(f, in_channels, rngs=rngs, dtype=dtype)
    for k, task in enumerate(self.tasks):
      setattr(self, f'pred_task{k + 1}',
              make_head(task, self.widths, image_size, head_hidden, rngs=rngs, dtype=dtype))
    self.logsigma = _uncertainty_logsigma(len(self.tasks))

  def _init_deep(self, f: tuple[int, ...], in_channels: int, *, rngs: nnx.Rngs, dtype) -> None:
    """`SegNetBackbone`'s layer lists with every `ConvLayer` a `DoubleConvLayer`."""
    self.widths = f
    self.dtype = dtype
    layer = lambda cin, cout: DoubleConvLayer(cin, cout, rngs=rngs, dtype=dtype)
    enc_in = (in_channels,) + f[:-1]
    dec_out = (f[0],) + f[:-1]
    extra = (1, 1, 2, 2, 2)  # same-width layers after each level's first, as in SegNet
    self.encoder_block = nnx.List([layer(enc_in[i], f[i]) for i in range(NUM_LEVELS)])
    self.conv_block_enc = nnx.List([nnx.List([layer(f[i], f[i]) for _ in range(extra[i])])
                                    for i in range(NUM_LEVELS)])
    self.decoder_block = nnx.List([layer(f[i], dec_out[i]) for i in range(NUM_LEVELS)])
    self.conv_block_dec = nnx.List([nnx.List([layer(dec_out[i], dec_out[i]) for _ in range(extra[i])])
                                    for i in range(NUM_LEVELS)])

  def heads(self) -> list[nnx.Module]:
    return [getattr(self, f'pred_task{k + 1}') for k in range(len(self.tasks))]

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Returns one prediction per task: (B, H, W, channels), or (B, channels) if image-level."""
    feats = self.features(x, decoder=not all(t.image_level for t in self.tasks))
    return [task.activate(head(feats.enc_pooled if task.image_level else feats.dec_last[-1]))
            for task, head in zip(self.tasks, self.heads())]


def _block(c0: int, c1: int, c2: int, n: int, *, rngs: nnx.Rngs, dtype) -> nnx.List:
  """n conv-BN-ReLU layers c0 -> c1 (-> c1 ...) -> c2: the Dense/Cross reference's `conv_layer`."""
  chans = (c0,) + (c1,) * (n - 1) + (c2,)
  return nnx.List([ConvLayer(chans[k], chans[k + 1], rngs=rngs, dtype=dtype) for k in range(n)])


def _layers_per_level(level: int) -> int:
  # SegNet's VGG-16 layout: two conv layers at the two shallowest levels, three deeper.
  return 2 if level < 2 else 3


class Dense(nnx.Module):
  """One SegNet per task plus a shared SegNet, densely connected level by level.

  The shared network (`encoder_block[i]`, `decoder_block[i]`, each a list of 2 or 3
  conv-BN-ReLU layers) runs on the image alone. Task t's network (`encoder_block_t[t][i]`,
  `decoder_block_t[t][i]`) reads at every encoder level after the first the previous
  level's pooled feature, its own concatenated (task first) with the shared network's, and
  at every decoder level its own max-unpooled feature (its own pooling indices)
  concatenated with the shared network's unpooled feature of that level. Its last decoder level keeps
  the doubled width in its middle layer (2 f0 -> 2 f0 -> f0), as in the reference.

  As in the reference, the shared network's last decoder level (`decoder_block[0]`, f0 ->
  f0 -> the number of semantic classes, or the first task's channels without a semantic
  task) is never read: it exists so that the parameter count matches the reference's, is
  not computed, and gets zero gradients. Conv kernels are Xavier-uniform, as in the
  reference's Dense script.

  `TASK_SPECIFIC`: the task networks (`encoder_block_t`, `decoder_block_t`), the heads
  (`pred_task*`) and `logsigma`; the shared network is not.

  Args:
    tasks: dense tasks, in head order (image-level tasks raise ConfigError).
    widths: channel widths of the five SegNet levels.
    in_channels: input image channels.
    rngs: parameter initialisation keys.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    image_size: unused (accepted for a uniform constructor).
    head_hidden: unused (accepted for a uniform constructor).
  """

  TASK_SPECIFIC: tuple[str, ...] = ('encoder_block_t', 'decoder_block_t', 'pred_task', 'logsigma')

  def __init__(self, tasks: Task | Sequence[Task], widths: Sequence[int] = DEFAULT_WIDTHS,
               in_channels: int = 3, *, rngs: nnx.Rngs, dtype=jnp.float32,
               image_size: Sequence[int] | None = None, head_hidden: int = DEFAULT_HEAD_HIDDEN):
    del image_size, head_hidden  # dense tasks only
    self.tasks = _as_tasks(tasks, 'Dense')
    _dense_only(self.tasks, 'Dense')
    f = self.widths = check_widths(widths)
    self.dtype = dtype
    block = lambda c0, c1, c2, i: _block(c0, c1, c2, _layers_per_level(i), rngs=rngs, dtype=dtype)
    enc_in = (in_channels,) + f[:-1]
    dec_out = (f[0],) + f[:-1]
    semantic = [t.channels for t in self.tasks if t.name == 'semantic']
    unused_channels = (semantic or [self.tasks[0].channels])[0]
    self.encoder_block = nnx.List([block(enc_in[i], f[i], f[i], i) for i in range(NUM_LEVELS)])
    self.decoder_block = nnx.List([block(f[0], f[0], unused_channels, 0)] +
                                  [block(f[i], dec_out[i], dec_out[i], i) for i in range(1, NUM_LEVELS)])
    # Level 0 of a task encoder sees the image alone; deeper levels see [own, shared] pooled
    # features, so their input width doubles. Decoder levels all see [own, shared] unpooled.
    task_enc_in = (in_channels,) + tuple(2 * c for c in f[:-1])
    self.encoder_block_t = nnx.List([
        nnx.List([block(task_enc_in[i], f[i], f[i], i) for i in range(NUM_LEVELS)])
        for _ in self.tasks])
    self.decoder_block_t = nnx.List([
        nnx.List([block(2 * f[0], 2 * f[0], f[0], 0)] +
                 [block(2 * f[i], dec_out[i], dec_out[i], i) for i in range(1, NUM_LEVELS)])
        for _ in self.tasks])
    for k, task in enumerate(self.tasks):
      setattr(self, f'pred_task{k + 1}', PredictionHead(f[0], task.channels, rngs=rngs, dtype=dtype))
    self.logsigma = _uncertainty_logsigma(len(self.tasks))
    _xavier_normal_to_uniform(self)

  def heads(self) -> list[nnx.Module]:
    return [getattr(self, f'pred_task{k + 1}') for k in range(len(self.tasks))]

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Returns one prediction (B, H, W, channels) per task."""
    x = x.astype(self.dtype)
    shared_pooled, masks = [], []
    h = x
    for i in range(NUM_LEVELS):
      h, mask = max_pool_with_argmax(_run(self.encoder_block[i], h))
      shared_pooled.append(h)
      masks.append(mask)
    shared_unpooled = [None] * NUM_LEVELS
    for level in reversed(range(NUM_LEVELS)):
      shared_unpooled[level] = h = max_unpool(h, masks[level])
      if level > 0:  # decoder_block[0]'s output is never read (see the class docstring)
        h = _run(self.decoder_block[level], h)
    outputs = []
    for t, (task, head) in enumerate(zip(self.tasks, self.heads())):
      h, task_masks = x, []
      for i in range(NUM_LEVELS):
        inp = h if i == 0 else jnp.concatenate([h, shared_pooled[i - 1]], axis=-1)
        h, mask = max_pool_with_argmax(_run(self.encoder_block_t[t][i], inp))
        task_masks.append(mask)
      for level in reversed(range(NUM_LEVELS)):
        inp = jnp.concatenate([max_unpool(h, task_masks[level]), shared_unpooled[level]], axis=-1)
        h = _run(self.decoder_block_t[t][level], inp)
      outputs.append(task.activate(head(h)))
    return outputs


class CrossStitch(nnx.Module):
  """One SegNet per task (`networks[t]`, a `SegNetBackbone`), linked by cross-stitch units.

  Units sit where the reference puts them: on the pooled output of encoder levels 0-3 (the
  input of levels 1-4; `cs_unit_encoder`, 4 units) and on the input of every decoder level
  before its max-unpool (the deepest pooled encoder output, then each decoder level's
  output; `cs_unit_decoder`, 5 units, in decoding order: deepest first). Nothing is
  stitched before the heads. Each network unpools with its own pooling indices.

  `stitch` picks the unit:

  - 'reference' (default): the reference's unit, a vector a (T,) per position; every task
    network receives the same mix sum_s a[s] * x_s. Initialised to ones, as the reference
    does (its loop meant to set `nn.Parameter`s to 1 never matches a module, and the tensors
    are created with `torch.ones`), so at init every network reads the sum of all networks'
    features. Same parameter count as the reference.
  - 'matrix': Misra et al.'s unit, a matrix A (T, T) per position; task t receives
    sum_s A[t, s] * x_s. Initialised to 0.9 on the diagonal and 0.1 / (T - 1) elsewhere
    (identity for one task).

  Conv kernels are Xavier-uniform, as in the reference's Cross-Stitch script.

  `TASK_SPECIFIC`: only the heads (`pred_task*`) and `logsigma`. Through the stitch units
  every task's loss reaches every task network (all of a 'reference' unit's outputs are the
  same mix; a 'matrix' unit's off-diagonal weights are learned and non-zero), so the
  networks and the units count as shared.

  Args:
    tasks: dense tasks, in head order (image-level tasks raise ConfigError).
    widths: channel widths of the five SegNet levels.
    in_channels: input image channels.
    rngs: parameter initialisation keys.
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    image_size: unused (accepted for a uniform constructor).
    head_hidden: unused (accepted for a uniform constructor).
    stitch: 'reference' or 'matrix'.
  """

  TASK_SPECIFIC: tuple[str, ...] = ('pred_task', 'logsigma')

  def __init__(self, tasks: Task | Sequence[Task], widths: Sequence[int] = DEFAULT_WIDTHS,
               in_channels: int = 3, *, rngs: nnx.Rngs, dtype=jnp.float32,
               image_size: Sequence[int] | None = None, head_hidden: int = DEFAULT_HEAD_HIDDEN,
               stitch: str = 'reference'):
    del image_size, head_hidden  # dense tasks only
    if stitch not in STITCH_KINDS:
      raise ConfigError(f'unknown cross-stitch unit {stitch!r}; expected one of '
                        f'{", ".join(STITCH_KINDS)}')
    self.tasks = _as_tasks(tasks, 'CrossStitch')
    _dense_only(self.tasks, 'CrossStitch')
    self.widths = check_widths(widths)
    self.dtype = dtype
    self.stitch = stitch
    num_tasks = len(self.tasks)
    self.networks = nnx.List([SegNetBackbone(self.widths, in_channels, rngs=rngs, dtype=dtype)
                              for _ in self.tasks])
    if stitch == 'reference':
      unit = jnp.ones((num_tasks,), jnp.float32)
    else:
      off = (1.0 - STITCH_SELF_WEIGHT) / (num_tasks - 1) if num_tasks > 1 else 0.0
      diag = STITCH_SELF_WEIGHT if num_tasks > 1 else 1.0
      unit = jnp.full((num_tasks, num_tasks), off, jnp.float32) + (diag - off) * jnp.eye(num_tasks)
    self.cs_unit_encoder = nnx.Param(jnp.tile(unit, (NUM_LEVELS - 1,) + (1,) * unit.ndim))
    self.cs_unit_decoder = nnx.Param(jnp.tile(unit, (NUM_LEVELS,) + (1,) * unit.ndim))
    for k, task in enumerate(self.tasks):
      setattr(self, f'pred_task{k + 1}',
              PredictionHead(self.widths[0], task.channels, rngs=rngs, dtype=dtype))
    self.logsigma = _uncertainty_logsigma(num_tasks)
    _xavier_normal_to_uniform(self)

  def heads(self) -> list[nnx.Module]:
    return [getattr(self, f'pred_task{k + 1}') for k in range(len(self.tasks))]

  def _mix(self, unit: jax.Array, feats: list[jax.Array]) -> list[jax.Array]:
    """Applies one stitch unit to the T networks' features: one input per network."""
    unit = unit.astype(feats[0].dtype)
    if self.stitch == 'reference':
      mixed = sum(unit[s] * feats[s] for s in range(len(feats)))
      return [mixed] * len(feats)
    return [sum(unit[t, s] * feats[s] for s in range(len(feats))) for t in range(len(feats))]

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Returns one prediction (B, H, W, channels) per task."""
    x = x.astype(self.dtype)
    enc_units, dec_units = self.cs_unit_encoder[...], self.cs_unit_decoder[...]
    inputs = [x] * len(self.networks)
    masks = [[] for _ in self.networks]
    for i in range(NUM_LEVELS):
      if i > 0:
        inputs = self._mix(enc_units[i - 1], inputs)
      outs = []
      for t, net in enumerate(self.networks):
        h = _run(net.conv_block_enc[i], net.encoder_block[i](inputs[t]))
        h, mask = max_pool_with_argmax(h)
        outs.append(h)
        masks[t].append(mask)
      inputs = outs
    for j in range(NUM_LEVELS):
      level = NUM_LEVELS - 1 - j
      inputs = self._mix(dec_units[j], inputs)
      inputs = [max_unpool(inputs[t], masks[t][level]) for t in range(len(self.networks))]
      inputs = [_run(net.conv_block_dec[level], net.decoder_block[level](h))
                for net, h in zip(self.networks, inputs)]
    return [task.activate(head(h)) for task, head, h in zip(self.tasks, self.heads(), inputs)]
