"""Tests for raw Cityscapes -> TFDS cityscapes_mtan, on tiny fake trees in the official naming.

The fake raw images are 256x512 (Cityscapes' 1:2 aspect, 2x the 128x256 output) and hold
uniform 32x32 blocks, so nearest-neighbour resizing keeps a known value per output block
of 16x16 and the mapped labels and inverse depths can be checked by hand.
"""

import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from mtan_jax.data import cityscapes_tfds as cs
from mtan_jax.data.npy import NpyDataset
from mtan_jax.errors import ConfigError, DataError

RAW_H, RAW_W = 256, 512
BLOCK = 32  # raw pixels; 16 output pixels at 128x256
# (split, city, seq, frame): 3 train + 2 val frames over 2 cities per split.
FRAMES = (
    ('train', 'aachen', '000000', '000019'),
    ('train', 'aachen', '000001', '000019'),
    ('train', 'bochum', '000000', '000313'),
    ('val', 'frankfurt', '000000', '000294'),
    ('val', 'lindau', '000000', '000019'),
)
# Label id per block (block row 0 of every frame), and what it must become.
#   id: (name, label_19, label_7)
KNOWN_LABELS = {
    7: ('road', 0, 0),
    26: ('car', 13, 6),
    0: ('unlabeled', -1, -1),
    9: ('parking', -1, 0),       # ignoreInEval, but non-void: keeps category flat
    23: ('sky', 10, 4),
    33: ('bicycle', 18, 6),
    4: ('static', -1, -1),       # void
    30: ('trailer', -1, 6),      # ignoreInEval vehicle
}
# Disparity PNG value per block (block row 1) and its inverse depth (p - 1) / 65536.
KNOWN_DISPARITY = {0: 0.0, 1: 0.0, 257: 256 / 65536, 12801: 0.1953125, 32257: 0.4921875}
# Per-frame marker label (bottom-left block): road, building, pole, vegetation, sky map to
# categories 0..4, so the category there is the frame's index in file-name order.
MARKERS = (7, 11, 17, 21, 23)


def _label_ids(index: int) -> np.ndarray:
  ids = np.full((RAW_H, RAW_W), 12, np.uint8)  # wall elsewhere
  for b, label_id in enumerate(KNOWN_LABELS):
    ids[:BLOCK, b * BLOCK:(b + 1) * BLOCK] = label_id
  ids[-BLOCK:, :BLOCK] = MARKERS[index]
  return ids


def _disparity() -> np.ndarray:
  p = np.full((RAW_H, RAW_W), 5000, np.uint16)
  for b, value in enumerate(KNOWN_DISPARITY):
    p[BLOCK:2 * BLOCK, b * BLOCK:(b + 1) * BLOCK] = value
  return p


def _image(index: int) -> np.ndarray:
  rng = np.random.default_rng(index)
  image = rng.integers(0, 256, (RAW_H, RAW_W, 3), dtype=np.uint8)
  image[:BLOCK * 2, :BLOCK * 2] = (10 * index, 100, 200)  # uniform: survives bilinear resize
  return image


def _png(array: np.ndarray) -> bytes:
  if array.ndim == 2:
    array = array[..., None]
  return tf.io.encode_png(array).numpy()


def _raw_files(frames=FRAMES, size=(RAW_H, RAW_W)):
  """Yields (package, split, relative path, PNG bytes) of a fake raw Cityscapes tree."""
  for index, (split, city, seq, frame) in enumerate(frames):
    stem = f'{city}/{city}_{seq}_{frame}'
    image, ids, disparity = _image(index), _label_ids(index), _disparity()
    if size != (RAW_H, RAW_W):
      image, ids, disparity = (a[:size[0], :size[1]] for a in (image, ids, disparity))
    yield 'leftImg8bit', split, f'{stem}_leftImg8bit.png', _png(image)
    yield 'gtFine', split, f'{stem}_gtFine_labelIds.png', _png(ids)
    # gtFine also ships colour and instance images; they must be ignored.
    yield 'gtFine', split, f'{stem}_gtFine_color.png', _png(np.zeros((4, 4, 4), np.uint8))
    yield 'disparity', split, f'{stem}_disparity.png', _png(disparity)


