"""tf.data pipelines: deterministic order, exact resume position, padded evaluation, clear errors."""

import numpy as np
import pytest

from mtan_jax.data.pipeline import (SyntheticSource, Transforms, epoch_order, eval_batches, train_batches,
                                    transforms_from_config)
from mtan_jax.errors import ConfigError, DataError

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


class TextureSource(ArraySource):
  """ArraySource with textured images (a bright square per example) and real normals."""

  def __getitem__(self, i):
    example = dict(super().__getitem__(i))
    h, w = self.shape
    image = np.full((h, w, 3), 0.2, np.float32)
    image[4 + i % 8:20 + i % 8, 6:22] = (0.9, 0.5, 0.1)
    normal = np.zeros((h, w, 3), np.float32)
    normal[..., 0] = 0.6
    normal[..., 2] = 0.8
    return {**example, 'image': image, 'normal': normal}


def test_self_supervised_targets_and_inputs():
  source = TextureSource(8)
  keys = ('image', 'label', 'edges', 'ab', 'clean')
  tr = Transforms(edges=True, colorization=True, denoising=True, noise_sigma=20.0)
  batch = next(iter(eval_batches(source, keys, 4, transforms=tr)))
  # The model sees one channel (L of the noisy image); targets come from the clean image.
  assert batch['image'].shape == (4, 32, 32, 1) and batch['ab'].shape == (4, 32, 32, 2)
  np.testing.assert_array_equal(batch['clean'][0], source[0]['image'])
  assert batch['edges'].shape == (4, 32, 32, 1) and set(np.unique(batch['edges'])) == {0.0, 1.0}
  # Edges lie on the square's outline only (the background is flat).
  ys, xs = np.nonzero(batch['edges'][0, ..., 0])
  assert ys.min() >= 2 and ys.max() <= 21 and xs.min() >= 4 and xs.max() <= 23
  # Noise of std 20/255 on L: the L channel is not the clean one, and is deterministic.
  again = next(iter(eval_batches(source, keys, 4, transforms=tr)))
  np.testing.assert_array_equal(batch['image'], again['image'])
  clean_l = next(iter(eval_batches(source, ('image',), 4, transforms=Transforms(colorization=True))))['image']
  assert 0.005 < np.abs(batch['image'] - clean_l).mean() < 0.1


def test_augmentation_is_per_epoch_deterministic_and_train_only():
  source = TextureSource(8)
  keys = ('image', 'depth', 'normal')
  tr = Transforms(augment=True)
  a = list(train_batches(source, keys, 4, epoch=0, seed=1, transforms=tr))
  b = list(train_batches(source, keys, 4, epoch=0, seed=1, transforms=tr))
  c = list(train_batches(source, keys, 4, epoch=1, seed=1, transforms=tr))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  plain = list(train_batches(source, keys, 4, epoch=0, seed=1))
  assert any(not np.array_equal(x['image'], p['image']) for x, p in zip(a, plain))
  assert any(not np.array_equal(np.sort(x['image'].ravel()), np.sort(y['image'].ravel()))
             for x, y in zip(a, c))
  # Depth is divided by the chosen scale; normals keep |x| = 0.6 (negated when flipped).
  depths = {round(float(v), 5) for v in np.unique(np.concatenate([x['depth'] for x in a]))}
  assert depths <= {0.1, 0.08333, 0.06667}, depths
  assert {round(float(v), 5) for v in np.unique(np.concatenate([x['normal'][..., 0] for x in a]))} <= {0.6, -0.6}
  # Evaluation never augments.
  ev = next(iter(eval_batches(source, keys, 4, transforms=tr)))
  np.testing.assert_array_equal(ev['image'][1], source[1]['image'])


def test_transform_config_errors():
  from configs import mtan  # pylint: disable=import-outside-toplevel
  for key, value, match in [('augment_scales', (0.5,), 'augment_scales'), ('noise_sigma', 0.0, 'noise_sigma'),
                            ('edge_low', 0.5, 'edge_low'), ('edge_sigma', -1.0, 'edge_sigma')]:
    config = mtan.get_config('runlocal')
    config[key] = value
    with pytest.raises(ConfigError, match=match):
      transforms_from_config(config, ('semantic',))
