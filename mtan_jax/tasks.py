"""Dense prediction tasks: each knows its head width, output activation, loss and metrics.

Models and trainers loop over a sequence of `Task`s built from the config by `make_tasks`
instead of naming tasks. Losses follow the MTAN reference (lorenmt/mtan, `im2im_pred/utils.py`):

- semantic: NLL on log-softmax outputs, ignore label -1, mean over valid pixels;
- depth: L1 over valid pixels (a pixel is invalid where the target is 0 in every channel);
- normal: 1 - (sum of dot products over valid pixels) / (number of valid pixels).

Losses are computed as (sum, count) so they add up exactly over devices; a batch without a
single valid pixel gives loss 0 rather than the reference's division by zero.

Image-level tasks (pet species, head bounding box: `mtan_jax.image_tasks`) and the
self-supervised auxiliary tasks whose targets the input pipeline computes from the image
(edges, colorization, denoising: `mtan_jax.auxiliary_tasks`) use the same interface.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtan_jax import metrics
from mtan_jax.errors import ConfigError

Batch = Mapping[str, jax.Array]


def safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  """total / count, or 0 where count is 0."""
  return total / jnp.maximum(count, 1.0)


def valid_pixels(target: jax.Array) -> jax.Array:
  """(B, H, W) float mask of pixels whose target is non-zero in some channel (the reference's rule)."""
  return (jnp.sum(target, axis=-1) != 0).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Task:
  """Base class. Subclasses set `name`, `target_key`, `channels` and the methods below."""

  name: str
  target_key: str
  channels: int
  # Image-level tasks predict one vector per image from the deepest encoder features;
  # dense tasks predict per pixel from the decoder.
  image_level: ClassVar[bool] = False
  # Self-supervised tasks get their targets from the input pipeline, not from the dataset.
  self_supervised: ClassVar[bool] = False

  def target_spec(self, height: int, width: int) -> tuple[tuple[int, ...], Any]:
    """Shape and numpy dtype of one example's target at input resolution (height, width)."""
    return (height, width, self.channels), np.float32

  def activate(self, logits: jax.Array) -> jax.Array:
    """Maps the head's raw output to the prediction the loss and metrics use."""
    return logits

  def loss(self, pred: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Returns (sum, count) of the per-pixel loss on this batch."""
    raise NotImplementedError

  def stats(self, pred: jax.Array, batch: Batch, example_mask: jax.Array) -> dict[str, jax.Array]:
    """Evaluation sums for this batch (they add up across batches and devices)."""
    raise NotImplementedError

  def finalize(self, stats: Mapping[str, Any]) -> dict[str, float]:
    """Turns accumulated `stats` into the task's metrics."""
    raise NotImplementedError

  @property
  def metric_names(self) -> tuple[str, ...]:
    """The metrics `finalize` reports, in table order."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Semantic(Task):
  """Semantic segmentation with `channels` classes; label -1 is ignored."""

  name: str = 'semantic'
  target_key: str = 'label'
  channels: int = 7

  def target_spec(self, height, width):
    return (height, width), np.int32

  def activate(self, logits):
    return jax.nn.log_softmax(logits, axis=-1)

  def loss(self, pred, batch):
    labels = batch[self.target_key]
    valid = (labels >= 0) & (labels < self.channels)
    picked = jnp.take_along_axis(pred, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid.astype(jnp.float32))

  def stats(self, pred, batch, example_mask):
    return metrics.semantic_stats(pred, batch[self.target_key], self.channels, example_mask)

  def finalize(self, stats):
    return metrics.semantic_metrics(stats)

  @property
  def metric_names(self):
    # Binary segmentation (pets: pet vs background) also reports the foreground F1 (Dice).
    return ('loss', 'miou', 'pix_acc') + (('fg_f1',) if self.channels == 2 else ())


@dataclasses.dataclass(frozen=True)
class Depth(Task):
  """Depth (the reference's Cityscapes files hold inverse depth); 0 marks invalid pixels."""

  name: str = 'depth'
  target_key: str = 'depth'
  channels: int = 1

  def loss(self, pred, batch):
    target = batch[self.target_key]
    mask = valid_pixels(target)[..., None]
    return jnp.sum(jnp.abs(pred - target) * mask), jnp.sum(mask)

  def stats(self, pred, batch, example_mask):
    return metrics.depth_stats(pred, batch[self.target_key], example_mask)

  def finalize(self, stats):
    return metrics.depth_metrics(stats)

  @property
  def metric_names(self):
    return ('loss', 'abs_err', 'rel_err')


@dataclasses.dataclass(frozen=True)
class Normal(Task):
  """Surface normals, predicted as unit vectors; all-zero targets mark invalid pixels."""

  name: str = 'normal'
  target_key: str = 'normal'
  channels: int = 3

  def activate(self, logits):
    # The reference divides by the L2 norm with no epsilon; a tiny floor only matters for an
    # exactly zero output, where the reference would produce NaN.
    norm = jnp.sqrt(jnp.sum(jnp.square(logits), axis=-1, keepdims=True))
    return logits / jnp.maximum(norm, 1e-12)

  def loss(self, pred, batch):
    target = batch[self.target_key]
    mask = valid_pixels(target)
    count = jnp.sum(mask)
    dot = jnp.sum(jnp.sum(pred * target, axis=-1) * mask)
    # 1 - dot_sum / count, written as a (sum, count) pair: sum = count - dot_sum.
    return count - dot, count

  def stats(self, pred, batch, example_mask):
    return metrics.normal_stats(pred, batch[self.target_key], example_mask)

  def finalize(self, stats):
    return metrics.normal_metrics(stats)

  @property
  def metric_names(self):
    return ('loss', 'mean', 'median', 'within_11_25', 'within_22_5', 'within_30')


def task_types() -> dict[str, type[Task]]:
  """Every task by config name: dense, image-level and self-supervised."""
  # Imported here: those modules import `Task` from this one.
  from mtan_jax import auxiliary_tasks, image_tasks  # pylint: disable=g-import-not-at-top
  return {'semantic': Semantic, 'depth': Depth, 'normal': Normal,
          'species': image_tasks.Species, 'bbox': image_tasks.BBox,
          'edges': auxiliary_tasks.Edges, 'colorization': auxiliary_tasks.Colorization,
          'denoising': auxiliary_tasks.Denoising}


def make_tasks(names: Sequence[str], num_classes: int,
               image_size: Sequence[int] | None = None) -> tuple[Task, ...]:
  """Builds the tasks named in the config.

  Args:
    names: task names, e.g. ('semantic', 'depth'); order fixes head and log-sigma order.
    num_classes: number of semantic classes (used by 'semantic').
    image_size: (height, width) of the model input; 'bbox' needs it (its predictions and
      targets are in pixels).

  Returns:
    A tuple of Task objects.
  """
  types = task_types()
  # Accept 'semantic,depth' and ('semantic,depth',) too: that is what a command-line override
  # `--config.tasks=semantic,depth` of a tuple field produces.
  if isinstance(names, str):
    names = (names,)
  names = tuple(n.strip() for item in names for n in str(item).split(',') if n.strip())
  if not names:
    raise ConfigError('config.tasks is empty; expected one or more of ' + ', '.join(types))
  if len(set(names)) != len(names):
    raise ConfigError(f'config.tasks={tuple(names)} names a task twice')
  tasks = []
  for name in names:
    if name not in types:
      raise ConfigError(f'unknown task {name!r} in config.tasks; expected one of {", ".join(types)}')
    if name == 'semantic':
      if int(num_classes) < 2:
        raise ConfigError(f'config.num_classes={num_classes}; expected at least 2 classes')
      tasks.append(Semantic(channels=int(num_classes)))
    elif name == 'bbox':
      if image_size is None:
        raise ConfigError('the bbox task needs the image size (its boxes are in pixels)')
      tasks.append(types[name](image_size=tuple(int(s) for s in image_size)))
    else:
      tasks.append(types[name]())
  return tuple(tasks)
