"""The shared SegNet encoder-decoder and the single-task SegNet baseline.

Attribute names follow the PyTorch reference (`encoder_block`, `conv_block_enc`,
`decoder_block`, `conv_block_dec`, `pred_task`) so that weights import one to one. Each
`conv_block_*` entry is a list of one or two `ConvLayer`s (two for the three deepest levels).

`SegNet` with several tasks is the paper's hard-sharing baseline (MTL-SegNet in the pet
seed): the whole network shared, one head per task. Image-level tasks (`Task.image_level`)
get an `ImageHead` on the deepest pooled encoder features instead of a pixel head.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtan_jax.errors import ConfigError
from mtan_jax.models.layers import (ConvLayer, ImageHead, PredictionHead, max_pool_with_argmax,
                                    max_unpool)
from mtan_jax.tasks import Task

DEFAULT_WIDTHS = (64, 128, 256, 512, 512)
NUM_LEVELS = 5
# Five 2x2 poolings: inputs must be divisible by 2**5.
SIZE_MULTIPLE = 2 ** NUM_LEVELS


class SegNetFeatures(NamedTuple):
  """Intermediate features of the shared network that the attention modules read.

  Decoder lists are in decoding order (deepest level first), as in the reference.
  """
  enc_first: list[jax.Array]   # per encoder level: output of encoder_block[i]
  enc_last: list[jax.Array]    # per encoder level: output of conv_block_enc[i]
  unpooled: list[jax.Array]    # per decoder step: max-unpooled input of the step
  dec_last: list[jax.Array]    # per decoder step: output of conv_block_dec
  enc_pooled: jax.Array | None = None  # the deepest encoder level after its max-pool


def check_widths(widths: Sequence[int]) -> tuple[int, ...]:
  widths = tuple(int(w) for w in widths)
  if len(widths) != NUM_LEVELS or min(widths) < 1:
    raise ConfigError(f'config.widths={widths}; expected {NUM_LEVELS} positive channel widths, '
                      f'e.g. {DEFAULT_WIDTHS}')
  return widths


def check_input_size(height: int, width: int) -> None:
  """Raises ConfigError unless both sides are positive multiples of 32."""
  if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
    raise ConfigError(f'image size {height}x{width} is not divisible by {SIZE_MULTIPLE}; '
                      f'SegNet pools {NUM_LEVELS} times by 2, so height and width must be multiples of '
                      f'{SIZE_MULTIPLE} (e.g. 128x256, 288x384)')


DEFAULT_HEAD_HIDDEN = 256


def make_head(task: Task, widths: Sequence[int], image_size: Sequence[int] | None,
              head_hidden: int, *, rngs: nnx.Rngs, dtype) -> nnx.Module:
  """A task's head: `PredictionHead` on decoder features, or `ImageHead` for image-level tasks."""
  if not task.image_level:
    return PredictionHead(widths[0], task.channels, rngs=rngs, dtype=dtype)
  if image_size is None:
    raise ConfigError(f'task {task.name!r} is image-level: its head needs the input image size')
  h, w = (int(s) for s in image_size)
  check_input_size(h, w)
  if int(head_hidden) < 1:
    raise ConfigError(f'config.head_hidden={head_hidden}; expected a positive integer')
  features = widths[-1] * (h // SIZE_MULTIPLE) * (w // SIZE_MULTIPLE)
  return ImageHead(features, int(head_hidden), task.channels, rngs=rngs, dtype=dtype)


def _conv_stack(cin: int, cout: int, n: int, rngs: nnx.Rngs, dtype) -> nnx.List:
  return nnx.List([ConvLayer(cin if k == 0 else cout, cout, rngs=rngs, dtype=dtype) for k in range(n)])


def _run(stack: nnx.List, x: jax.Array) -> jax.Array:
  for layer in stack:
    x = layer(x)
  return x


class SegNetBackbone(nnx.Module):
  """The shared SegNet encoder-decoder (VGG16-like, with pooling indices reused for unpooling)."""

  def __init__(self, widths: Sequence[int] = DEFAULT_WIDTHS, in_channels: int = 3, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    f = check_widths(widths)
    self.widths = f
    self.dtype = dtype
    enc_in = (in_channels,) + f[:-1]
    convs = (1, 1, 2, 2, 2)
    self.encoder_block = nnx.List([ConvLayer(enc_in[i], f[i], rngs=rngs, dtype=dtype) for i in range(NUM_LEVELS)])
    self.conv_block_enc = nnx.List([_conv_stack(f[i], f[i], convs[i], rngs, dtype) for i in range(NUM_LEVELS)])
    # decoder_block[i] maps level i's width back to level i-1's (level 0: 64 -> 64).
    dec_out = (f[0],) + f[:-1]
    self.decoder_block = nnx.List([ConvLayer(f[i], dec_out[i], rngs=rngs, dtype=dtype) for i in range(NUM_LEVELS)])
    # conv_block_dec[i] works at dec_out[i]; one conv at the two shallowest levels, as in the reference.
    self.conv_block_dec = nnx.List([_conv_stack(dec_out[i], dec_out[i], 1 if i < 2 else 2, rngs, dtype)
                                    for i in range(NUM_LEVELS)])

  @property
  def out_channels(self) -> int:
    return self.widths[0]

  def features(self, x: jax.Array, decoder: bool = True) -> SegNetFeatures:
    """Runs the shared network on x (B, H, W, C_in) and returns what the attention branches need.

    `decoder=False` stops after the encoder (only image-level tasks): the decoder lists are
    then empty.
    """
    x = x.astype(self.dtype)
    enc_first, enc_last, masks = [], [], []
    for i in range(NUM_LEVELS):
      x = self.encoder_block[i](x)
      enc_first.append(x)
      x = _run(self.conv_block_enc[i], x)
      enc_last.append(x)
      x, mask = max_pool_with_argmax(x)
      masks.append(mask)
    enc_pooled = x
    unpooled, dec_last = [], []
    for j in range(NUM_LEVELS if decoder else 0):
      level = NUM_LEVELS - 1 - j
      x = max_unpool(x, masks[level])
      unpooled.append(x)
      x = _run(self.conv_block_dec[level], self.decoder_block[level](x))
      dec_last.append(x)
    return SegNetFeatures(enc_first, enc_last, unpooled, dec_last, enc_pooled)


class SegNet(SegNetBackbone):
  """SegNet: single-task (the baseline MTAN is measured against) or hard-shared multi-task.

  One task keeps the reference's head name `pred_task`; several tasks get `pred_task1`,
  `pred_task2`, ... as in MTAN. Image-level tasks need `image_size`.
  """

  # Only the heads are task-specific: every task's loss reaches the whole SegNet.
  TASK_SPECIFIC = ('pred_task',)

  def __init__(self, tasks: Task | Sequence[Task], widths: Sequence[int] = DEFAULT_WIDTHS,
               in_channels: int = 3, *, rngs: nnx.Rngs, dtype=jnp.float32,
               image_size: Sequence[int] | None = None, head_hidden: int = DEFAULT_HEAD_HIDDEN):
    super().__init__(widths, in_channels, rngs=rngs, dtype=dtype)
    self.tasks = (tasks,) if isinstance(tasks, Task) else tuple(tasks)
    if not self.tasks:
      raise ConfigError('SegNet needs at least one task')
    heads = [make_head(t, self.widths, image_size, head_hidden, rngs=rngs, dtype=dtype)
             for t in self.tasks]
    if len(heads) == 1:
      self.pred_task = heads[0]
    else:
      for k, head in enumerate(heads):
        setattr(self, f'pred_task{k + 1}', head)

  def heads(self) -> list[nnx.Module]:
    if len(self.tasks) == 1:
      return [self.pred_task]
    return [getattr(self, f'pred_task{k + 1}') for k in range(len(self.tasks))]

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Returns one prediction per task: (B, H, W, channels), or (B, channels) if image-level."""
    feats = self.features(x, decoder=not all(t.image_level for t in self.tasks))
    return [task.activate(head(feats.enc_pooled if task.image_level else feats.dec_last[-1]))
            for task, head in zip(self.tasks, self.heads())]
