"""Self-supervised auxiliary tasks: targets computed from the image alone.

The input pipeline (`mtan_jax.data.pipeline`, with `mtan_jax.data.aux_targets`) makes the
targets after any augmentation, so they always match the augmented image; any dataset can
add these tasks by config. Losses follow REFERENCE.md ("The second seed"):

- edges: Canny edge map (H, W, 1) in {0, 1}; sigmoid output, L1 loss; metrics: L1 and the
  edge-pixel F1 at threshold 0.5.
- colorization: the model sees only the L channel (L / 100) and predicts the Lab a/b
  channels divided by 128 (H, W, 2); L1 loss; the metric l1 is in Lab units (x 128).
- denoising: the model sees the image with Gaussian noise and predicts the clean image
  (H, W, 3) in [0, 1]; MSE loss; metrics: MSE and PSNR (dB, peak 1) of the pooled MSE.

Colorization and denoising change the input of every task (the seed trains all tasks from
the L channel, or from the noisy image); the pipeline applies that when either is present.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mtan_jax.metrics import ratio
from mtan_jax.tasks import Task

# Colorization targets are Lab a/b divided by this (mtan_jax.data.aux_targets.colorization).
AB_SCALE = 128.0


def _pixel_mask(example_mask, target):
  """(B, H, W, 1) float mask of real examples (padding rows of eval batches count 0)."""
  if example_mask is None:
    return jnp.ones(target.shape[:1] + (1, 1, 1), jnp.float32)
  return (jnp.asarray(example_mask) != 0).astype(jnp.float32)[:, None, None, None]


class _PixelRegression(Task):
  """A per-pixel regression on every pixel: loss = mean of `error(pred - target)`."""

  self_supervised = True

  @staticmethod
  def error(diff):
    raise NotImplementedError

  def loss(self, pred, batch):
    target = batch[self.target_key]
    return jnp.sum(self.error(pred - target)), jnp.asarray(target.size, jnp.float32)

  def stats(self, pred, batch, example_mask):
    target = batch[self.target_key]
    real = _pixel_mask(example_mask, target)
    return {'error_sum': jnp.sum(self.error(pred - target) * real),
            'count': jnp.sum(jnp.broadcast_to(real, target.shape))}


@dataclasses.dataclass(frozen=True)
class Edges(_PixelRegression):
  """Edge detection against the pipeline's Canny map; sigmoid output, L1 loss."""

  name: str = 'edges'
  target_key: str = 'edges'
  channels: int = 1
  error = staticmethod(jnp.abs)

  def activate(self, logits):
    return jax.nn.sigmoid(logits)

  def stats(self, pred, batch, example_mask):
    target = batch[self.target_key]
    real = _pixel_mask(example_mask, target)
    hit = (pred >= 0.5).astype(jnp.float32) * real
    edge = (target >= 0.5).astype(jnp.float32) * real
    return {**super().stats(pred, batch, example_mask),
            'true_pos': jnp.sum(hit * edge), 'pred_pos': jnp.sum(hit), 'target_pos': jnp.sum(edge)}

  def finalize(self, stats):
    l1 = ratio(stats['error_sum'], stats['count'])
    return {'loss': l1, 'l1': l1,
            'f1': ratio(2 * float(stats['true_pos']), float(stats['pred_pos']) + float(stats['target_pos']))}

  @property
  def metric_names(self):
    return ('loss', 'l1', 'f1')


@dataclasses.dataclass(frozen=True)
class Colorization(_PixelRegression):
  """Predicts Lab a/b (divided by AB_SCALE) from the L channel; L1 loss."""

  name: str = 'colorization'
  target_key: str = 'ab'
  channels: int = 2
  error = staticmethod(jnp.abs)

  def finalize(self, stats):
    l1 = ratio(stats['error_sum'], stats['count'])
    return {'loss': l1, 'l1': l1 * AB_SCALE}

  @property
  def metric_names(self):
    return ('loss', 'l1')


@dataclasses.dataclass(frozen=True)
class Denoising(_PixelRegression):
  """Predicts the clean image in [0, 1] from the noisy input; MSE loss."""

  name: str = 'denoising'
  target_key: str = 'clean'
  channels: int = 3
  error = staticmethod(jnp.square)

  def finalize(self, stats):
    mse = ratio(stats['error_sum'], stats['count'])
    psnr = 10.0 * math.log10(1.0 / mse) if mse > 0 else float('inf')
    return {'loss': mse, 'mse': mse, 'psnr': psnr if mse == mse else float('nan')}

  @property
  def metric_names(self):
    return ('loss', 'mse', 'psnr')