def write_folders(root: pathlib.Path, **kwargs) -> pathlib.Path:
  """Writes the fake tree as extracted leftImg8bit/, gtFine/, disparity/ folders."""
  for package, split, relative, data in _raw_files(**kwargs):
    path = root / package / split / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  return root


def write_zips(root: pathlib.Path, **kwargs) -> pathlib.Path:
  """Writes the fake tree as the three official zips (with README/license at the top)."""
  root.mkdir(parents=True, exist_ok=True)
  zips = {p: zipfile.ZipFile(root / f'{p}_trainvaltest.zip', 'w') for p in cs._PACKAGES}
  for z in zips.values():
    z.writestr('README', 'fake')
    z.writestr('license.txt', 'fake')
  for package, split, relative, data in _raw_files(**kwargs):
    zips[package].writestr(f'{package}/{split}/{relative}', data)
  for z in zips.values():
    z.close()
  return root


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Builds 128x256 from extracted folders once; returns (manual_dir, data_dir)."""
  root = tmp_path_factory.mktemp('cityscapes')
  manual = write_folders(root / 'raw')
  data_dir = root / 'tfds'
  cs.prepare_dataset(manual, data_dir, '128x256')
  return manual, data_dir


def _block(array: np.ndarray, block_row: int, block_col: int) -> np.ndarray:
  """The output pixels of one raw 32x32 block at 128x256 (16x16)."""
  b = BLOCK // 2
  return array[block_row * b:(block_row + 1) * b, block_col * b:(block_col + 1) * b]


# ---- label table and depth formula, by hand -------------------------------------------

def test_label_table_matches_official_ids():
  assert [label.id for label in cs.LABELS] == list(range(34))
  assert cs.LABELS[7].name == 'road' and cs.LABELS[26].name == 'car'
  assert sorted(t for t in cs.ID_TO_TRAIN_ID if t >= 0) == list(range(19))
  assert cs.CLASSES_19[0] == 'road' and cs.CLASSES_19[18] == 'bicycle'
  for label_id, (name, train_id, category) in KNOWN_LABELS.items():
    assert cs.LABELS[label_id].name == name
    assert cs.ID_TO_TRAIN_ID[label_id] == train_id
    assert cs.ID_TO_CATEGORY_7[label_id] == category
  # Void (ids 0..6) is the only -1 of the 7-category labels.
  assert list(np.flatnonzero(cs.ID_TO_CATEGORY_7 < 0)) == list(range(7))
  assert cs.CATEGORIES_7[cs.ID_TO_CATEGORY_7[14]] == 'construction'  # guard rail


def test_disparity_to_inverse_depth_by_hand():
  p = np.array(list(KNOWN_DISPARITY), np.uint16)
  depth = cs.disparity_to_inverse_depth(p)
  assert depth.dtype == np.float32
  np.testing.assert_array_equal(depth, np.array(list(KNOWN_DISPARITY.values()), np.float32))
  # The largest value in real Cityscapes (32257) gives the released maximum ~0.4922.
  assert abs(float(cs.disparity_to_inverse_depth(np.uint16(32257))) - 0.4922) < 1e-4


def test_builder_configs_are_named_by_resolution():
  configs = {c.name: (c.height, c.width) for c in cs.CityscapesMtan.BUILDER_CONFIGS}
  assert configs == {'128x256': (128, 256), '256x512': (256, 512)}
  assert 'leftImg8bit_trainvaltest.zip' in cs.CityscapesMtan.MANUAL_DOWNLOAD_INSTRUCTIONS


# ---- building and reading -------------------------------------------------------------

def test_source_reads_mapped_labels_and_depth(built):
  _, data_dir = built
  train = cs.CityscapesTfdsSource(data_dir, 'train')
  val = cs.CityscapesTfdsSource(str(data_dir), 'val', '128x256', 'label_7', ('semantic', 'depth'))
  assert (len(train), len(val)) == (3, 2)
  assert train.shape == (128, 256) and train.num_classes == 7
  for index, source in ((0, train), (1, train), (2, train), (3, val), (4, val)):
    example = source[index - (0 if source is train else 3)]
    assert set(example) == {'image', 'label', 'depth'}
    image, label, depth = example['image'], example['label'], example['depth']
    assert image.shape == (128, 256, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert label.shape == (128, 256) and label.dtype == np.int32
    assert depth.shape == (128, 256, 1) and depth.dtype == np.float32
    # Examples are in file-name order: the marker block holds the frame's index.
    assert np.all(_block(label, 7, 0) == index)
    np.testing.assert_allclose(_block(image, 0, 0), np.broadcast_to(
        np.array([10 * index, 100, 200], np.float32) / 255, (16, 16, 3)), atol=1e-6)
    for b, (_, _, category) in enumerate(KNOWN_LABELS.values()):
      assert np.all(_block(label, 0, b) == category)
    for b, inverse_depth in enumerate(KNOWN_DISPARITY.values()):
      assert np.all(_block(depth[..., 0], 1, b) == np.float32(inverse_depth))
  assert np.all(_block(train[-1]['label'], 7, 0) == 2)


def test_source_label_19_and_task_selection(built):
  _, data_dir = built
  source = cs.CityscapesTfdsSource(data_dir, 'train', label_dir='label_19', tasks=('semantic',))
  assert source.num_classes == 19
  example = source[0]
  assert set(example) == {'image', 'label'}
  for b, (_, train_id, _) in enumerate(KNOWN_LABELS.values()):
    assert np.all(_block(example['label'], 0, b) == train_id)
  depth_only = cs.CityscapesTfdsSource(data_dir, 'val', tasks=('depth',))
  assert set(depth_only[1]) == {'image', 'depth'}
  assert len(cs.CityscapesTfdsSource(data_dir, 'train[:2]')) == 2
  with pytest.raises(IndexError):
    source[3]


def test_build_from_zips_matches_folders(built, tmp_path):
  _, folder_data_dir = built
  manual = write_zips(tmp_path / 'raw')
  cs.prepare_dataset(manual, tmp_path / 'tfds', '128x256')
  for split in cs.SPLITS:
    from_zip = cs.CityscapesTfdsSource(tmp_path / 'tfds', split)
    from_folder = cs.CityscapesTfdsSource(folder_data_dir, split)
    assert len(from_zip) == len(from_folder)
    for i in range(len(from_zip)):
      for key, value in from_zip[i].items():
        np.testing.assert_array_equal(value, from_folder[i][key])


def test_prepare_script_writes_npy_layout(built, tmp_path, capsys):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / 'scripts'))
  import prepare_cityscapes  # pylint: disable=g-import-not-at-top
  manual, data_dir = built
  out = tmp_path / 'npy'
  # The dataset is already prepared in data_dir: the script reuses it and writes npy files.
  assert prepare_cityscapes.main(['--manual_dir', str(manual), '--data_dir', str(data_dir),
                                  '--resolution', '128x256', '--npy_out', str(out)]) == 0
  assert 'train 3' in capsys.readouterr().out
  for label_dir, tfds_label in (('label_7', 'label_7'), ('label_19', 'label_19')):
    npy = NpyDataset(out, 'train', 'cityscapes', label_dir=label_dir)
    source = cs.CityscapesTfdsSource(data_dir, 'train', label_dir=tfds_label)
    assert len(npy) == 3 and npy.shape == (128, 256)
    for i in range(3):
      for key, value in source[i].items():
        np.testing.assert_array_equal(npy[i][key], value)
  assert len(NpyDataset(out, 'val', 'cityscapes')) == 2
  # A second run into the same npy directory refuses to mix two preparations.
  assert prepare_cityscapes.main(['--manual_dir', str(manual), '--data_dir', str(data_dir),
                                  '--npy_out', str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and '\n' not in err and str(out / 'train') in err


def test_build_256x512(built, tmp_path):
  manual, _ = built
  cs.prepare_dataset(manual, tmp_path, '256x512')
  source = cs.CityscapesTfdsSource(tmp_path, 'val', '256x512', 'label_19')
  assert source.shape == (256, 512) and len(source) == 2
  example = source[0]
  assert example['image'].shape == (256, 512, 3)
  # The fake raw frames are already 256x512; the inverse depth scale is the same as at
  # 128x256 (it does not depend on the resolution).
  assert np.all(example['label'][:32, 32:64] == 13)  # car
  assert np.all(example['depth'][32:64, 96:128, 0] == np.float32(0.1953125))  # p = 12801


def test_prepare_script_help():
  script = pathlib.Path(__file__).resolve().parents[1] / 'scripts' / 'prepare_cityscapes.py'
  result = subprocess.run([sys.executable, str(script), '--help'], capture_output=True,
                          text=True, timeout=60, check=True)
  assert '--manual_dir' in result.stdout and '256x512' in result.stdout


# ---- reader errors ----------------------------------------------------------------------

def test_source_config_errors(built):
  _, data_dir = built
  with pytest.raises(ConfigError, match="label_dir 'label_2'"):
    cs.CityscapesTfdsSource(data_dir, 'train', label_dir='label_2')
  with pytest.raises(ConfigError, match="resolution '64x128'"):
    cs.CityscapesTfdsSource(data_dir, 'train', resolution='64x128')
  with pytest.raises(ConfigError, match="split 'test'"):
    cs.CityscapesTfdsSource(data_dir, 'test')
  with pytest.raises(ConfigError, match="task 'normal'"):
    cs.CityscapesTfdsSource(data_dir, 'train', tasks=('semantic', 'normal'))


def test_source_missing_dataset_says_how_to_prepare(built, tmp_path):
  _, data_dir = built
  with pytest.raises(DataError, match='prepare_cityscapes.py') as info:
    cs.CityscapesTfdsSource(tmp_path, 'train')
  assert '\n' not in str(info.value) and 'cityscapes_mtan/128x256' in str(info.value)
  # Prepared at 128x256 only: asking for 256x512 names that config.
  with pytest.raises(DataError, match='256x512.*prepared dataset not found'):
    cs.CityscapesTfdsSource(data_dir, 'val', resolution='256x512')
  with pytest.raises(DataError, match='does not exist'):
    cs.CityscapesTfdsSource(tmp_path / 'nowhere', 'train')


def test_source_rejects_tfrecord_copy(built, tmp_path):
  manual, _ = built
  builder = cs.CityscapesMtan(config='128x256', data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=cs.tfds.download.DownloadConfig(
      manual_dir=str(manual), try_download_gcs=False,
      compute_stats=cs.tfds.download.ComputeStatsMode.SKIP))
  with pytest.raises(DataError, match='tfrecord format, expected array_record') as info:
    cs.CityscapesTfdsSource(tmp_path, 'train')
  assert '\n' not in str(info.value)


# ---- bad raw data -----------------------------------------------------------------------

SMALL = dict(frames=(FRAMES[0], FRAMES[3]), size=(64, 128))  # 1 train + 1 val frame


def _expect_build_error(manual: pathlib.Path, tmp_path: pathlib.Path, *fragments: str):
  with pytest.raises(DataError) as info:
    cs.prepare_dataset(manual, tmp_path / 'tfds', '128x256')
  message = str(info.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, message
  return message


TRAIN_STEM = 'aachen/aachen_000000_000019'


def test_empty_or_missing_manual_dir(tmp_path):
  (tmp_path / 'empty').mkdir()
  _expect_build_error(tmp_path / 'empty', tmp_path, str(tmp_path / 'empty'), 'empty',
                      'gtFine_trainvaltest.zip')
  _expect_build_error(tmp_path / 'missing', tmp_path, str(tmp_path / 'missing'), 'does not exist')
  # The builder itself (used without prepare_dataset) turns TFDS's check into a DataError.
  builder = cs.CityscapesMtan(config='128x256', data_dir=str(tmp_path / 'tfds'),
                              file_format='array_record')
  with pytest.raises(DataError, match='manual directory is missing or empty') as info:
    builder.download_and_prepare(download_config=cs.tfds.download.DownloadConfig(
        manual_dir=str(tmp_path / 'empty'), try_download_gcs=False))
  assert str(tmp_path / 'empty') in str(info.value) and '\n' not in str(info.value)


def test_missing_package(tmp_path):
  manual = write_folders(tmp_path / 'raw', **SMALL)
  shutil.rmtree(manual / 'disparity')
  _expect_build_error(manual, tmp_path, str(manual), 'disparity_trainvaltest.zip')


def test_missing_split_folder(tmp_path):
  manual = write_folders(tmp_path / 'raw', **SMALL)
  shutil.rmtree(manual / 'gtFine' / 'val')
  _expect_build_error(manual, tmp_path, str(manual / 'gtFine' / 'val'), 'split folder not found')


def test_missing_split_in_zip(tmp_path):
  manual = write_zips(tmp_path / 'raw', **SMALL)
  zip_path = manual / 'gtFine_trainvaltest.zip'
  with zipfile.ZipFile(zip_path) as z:
    kept = {n: z.read(n) for n in z.namelist() if not n.startswith('gtFine/val/')}
  with zipfile.ZipFile(zip_path, 'w') as z:
    for name, data in kept.items():
      z.writestr(name, data)
  _expect_build_error(manual, tmp_path, str(zip_path), 'no gtFine/val/ folder')


@pytest.mark.parametrize('package', ['gtFine', 'disparity'])
def test_image_without_label_or_disparity(tmp_path, package):
  manual = write_folders(tmp_path / 'raw', **SMALL)
  suffix = cs._SUFFIX[package]
  (manual / package / 'train' / f'{TRAIN_STEM}{suffix}').unlink()
  _expect_build_error(manual, tmp_path,
                      str(manual / 'leftImg8bit' / 'train' / f'{TRAIN_STEM}_leftImg8bit.png'),
                      str(manual / package / 'train' / f'{TRAIN_STEM}{suffix}'))


@pytest.mark.parametrize('damage', ['truncated', 'corrupt'])
def test_bad_png(tmp_path, damage):
  manual = write_folders(tmp_path / 'raw', **SMALL)
  path = manual / 'disparity' / 'train' / f'{TRAIN_STEM}_disparity.png'
  data = path.read_bytes()
  if damage == 'truncated':
    data = data[:len(data) // 2]
  else:
    middle = len(data) // 2
    data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:]
  path.write_bytes(data)
  _expect_build_error(manual, tmp_path, str(path), 'cannot decode PNG')


def test_bad_png_inside_zip(tmp_path):
  manual = write_zips(tmp_path / 'raw', **SMALL)
  zip_path = manual / 'leftImg8bit_trainvaltest.zip'
  member = f'leftImg8bit/train/{TRAIN_STEM}_leftImg8bit.png'
  with zipfile.ZipFile(zip_path) as z:
    files = {n: z.read(n) for n in z.namelist()}
  files[member] = files[member][:100]
  with zipfile.ZipFile(zip_path, 'w') as z:
    for name, data in files.items():
      z.writestr(name, data)
  _expect_build_error(manual, tmp_path, f'{zip_path}:{member}', 'cannot decode PNG')


@pytest.mark.parametrize('package', ['gtFine', 'disparity'])
def test_size_mismatch(tmp_path, package):
  manual = write_folders(tmp_path / 'raw', **SMALL)
  suffix = cs._SUFFIX[package]
  path = manual / package / 'train' / f'{TRAIN_STEM}{suffix}'
  dtype = np.uint8 if package == 'gtFine' else np.uint16
  path.write_bytes(_png(np.ones((32, 128), dtype)))
  _expect_build_error(manual, tmp_path, str(path), '(32, 128)', 'expected (64, 128)')


def test_label_id_out_of_range(tmp_path):
  manual = write_folders(tmp_path / 'raw', **SMALL)
  path = manual / 'gtFine' / 'train' / f'{TRAIN_STEM}_gtFine_labelIds.png'
  ids = _label_ids(0)[:64, :128]
  ids[5, 7] = 34
  path.write_bytes(_png(ids))
  _expect_build_error(manual, tmp_path, str(path), 'label id 34 at (row 5, col 7)', '0..33')


def test_disparity_wrong_bit_depth(tmp_path):
  manual = write_folders(tmp_path / 'raw', **SMALL)
  path = manual / 'disparity' / 'train' / f'{TRAIN_STEM}_disparity.png'
  path.write_bytes(_png(np.ones((64, 128), np.uint8)))
  _expect_build_error(manual, tmp_path, str(path), '8-bit grayscale', 'expected a 16-bit')
