"""tf.data input pipelines over indexable sources (synthetic scenes or MTAN npy files).

A *source* is any object with `__len__`, `__getitem__(i) -> dict of numpy arrays` and
`shape` (H, W). Training order is a pure function of (seed, epoch): each epoch shuffles the
example indices with `np.random.default_rng([seed, epoch])`, so a resumed run starts at
exactly the same example by skipping indices, not loaded data. Batches drop the remainder
(static shapes; the reference keeps a short last batch). Evaluation batches are padded to a
fixed shape and carry a `mask` (1 = real example) instead of a short last batch.

TensorFlow is imported lazily and told to see no GPU, so it never competes with JAX for
device memory.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from mtan_jax.errors import DataError

# dtype and per-example shape (given H, W) of every target the pipeline can carry.
KEY_SPECS = {
    'image': (np.float32, 3),
    'label': (np.int32, None),
    'depth': (np.float32, 1),
    'normal': (np.float32, 3),
}


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  return tf


def example_shape(key: str, height: int, width: int) -> tuple[int, ...]:
  channels = KEY_SPECS[key][1]
  return (height, width) if channels is None else (height, width, channels)


def epoch_order(num_examples: int, batch_size: int, epoch: int, seed: int) -> np.ndarray:
  """The example indices of one training epoch, a whole number of batches long."""
  steps = num_examples // batch_size
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[:steps * batch_size]


def _data_error_from(exc: Exception) -> DataError:
  """Recovers our one-line DataError message from inside a TF op error."""
  match = re.search(r'DataError: (.*)', str(exc))
  return DataError(match.group(1).strip() if match else str(exc).splitlines()[0])


def _dataset(source, indices: np.ndarray, keys: Sequence[str], batch_size: int, with_mask: bool):
  tf = _tf()
  h, w = source.shape
  n = len(source)
  keys = tuple(keys)

  def load(i):
    i = int(i)
    example = source[min(i, n - 1)]
    out = [np.asarray(example[k], KEY_SPECS[k][0]) for k in keys]
    if with_mask:
      out.append(np.float32(i < n))
    return out

  tout = [tf.as_dtype(KEY_SPECS[k][0]) for k in keys] + ([tf.float32] if with_mask else [])

  def tf_load(i):
    values = tf.numpy_function(load, [i], tout, stateful=False)
    for k, v in zip(keys, values):
      v.set_shape(example_shape(k, h, w))
    out = dict(zip(keys, values))
    if with_mask:
      values[-1].set_shape(())
      out['mask'] = values[-1]
    return out

  ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
  ds = ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Drop remainder makes every batch shape static, so the step compiles once.
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(2)


def _iterate(ds) -> Iterator[dict[str, np.ndarray]]:
  tf = _tf()
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
                  start_step: int = 0, rows: tuple[int, int] | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of one training epoch, starting at step `start_step` of that epoch.

  Args:
    source: an indexable source.
    keys: which arrays each batch carries ('image' and targets).
    batch_size: examples per batch (global, for this process).
    epoch: epoch number; with `seed` it fixes the order.
    seed: data seed.
    start_step: batches of this epoch already consumed (resume).
    rows: with several processes, the rows [start, stop) of each global batch this process
      loads (`mtan_jax.sharding.process_rows`); None loads whole batches.

  Returns:
    An iterator of dicts of numpy arrays with a leading batch axis.
  """
  order = epoch_order(len(source), batch_size, epoch, seed)[start_step * batch_size:]
  if order.size == 0:
    return iter(())
  order, local_size = _rows_of_each_batch(order, batch_size, rows)
  return _iterate(_dataset(source, order, keys, local_size, with_mask=False))


def eval_batches(source, keys: Sequence[str], batch_size: int,
                 rows: tuple[int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in fixed-size batches; padding rows have mask 0.

  `rows` selects this process's part of each global batch, as in `train_batches`.
  """
  n = len(source)
  padded = -(-n // batch_size) * batch_size
  indices, local_size = _rows_of_each_batch(np.arange(padded), batch_size, rows)
  return _iterate(_dataset(source, indices, keys, local_size, with_mask=True))


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
