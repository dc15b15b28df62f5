"""tf.data input pipelines over indexable sources (synthetic scenes, npy files, TFDS datasets).

A *source* is any object with `__len__`, `__getitem__(i) -> dict of numpy arrays` and
`shape` (H, W), the model's input resolution. A source whose stored examples are not yet at
that resolution (encoded JPEGs of any size, as Oxford-IIIT Pet) also has `raw_signature`
(key -> tf.TensorSpec of what `__getitem__` returns) and `decode(raw) -> example`, a pure
TensorFlow function; decoding then runs in tf.data's parallel map, outside the Python GIL.

Per example, after loading and decoding (all TensorFlow ops, `Transforms`):

1. augmentation (training only, off by default): the MTAN reference's NYUv2 random
   scale-crop and horizontal flip (`mtan_jax.data.augment`), applied to the image and
   every target alike;
2. self-supervised targets from the (augmented) clean image (`mtan_jax.data.aux_targets`):
   Canny edges, Lab a/b for colorization, the clean image for denoising;
3. the model input: the noisy image when denoising is trained, its L channel when
   colorization is trained.

Training order is a pure function of (seed, epoch): each epoch shuffles the example indices
with `np.random.default_rng([seed, epoch])`, so a resumed run starts at exactly the same
example by skipping indices, not loaded data. Random augmentation and noise are stateless
functions of (seed, epoch, example index), so a resumed run also sees the same crops, flips
and noise: the step stored in the checkpoint is the whole iterator position. Batches drop
the remainder (static shapes; the reference keeps a short last batch). Evaluation batches
are padded to a fixed shape and carry a `mask` (1 = real example) instead of a short last
batch; evaluation never augments, and its denoising noise depends on the index only.

TensorFlow is imported lazily and told to see no GPU, so it never competes with JAX for
device memory.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mtan_jax.errors import ConfigError, DataError

# dtype and per-example shape of every array a batch can carry: 'HW' stands for the image
# size, a number for the channel count (the image's channels depend on `Transforms`).
KEY_SPECS = {
    'image': (np.float32, ('H', 'W', 3)),
    'label': (np.int32, ('H', 'W')),
    'depth': (np.float32, ('H', 'W', 1)),
    'normal': (np.float32, ('H', 'W', 3)),
    'species': (np.int32, ()),
    'bbox': (np.float32, (4,)),
    # Self-supervised targets: made by the pipeline, never read from a source.
    'edges': (np.float32, ('H', 'W', 1)),
    'ab': (np.float32, ('H', 'W', 2)),
    'clean': (np.float32, ('H', 'W', 3)),
}
PIPELINE_KEYS = ('edges', 'ab', 'clean')


def import_tensorflow():
  """Imports TensorFlow on first use, hiding GPUs from it so that it leaves them to JAX."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # TensorFlow initialised its devices already, with GPUs hidden by an earlier call.
  return tf


def example_shape(key: str, height: int, width: int, image_channels: int = 3) -> tuple[int, ...]:
  """Per-example shape of `key` at input resolution (height, width)."""
  template = KEY_SPECS[key][1]
  shape = tuple(height if d == 'H' else width if d == 'W' else d for d in template)
  return shape[:2] + (image_channels,) if key == 'image' else shape


@dataclasses.dataclass(frozen=True)
class Transforms:
  """What the pipeline does to every example after loading (see the module docstring).

  Attributes:
    augment: random scale-crop + flip on training examples (the reference's NYUv2 option).
    scales: crop scales to choose from uniformly.
    flip: also flip horizontally with probability 1/2.
    edges: make the 'edges' target (Canny, `edge_sigma`, `edge_low`, `edge_high`).
    colorization: make the 'ab' target and feed the model the L channel only.
    denoising: make the 'clean' target and feed the model the image with Gaussian noise of
      std `noise_sigma` on the 0-255 scale.
  """
  augment: bool = False
  scales: tuple[float, ...] = (1.0, 1.2, 1.5)
  flip: bool = True
  edges: bool = False
  colorization: bool = False
  denoising: bool = False
  noise_sigma: float = 2.0
  edge_sigma: float = 1.0
  edge_low: float = 0.1
  edge_high: float = 0.2

  @property
  def image_channels(self) -> int:
    """Channels of the model input: 1 (L) with colorization, else 3 (RGB)."""
    return 1 if self.colorization else 3


