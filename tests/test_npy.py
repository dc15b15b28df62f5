"""Tests for the MTAN .npy dataset readers on tiny trees in the real layouts."""

import pathlib

import numpy as np
import pytest

from mtan_jax.data.npy import NpyDataset
from mtan_jax.errors import ConfigError, DataError

H, W = 32, 64
N = 3


def _save(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  np.save(path, array)


def _label(rng: np.random.Generator, num_classes: int, dtype=np.float64) -> np.ndarray:
  label = rng.integers(0, num_classes, size=(H, W)).astype(dtype)
  # MTAN marks ignored pixels with -1; make sure some are present.
  label[0, :5] = -1
  return label


def _normal(rng: np.random.Generator) -> np.ndarray:
  normal = rng.normal(size=(H, W, 3))
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  # Invalid pixels are zero vectors.
  normal[1, :3] = 0
  return normal


def make_cityscapes(root: pathlib.Path, split: str = 'train', n: int = N) -> pathlib.Path:
  """Writes a Cityscapes-layout split with float64 files, as the released data has."""
  rng = np.random.default_rng(0)
  for i in range(n):
    _save(root / split / 'image' / f'{i}.npy', rng.uniform(size=(H, W, 3)))
    for name, classes in (('label_2', 2), ('label_7', 7), ('label_19', 19)):
      _save(root / split / name / f'{i}.npy', _label(rng, classes))
    _save(root / split / 'depth' / f'{i}.npy', rng.uniform(0, 0.49, size=(H, W, 1)))
  return root


def make_nyuv2(root: pathlib.Path, split: str = 'train', n: int = N) -> pathlib.Path:
  """Writes an NYUv2-layout split with float32 images and float64 labels/depth/normals."""
  rng = np.random.default_rng(1)
  for i in range(n):
    _save(root / split / 'image' / f'{i}.npy', rng.uniform(size=(H, W, 3)).astype(np.float32))
    _save(root / split / 'label' / f'{i}.npy', _label(rng, 13))
    depth = rng.uniform(0, 10, size=(H, W, 1))
    depth[2, :4] = 0
    _save(root / split / 'depth' / f'{i}.npy', depth)
    _save(root / split / 'normal' / f'{i}.npy', _normal(rng))
  return root


def assert_data_error(names, fn, *args, **kwargs) -> str:
  """Asserts `fn` raises a one-line DataError mentioning every string in `names`."""
  with pytest.raises(DataError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert '\n' not in message
  for name in names:
    assert str(name) in message, message
  return message


# ---------------------------------------------------------------- loading


def test_cityscapes_loads_dtypes_shapes_and_values(tmp_path):
  root = make_cityscapes(tmp_path)
  ds = NpyDataset(root, 'train', 'cityscapes')
  assert len(ds) == N
  assert ds.shape == (H, W)
  assert ds.tasks == ('semantic', 'depth')
  assert ds.num_classes == 7
  example = ds[1]
  assert set(example) == {'image', 'label', 'depth'}
  assert example['image'].dtype == np.float32 and example['image'].shape == (H, W, 3)
  assert example['label'].dtype == np.int32 and example['label'].shape == (H, W)
  assert example['depth'].dtype == np.float32 and example['depth'].shape == (H, W, 1)
  np.testing.assert_allclose(example['image'], np.load(root / 'train/image/1.npy'), rtol=1e-6)
  np.testing.assert_array_equal(example['label'], np.load(root / 'train/label_7/1.npy'))
  np.testing.assert_allclose(example['depth'], np.load(root / 'train/depth/1.npy'), rtol=1e-6)
  assert example['label'].min() == -1


@pytest.mark.parametrize('label_dir,classes', [('label_2', 2), ('label_7', 7), ('label_19', 19)])
def test_cityscapes_label_dirs_set_num_classes(tmp_path, label_dir, classes):
  ds = NpyDataset(make_cityscapes(tmp_path), 'train', 'cityscapes', label_dir=label_dir)
  assert ds.num_classes == classes
  np.testing.assert_array_equal(ds[0]['label'],
                                np.load(tmp_path / 'train' / label_dir / '0.npy'))


def test_nyuv2_loads_all_tasks(tmp_path):
  root = make_nyuv2(tmp_path)
  ds = NpyDataset(root, 'train', 'nyuv2')
  assert ds.tasks == ('semantic', 'depth', 'normal')
  assert ds.label_dir == 'label' and ds.num_classes == 13
  example = ds[2]
  assert set(example) == {'image', 'label', 'depth', 'normal'}
  assert example['normal'].dtype == np.float32 and example['normal'].shape == (H, W, 3)
  assert example['label'].dtype == np.int32
  np.testing.assert_allclose(example['normal'], np.load(root / 'train/normal/2.npy'), rtol=1e-6)
  np.testing.assert_array_equal(example['label'], np.load(root / 'train/label/2.npy'))


def test_integer_labels_and_float32_files(tmp_path):
  root = make_nyuv2(tmp_path)
  np.save(root / 'train/label/0.npy', np.load(root / 'train/label/0.npy').astype(np.int64))
  np.save(root / 'train/depth/0.npy', np.load(root / 'train/depth/0.npy').astype(np.float32))
  example = NpyDataset(root, 'train', 'nyuv2')[0]
  assert example['label'].dtype == np.int32
  assert example['depth'].dtype == np.float32


def test_task_selection_only_needs_selected_dirs(tmp_path):
  root = make_nyuv2(tmp_path)
  for path in (root / 'train/label').iterdir():
    path.unlink()
  (root / 'train/label').rmdir()
  ds = NpyDataset(root, 'train', 'nyuv2', tasks=('depth', 'normal'))
  assert set(ds[0]) == {'image', 'depth', 'normal'}
  assert set(NpyDataset(root, 'train', 'nyuv2', tasks=('depth',))[0]) == {'image', 'depth'}


def test_indexing_and_iteration(tmp_path):
  ds = NpyDataset(make_cityscapes(tmp_path), 'train', 'cityscapes', tasks=('depth',))
  np.testing.assert_array_equal(ds[-1]['image'], ds[N - 1]['image'])
  assert ds[np.int64(0)]['image'].shape == (H, W, 3)
  assert len(list(ds)) == N
  with pytest.raises(IndexError):
    ds[N]


def test_other_files_are_ignored(tmp_path):
  root = make_cityscapes(tmp_path)
  (root / 'train/image/README.txt').write_text('notes')
  assert len(NpyDataset(root, 'train', 'cityscapes')) == N


def test_custom_label_dir_with_num_classes(tmp_path):
  root = make_cityscapes(tmp_path)
  (root / 'train/label_7').rename(root / 'train/my_labels')
  ds = NpyDataset(root, 'train', 'cityscapes', label_dir='my_labels', num_classes=7)
  assert ds[0]['label'].max() < 7


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize('kwargs,needle', [
    ({'layout': 'kitti'}, 'kitti'),
    ({'layout': 'cityscapes', 'tasks': ('semantic', 'normal')}, 'normal'),
    ({'layout': 'nyuv2', 'tasks': ('semantic', 'edges')}, 'edges'),
    ({'layout': 'nyuv2', 'tasks': 'depth'}, 'depth'),
    ({'layout': 'cityscapes', 'label_dir': 'my_labels'}, 'my_labels'),
    ({'layout': 'nyuv2', 'num_classes': 0}, 'num_classes'),
])
def test_invalid_arguments_raise_config_error(tmp_path, kwargs, needle):
  with pytest.raises(ConfigError) as info:
    NpyDataset(tmp_path, 'train', **kwargs)
  assert needle in str(info.value) and '\n' not in str(info.value)


def test_cityscapes_normal_error_says_no_normals(tmp_path):
  with pytest.raises(ConfigError, match='cityscapes has no normal'):
    NpyDataset(make_cityscapes(tmp_path), 'train', 'cityscapes', tasks=('normal',))


# ---------------------------------------------------------------- structure errors


def test_missing_root(tmp_path):
  assert_data_error([tmp_path / 'nope', 'does not exist'], NpyDataset, tmp_path / 'nope',
                    'train', 'nyuv2')


def test_root_is_a_file(tmp_path):
  (tmp_path / 'file').write_text('x')
  assert_data_error([tmp_path / 'file', 'not a directory'], NpyDataset, tmp_path / 'file',
                    'train', 'nyuv2')


def test_missing_split_lists_contents(tmp_path):
  root = make_nyuv2(tmp_path)
  assert_data_error([root / 'val', 'train'], NpyDataset, root, 'val', 'nyuv2')


def test_missing_subdir_lists_contents(tmp_path):
  root = make_cityscapes(tmp_path)
  for path in (root / 'train/depth').iterdir():
    path.unlink()
  (root / 'train/depth').rmdir()
  assert_data_error([root / 'train' / 'depth', 'image', 'label_19', 'label_7'], NpyDataset,
                    root, 'train', 'cityscapes')


def test_missing_normal_dir(tmp_path):
  root = make_cityscapes(tmp_path)
  assert_data_error([root / 'train' / 'normal', 'label_19'], NpyDataset, root, 'train', 'nyuv2',
                    label_dir='label_7', num_classes=7)


def test_missing_label_dir(tmp_path):
  root = make_nyuv2(tmp_path)
  assert_data_error([root / 'train' / 'label_7', 'label'], NpyDataset, root, 'train',
                    'cityscapes')


def test_no_npy_files(tmp_path):
  root = make_cityscapes(tmp_path)
  for path in (root / 'train/depth').iterdir():
    path.unlink()
  assert_data_error([root / 'train' / 'depth', 'no .npy files'], NpyDataset, root, 'train',
                    'cityscapes')


def test_gap_names_first_missing_file(tmp_path):
  root = make_cityscapes(tmp_path, n=4)
  (root / 'train/image/1.npy').unlink()
  (root / 'train/image/2.npy').unlink()
  assert_data_error([root / 'train' / 'image' / '1.npy', 'missing'], NpyDataset, root, 'train',
                    'cityscapes')


def test_gap_when_zero_is_missing(tmp_path):
  root = make_cityscapes(tmp_path)
  (root / 'train/depth/0.npy').unlink()
  assert_data_error([root / 'train' / 'depth' / '0.npy'], NpyDataset, root, 'train',
                    'cityscapes')


@pytest.mark.parametrize('name', ['a.npy', '01.npy', 'image_3.npy'])
def test_bad_file_names(tmp_path, name):
  root = make_cityscapes(tmp_path)
  np.save(root / 'train/label_7' / name, np.zeros((H, W)))
  assert_data_error([root / 'train' / 'label_7' / name], NpyDataset, root, 'train',
                    'cityscapes')


def test_count_mismatch_names_both_dirs(tmp_path):
  root = make_cityscapes(tmp_path)
  (root / 'train/depth/2.npy').unlink()
  assert_data_error([root / 'train' / 'depth', root / 'train' / 'image', '2 .npy', 'has 3'],
                    NpyDataset, root, 'train', 'cityscapes')


# ---------------------------------------------------------------- header errors


@pytest.mark.parametrize('content', [b'', b'not an npy file', b'\x93NUMPY\x01\x00\x10\x00{bad'])
def test_corrupt_header(tmp_path, content):
  root = make_nyuv2(tmp_path)
  (root / 'train/normal/1.npy').write_bytes(content)
  assert_data_error([root / 'train' / 'normal' / '1.npy', 'not a valid .npy'], NpyDataset,
                    root, 'train', 'nyuv2')


def test_truncated_file(tmp_path):
  root = make_nyuv2(tmp_path)
  path = root / 'train/depth/2.npy'
  path.write_bytes(path.read_bytes()[:-100])
  assert_data_error([path, 'truncated'], NpyDataset, root, 'train', 'nyuv2')


@pytest.mark.parametrize('subdir,array,needle', [
    ('image', np.zeros((H, W)), '(32, 64, 3)'),
    ('image', np.zeros((H, W, 4)), '(32, 64, 3)'),
    ('label', np.zeros((H, W, 1)), '(32, 64)'),
    ('depth', np.zeros((H, W)), '(32, 64, 1)'),
    ('normal', np.zeros((H, W, 1)), '(32, 64, 3)'),
    ('depth', np.zeros((H, 2 * W, 1)), '(32, 64, 1)'),
    ('label', np.zeros((W, H)), '(32, 64)'),
])
def test_shape_mismatch(tmp_path, subdir, array, needle):
  root = make_nyuv2(tmp_path)
  path = root / 'train' / subdir / '2.npy'
  np.save(path, array)
  message = assert_data_error([path, needle], NpyDataset, root, 'train', 'nyuv2')
  assert str(array.shape) in message


def test_first_image_shape_is_checked(tmp_path):
  root = make_nyuv2(tmp_path)
  np.save(root / 'train/image/0.npy', np.zeros((H, W, 1)))
  assert_data_error([root / 'train' / 'image' / '0.npy', '(H, W, 3)'], NpyDataset, root,
                    'train', 'nyuv2')


def test_image_size_mismatch_across_examples(tmp_path):
  root = make_nyuv2(tmp_path)
  path = root / 'train/image/1.npy'
  np.save(path, np.zeros((2 * H, W, 3)))
  assert_data_error([path, '(64, 64, 3)', '(32, 64, 3)'], NpyDataset, root, 'train', 'nyuv2')


def test_size_not_divisible_by_32(tmp_path):
  root = tmp_path
  for sub, shape in (('image', (30, 64, 3)), ('depth', (30, 64, 1)), ('label_7', (30, 64))):
    _save(root / 'train' / sub / '0.npy', np.zeros(shape))
  assert_data_error([root / 'train' / 'image' / '0.npy', '(30, 64)', '32'], NpyDataset, root,
                    'train', 'cityscapes')


@pytest.mark.parametrize('array', [
    np.array([['a'] * W] * H),
    np.zeros((H, W), dtype=bool),
    np.zeros((H, W), dtype=np.complex64),
])
def test_non_numeric_dtype(tmp_path, array):
  root = make_cityscapes(tmp_path)
  path = root / 'train/label_7/0.npy'
  np.save(path, array)
  assert_data_error([path, str(array.dtype), 'float or integer'], NpyDataset, root, 'train',
                    'cityscapes')


def test_object_dtype(tmp_path):
  root = make_cityscapes(tmp_path)
  path = root / 'train/depth/1.npy'
  np.save(path, np.empty((H, W, 1), dtype=object), allow_pickle=True)
  assert_data_error([path, 'object'], NpyDataset, root, 'train', 'cityscapes')


# ---------------------------------------------------------------- value errors


def _corrupt(root: pathlib.Path, rel: str, fn) -> pathlib.Path:
  path = root / 'train' / rel
  array = np.load(path)
  fn(array)
  np.save(path, array)
  return path


@pytest.mark.parametrize('rel', ['image/1.npy', 'label/1.npy', 'depth/1.npy', 'normal/1.npy'])
@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_non_finite_values(tmp_path, rel, bad):
  root = make_nyuv2(tmp_path)
  path = _corrupt(root, rel, lambda a: a.__setitem__((3, 4), bad))
  ds = NpyDataset(root, 'train', 'nyuv2')
  ds[0]
  assert_data_error([path, str(bad), '(3, 4'], ds.__getitem__, 1)


def test_image_out_of_range_hints_255(tmp_path):
  root = make_nyuv2(tmp_path)
  path = _corrupt(root, 'image/0.npy', lambda a: a.__imul__(255))
  message = assert_data_error([path, '[0, 1]', '255'], NpyDataset(root, 'train',
                                                                   'nyuv2').__getitem__, 0)
  assert 'divide by 255' in message


def test_image_negative(tmp_path):
  root = make_nyuv2(tmp_path)
  path = _corrupt(root, 'image/0.npy', lambda a: a.__setitem__((0, 0, 0), -0.5))
  message = assert_data_error([path, '-0.5', '[0, 1]'],
                              NpyDataset(root, 'train', 'nyuv2').__getitem__, 0)
  assert 'divide by 255' not in message


def test_image_within_tolerance(tmp_path):
  root = make_nyuv2(tmp_path)
  _corrupt(root, 'image/0.npy', lambda a: a.__setitem__((0, 0, 0), 1.0005))
  assert NpyDataset(root, 'train', 'nyuv2')[0]['image'].max() == pytest.approx(1.0005)


def test_label_not_integral(tmp_path):
  root = make_nyuv2(tmp_path)
  path = _corrupt(root, 'label/0.npy', lambda a: a.__setitem__((5, 6), 2.5))
  assert_data_error([path, '2.5', '(5, 6)', 'integral'],
                    NpyDataset(root, 'train', 'nyuv2').__getitem__, 0)


@pytest.mark.parametrize('value', [13, -2, 255])
def test_label_out_of_range(tmp_path, value):
  root = make_nyuv2(tmp_path)
  path = _corrupt(root, 'label/0.npy', lambda a: a.__setitem__((5, 6), value))
  message = assert_data_error([path, f'label value {value}', '-1', '0..12'],
                              NpyDataset(root, 'train', 'nyuv2').__getitem__, 0)
  assert ('ignored pixels with -1' in message) == (value == 255)


def test_label_range_follows_label_dir(tmp_path):
  root = make_cityscapes(tmp_path)
  path = _corrupt(root, 'label_2/0.npy', lambda a: a.__setitem__((0, 0), 5))
  ds = NpyDataset(root, 'train', 'cityscapes', label_dir='label_2')
  assert_data_error([path, 'label value 5', '0..1'], ds.__getitem__, 0)
  # The same value is fine with 7 classes.
  _corrupt(root, 'label_7/0.npy', lambda a: a.__setitem__((0, 0), 5))
  assert NpyDataset(root, 'train', 'cityscapes')[0]['label'][0, 0] == 5


def test_negative_depth(tmp_path):
  root = make_cityscapes(tmp_path)
  path = _corrupt(root, 'depth/2.npy', lambda a: a.__setitem__((1, 1, 0), -0.25))
  assert_data_error([path, '-0.25', '>= 0'],
                    NpyDataset(root, 'train', 'cityscapes').__getitem__, 2)


@pytest.mark.parametrize('layout,maker,value', [
    ('cityscapes', make_cityscapes, 80.0),
    ('nyuv2', make_nyuv2, 4000.0),
])
def test_depth_above_sanity_range(tmp_path, layout, maker, value):
  root = maker(tmp_path)
  path = _corrupt(root, 'depth/0.npy', lambda a: a.__setitem__((1, 1, 0), value))
  assert_data_error([path, f'{value:g}', layout], NpyDataset(root, 'train', layout).__getitem__,
                    0)


def test_normal_too_long(tmp_path):
  root = make_nyuv2(tmp_path)
  path = _corrupt(root, 'normal/1.npy', lambda a: a.__setitem__((7, 8), [1.0, 1.0, 0.0]))
  assert_data_error([path, '1.41421', '(7, 8)', '1.01'],
                    NpyDataset(root, 'train', 'nyuv2').__getitem__, 1)


def test_normal_float_noise_accepted(tmp_path):
  root = make_nyuv2(tmp_path)
  _corrupt(root, 'normal/1.npy', lambda a: a.__setitem__((7, 8), [1.005, 0.0, 0.0]))
  assert NpyDataset(root, 'train', 'nyuv2')[1]['normal'].shape == (H, W, 3)


def test_error_raised_on_load_not_construction(tmp_path):
  root = make_nyuv2(tmp_path)
  _corrupt(root, 'depth/2.npy', lambda a: a.__setitem__((0, 0, 0), -1.0))
  ds = NpyDataset(root, 'train', 'nyuv2')
  ds[0]
  with pytest.raises(DataError):
    ds[2]
