"""tf.data pipelines: deterministic order, exact resume position, padded evaluation, clear errors."""

import numpy as np
import pytest

from mtan_jax.data.pipeline import SyntheticSource, epoch_order, eval_batches, train_batches
from mtan_jax.errors import DataError

KEYS = ('image', 'label', 'depth', 'normal')


class ArraySource:
  """A tiny in-memory source whose image encodes the example index."""

  def __init__(self, n, h=32, w=32, bad_index=None):
    self.n, self.shape, self.bad_index = n, (h, w), bad_index

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if i == self.bad_index:
      raise DataError(f'/data/train/image/{i}.npy: values outside [0, 1]')
    h, w = self.shape
    return {'image': np.full((h, w, 3), i / 100, np.float32), 'label': np.full((h, w), i % 7, np.int32),
            'depth': np.full((h, w, 1), 0.1, np.float32), 'normal': np.zeros((h, w, 3), np.float32)}


def _indices(batches):
  return [int(round(v * 100)) for b in batches for v in b['image'][:, 0, 0, 0]]


def test_epoch_order_is_a_seeded_permutation_of_whole_batches():
  a = epoch_order(10, 3, epoch=0, seed=1)
  assert len(a) == 9 and len(set(a)) == 9 and set(a) <= set(range(10))
  np.testing.assert_array_equal(a, epoch_order(10, 3, epoch=0, seed=1))
  assert not np.array_equal(a, epoch_order(10, 3, epoch=1, seed=1))
  assert not np.array_equal(a, epoch_order(10, 3, epoch=0, seed=2))


def test_resuming_mid_epoch_yields_exactly_the_remaining_batches():
  source = ArraySource(20)
  full = list(train_batches(source, KEYS, 4, epoch=3, seed=0))
  tail = list(train_batches(source, KEYS, 4, epoch=3, seed=0, start_step=2))
  assert len(full) == 5 and len(tail) == 3
  assert _indices(full)[8:] == _indices(tail)
  assert _indices(full) == list(epoch_order(20, 4, 3, 0))
  assert list(train_batches(source, KEYS, 4, epoch=3, seed=0, start_step=5)) == []
  assert full[0]['label'].dtype == np.int32 and full[0]['depth'].shape == (4, 32, 32, 1)


def test_eval_batches_cover_every_example_once_with_a_padding_mask():
  batches = list(eval_batches(ArraySource(10), ('image', 'label'), 4))
  assert len(batches) == 3
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, [1] * 10 + [0] * 2)
  assert _indices(batches)[:10] == list(range(10))


def test_errors_inside_tf_data_surface_as_one_line_data_errors():
  with pytest.raises(DataError, match=r'/data/train/image/3\.npy: values outside') as info:
    list(eval_batches(ArraySource(6, bad_index=3), ('image',), 2))
  assert '\n' not in str(info.value)


def test_synthetic_source_is_deterministic_and_val_is_disjoint():
  train = SyntheticSource(4, 32, 64, seed=0)
  again = SyntheticSource(4, 32, 64, seed=0)
  val = SyntheticSource(4, 32, 64, seed=0, offset=10_000_000)
  np.testing.assert_array_equal(train[1]['image'], again[1]['image'])
  assert not np.array_equal(train[1]['image'], val[1]['image'])
  assert train[2] is train[2]  # cached after the first render
  with pytest.raises(DataError):
    SyntheticSource(0, 32, 64, seed=0)


def test_each_process_loads_only_its_rows_of_every_batch():
  source = SyntheticSource(12, 32, 64, seed=0)
  keys = ('image', 'label')
  whole = list(train_batches(source, keys, 4, epoch=1, seed=3))
  # Two "processes", each holding two rows of every global batch of 4.
  halves = [list(train_batches(source, keys, 4, epoch=1, seed=3, rows=rows)) for rows in ((0, 2), (2, 4))]
  assert len(whole) == len(halves[0]) == len(halves[1]) == 3
  for full, a, b in zip(whole, *halves):
    np.testing.assert_array_equal(np.concatenate([a['label'], b['label']]), full['label'])
  # Evaluation: padded batches split the same way, masks included.
  ev = list(eval_batches(source, keys, 8))
  ev_halves = [list(eval_batches(source, keys, 8, rows=rows)) for rows in ((0, 4), (4, 8))]
  for full, a, b in zip(ev, *ev_halves):
    np.testing.assert_array_equal(np.concatenate([a['mask'], b['mask']]), full['mask'])
    np.testing.assert_array_equal(np.concatenate([a['image'], b['image']]), full['image'])