def transforms_from_config(config, task_names: Sequence[str]) -> Transforms:
  """The `Transforms` a run's config and tasks ask for; one-line ConfigErrors on bad values."""
  scales = tuple(float(s) for s in config.augment_scales)
  if not scales or any(not s >= 1.0 for s in scales):
    raise ConfigError(f'config.augment_scales={scales}; expected one or more scales >= 1 '
                      f'(the reference uses (1.0, 1.2, 1.5))')
  if not config.noise_sigma > 0:
    raise ConfigError(f'config.noise_sigma={config.noise_sigma}; expected > 0 (std on the 0-255 scale)')
  if not 0 <= config.edge_low <= config.edge_high:
    raise ConfigError(f'config.edge_low={config.edge_low}, config.edge_high={config.edge_high}; '
                      f'expected 0 <= edge_low <= edge_high')
  if not config.edge_sigma > 0:
    raise ConfigError(f'config.edge_sigma={config.edge_sigma}; expected > 0')
  return Transforms(augment=bool(config.augment), scales=scales, flip=bool(config.augment_flip),
                    edges='edges' in task_names, colorization='colorization' in task_names,
                    denoising='denoising' in task_names, noise_sigma=float(config.noise_sigma),
                    edge_sigma=float(config.edge_sigma), edge_low=float(config.edge_low),
                    edge_high=float(config.edge_high))


def epoch_order(num_examples: int, batch_size: int, epoch: int, seed: int) -> np.ndarray:
  """The example indices of one training epoch, a whole number of batches long."""
  steps = num_examples // batch_size
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[:steps * batch_size]


def _data_error_from(exc: Exception) -> DataError:
  """Recovers our one-line DataError message from inside a TF op error."""
  match = re.search(r'DataError: (.*)', str(exc))
  return DataError(match.group(1).strip() if match else str(exc).splitlines()[0])


def _raw_signature(source, keys: Sequence[str]) -> dict[str, Any]:
  """key -> tf.TensorSpec of what `source[i]` returns for the keys the batches need."""
  tf = import_tensorflow()
  signature = getattr(source, 'raw_signature', None)
  if signature is not None:
    return dict(signature)
  h, w = source.shape
  return {k: tf.TensorSpec(example_shape(k, h, w), tf.as_dtype(KEY_SPECS[k][0]))
          for k in keys if k not in PIPELINE_KEYS}


def _transform(example: dict, transforms: Transforms, train: bool, seeds) -> dict:
  """Steps 1-3 of the module docstring on one decoded example (TensorFlow ops)."""
  tf = import_tensorflow()
  example = dict(example)
  if transforms.edges or transforms.colorization or transforms.denoising:
    from mtan_jax.data import aux_targets  # pylint: disable=g-import-not-at-top
  if train and transforms.augment:
    from mtan_jax.data import augment  # pylint: disable=g-import-not-at-top
    example = augment.augment(example, seeds[0], scales=transforms.scales, flip=transforms.flip)
  clean = example['image']
  if transforms.edges:
    example['edges'] = aux_targets.canny_edges(clean, sigma=transforms.edge_sigma,
                                               low=transforms.edge_low, high=transforms.edge_high)
  image = clean
  if transforms.denoising:
    example['clean'] = clean
    image = aux_targets.add_gaussian_noise(clean, transforms.noise_sigma, seeds[1])
  if transforms.colorization:
    lightness, example['ab'] = aux_targets.colorization(clean)
    # One Lab conversion when the input is the clean image; with denoising, L of the noisy one.
    image = aux_targets.colorization(image)[0] if transforms.denoising else lightness
  example['image'] = tf.cast(image, tf.float32)
  return example


def _dataset(source, indices: np.ndarray, keys: Sequence[str], batch_size: int, with_mask: bool,
             transforms: Transforms, seed: int, epoch: int | None):
  tf = import_tensorflow()
  h, w = source.shape
  n = len(source)
  keys = tuple(keys)
  signature = _raw_signature(source, keys)
  raw_keys = tuple(signature)
  decode = getattr(source, 'decode', None)

  def load(i):
    example = source[min(int(i), n - 1)]
    return [example[k] if signature[k].dtype == tf.string
            else np.asarray(example[k], signature[k].dtype.as_numpy_dtype) for k in raw_keys]

  # Per-example random streams: a pure function of (seed, epoch, index); evaluation uses a
  # stream of its own (epoch None).
  stream = np.int64(seed) * 1_000_003 + (0 if epoch is None else epoch + 1)

  def tf_load(i):
    values = tf.numpy_function(load, [i], [signature[k].dtype for k in raw_keys], stateful=False)
    raw = {}
    for k, v in zip(raw_keys, values):
      v.set_shape(signature[k].shape)
      raw[k] = v
    example = decode(raw) if decode is not None else raw
    seeds = [tf.stack([stream, 2 * i]), tf.stack([stream, 2 * i + 1])]
    example = _transform(example, transforms, train=epoch is not None, seeds=seeds)
    out = {}
    for k in keys:
      out[k] = tf.ensure_shape(tf.cast(example[k], KEY_SPECS[k][0]),
                               example_shape(k, h, w, transforms.image_channels))
    if with_mask:
      out['mask'] = tf.cast(i < n, tf.float32)
    return out

  ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
  ds = ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Drop remainder makes every batch shape static, so the step compiles once.
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(2)


