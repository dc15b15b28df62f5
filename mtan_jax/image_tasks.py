"""Image-level tasks: one prediction per image (pet species, pet head bounding box).

Their heads (`mtan_jax.models.layers.ImageHead`) read the deepest encoder features, or in
MTAN each task's attended deepest encoder features (REFERENCE.md, "The second seed").

- species: 2-way classification (cat / dog), cross-entropy, accuracy.
- bbox: the head box [ymin, xmin, ymax, xmax] in pixels of the model input. The head's
  sigmoid output is scaled by the image size, so predictions always lie inside the image.
  The loss is the squared error of coordinates measured in units of the image side (pixel
  MSE / side^2): the seed's "MSE in pixel units after scaling", kept in [0, 1] next to
  cross-entropy. Metrics are in pixels: mse_px (per coordinate), l2_px (Euclidean norm of
  the 4-vector error per image) and the mean box IoU. An all-zero target box means "no box"
  (TFDS's Oxford-IIIT Pet test split and a few training images have none); those images
  count for no bbox loss or metric.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mtan_jax.metrics import ratio
from mtan_jax.tasks import Task


def _real(example_mask, batch_size):
  if example_mask is None:
    return jnp.ones((batch_size,), jnp.float32)
  return (jnp.asarray(example_mask) != 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Species(Task):
  """Image classification (Oxford-IIIT Pet species: 0 cat, 1 dog); labels < 0 are ignored."""

  name: str = 'species'
  target_key: str = 'species'
  channels: int = 2
  image_level = True

  def target_spec(self, height, width):
    return (), np.int32

  def activate(self, logits):
    return jax.nn.log_softmax(logits, axis=-1)

  def _per_example(self, pred, labels):
    valid = (labels >= 0) & (labels < self.channels)
    picked = jnp.take_along_axis(pred, jnp.where(valid, labels, 0)[:, None], axis=-1)[:, 0]
    return valid.astype(jnp.float32), -picked

  def loss(self, pred, batch):
    valid, nll = self._per_example(pred, batch[self.target_key])
    return jnp.sum(jnp.where(valid > 0, nll, 0.0)), jnp.sum(valid)

  def stats(self, pred, batch, example_mask):
    labels = batch[self.target_key]
    valid, nll = self._per_example(pred, labels)
    valid = valid * _real(example_mask, labels.shape[0])
    correct = (jnp.argmax(pred, axis=-1) == labels).astype(jnp.float32)
    return {'loss_sum': jnp.sum(jnp.where(valid > 0, nll, 0.0)),
            'correct': jnp.sum(correct * valid), 'count': jnp.sum(valid)}

  def finalize(self, stats):
    return {'loss': ratio(stats['loss_sum'], stats['count']),
            'acc': ratio(stats['correct'], stats['count'])}

  @property
  def metric_names(self):
    return ('loss', 'acc')


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of boxes [ymin, xmin, ymax, xmax] (..., 4); 0 where the union is empty."""
  inter_h = jnp.clip(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  inter_w = jnp.clip(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
  inter = inter_h * inter_w
  area = lambda x: jnp.clip(x[..., 2] - x[..., 0], 0) * jnp.clip(x[..., 3] - x[..., 1], 0)
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class BBox(Task):
  """Bounding-box regression in pixels of an `image_size` (height, width) input."""

  name: str = 'bbox'
  target_key: str = 'bbox'
  channels: int = 4
  image_size: tuple[int, int] = (256, 256)
  image_level = True

  def target_spec(self, height, width):
    return (4,), np.float32

  @property
  def _sides(self) -> jax.Array:
    h, w = self.image_size
    return jnp.asarray([h, w, h, w], jnp.float32)

  def activate(self, logits):
    return jax.nn.sigmoid(logits) * self._sides

  def _valid(self, target):
    return jnp.any(target != 0, axis=-1).astype(jnp.float32)

  def loss(self, pred, batch):
    target = batch[self.target_key]
    valid = self._valid(target)
    per_example = jnp.mean(jnp.square((pred - target) / self._sides), axis=-1)
    return jnp.sum(per_example * valid), jnp.sum(valid)

  def stats(self, pred, batch, example_mask):
    target = batch[self.target_key]
    valid = self._valid(target) * _real(example_mask, target.shape[0])
    sq = jnp.sum(jnp.square(pred - target), axis=-1)
    scaled = jnp.mean(jnp.square((pred - target) / self._sides), axis=-1)
    return {'loss_sum': jnp.sum(scaled * valid), 'sq_sum': jnp.sum(sq * valid),
            'l2_sum': jnp.sum(jnp.sqrt(sq) * valid),
            'iou_sum': jnp.sum(box_iou(pred, target) * valid), 'count': jnp.sum(valid)}

  def finalize(self, stats):
    count = stats['count']
    return {'loss': ratio(stats['loss_sum'], count),
            'mse_px': ratio(stats['sq_sum'], 4 * float(count)),
            'l2_px': ratio(stats['l2_sum'], count),
            'iou': ratio(stats['iou_sum'], count)}

  @property
  def metric_names(self):
    return ('loss', 'mse_px', 'l2_px', 'iou')