def _iterate(ds) -> Iterator[dict[str, np.ndarray]]:
  tf = import_tensorflow()
  it = ds.as_numpy_iterator()
  while True:
    try:
      yield next(it)
    except StopIteration:
      return
    except tf.errors.OpError as exc:
      raise _data_error_from(exc) from None


def _rows_of_each_batch(indices: np.ndarray, batch_size: int,
                        rows: tuple[int, int] | None) -> tuple[np.ndarray, int]:
  """This process's rows [start, stop) of every global batch in `indices`, and their count."""
  if rows is None:
    return indices, batch_size
  start, stop = rows
  if not 0 <= start < stop <= batch_size:
    raise ValueError(f'rows {rows} do not lie inside a batch of {batch_size}')
  return indices.reshape(-1, batch_size)[:, start:stop].reshape(-1), stop - start


def train_batches(source, keys: Sequence[str], batch_size: int, epoch: int, seed: int,
                  start_step: int = 0, rows: tuple[int, int] | None = None,
                  transforms: Transforms = Transforms()) -> Iterator[dict[str, np.ndarray]]:
  """Batches of one training epoch, starting at step `start_step` of that epoch.

  Args:
    source: an indexable source.
    keys: which arrays each batch carries ('image' and targets).
    batch_size: examples per batch (global, for this process).
    epoch: epoch number; with `seed` it fixes the order and the random augmentation.
    seed: data seed.
    start_step: batches of this epoch already consumed (resume).
    rows: with several processes, the rows [start, stop) of each global batch this process
      loads (`mtan_jax.sharding.process_rows`); None loads whole batches. A process reads
      only the examples of its rows.
    transforms: augmentation and self-supervised targets.

  Returns:
    An iterator of dicts of numpy arrays with a leading batch axis.
  """
  order = epoch_order(len(source), batch_size, epoch, seed)[start_step * batch_size:]
  if order.size == 0:
    return iter(())
  order, local_size = _rows_of_each_batch(order, batch_size, rows)
  return _iterate(_dataset(source, order, keys, local_size, False, transforms, seed, epoch))


def eval_batches(source, keys: Sequence[str], batch_size: int,
                 rows: tuple[int, int] | None = None, transforms: Transforms = Transforms(),
                 seed: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in fixed-size batches; padding rows have mask 0.

  `rows` selects this process's part of each global batch, as in `train_batches`;
  `transforms` make the self-supervised targets (augmentation is never applied here).
  """
  n = len(source)
  padded = -(-n // batch_size) * batch_size
  indices, local_size = _rows_of_each_batch(np.arange(padded), batch_size, rows)
  return _iterate(_dataset(source, indices, keys, local_size, True, transforms, seed, None))


class SyntheticSource:
  """Built-in synthetic street scenes (`mtan_jax.data.synthetic`) as an indexable source.

  Scenes are rendered on first use and kept in memory (the render costs far more than the
  copy), so every epoch after the first reads from RAM.
  """

  def __init__(self, num_examples: int, height: int, width: int, seed: int, offset: int = 0):
    if num_examples < 1:
      raise DataError(f'synthetic data needs at least 1 example, got {num_examples}')
    self.num_examples = int(num_examples)
    self.shape = (int(height), int(width))
    self.seed = int(seed)
    self.offset = int(offset)
    self.num_classes = 7
    self._cache: dict[int, Mapping[str, Any]] = {}

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Mapping[str, np.ndarray]:
    from mtan_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    if index not in self._cache:
      self._cache[index] = synthetic.render_scene(self.offset + index, *self.shape, seed=self.seed)
    return self._cache[index]
