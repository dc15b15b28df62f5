"""Tests for the Oxford-IIIT Pet source on a tiny dataset built by the real TFDS builder.

A fake raw tree (images/*.jpg, annotations/trimaps/*.png, annotations/xmls/*.xml,
trainval.txt, test.txt) is turned into array_record files by TFDS's own
`oxford_iiit_pet` builder with the download step patched out, so the records have exactly
the feature encoding of a real prepared copy.
"""

import os
from unittest import mock

import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from mtan_jax.data import pets  # pylint: disable=g-import-not-at-top
from mtan_jax.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top

SIZE = (32, 64)
# name -> (height, width, species in the list file (1 cat, 2 dog), head box or None).
# Boxes are (xmin, ymin, xmax, ymax) in pixels, as in the VOC-style xmls.
TRAIN = {
    'Abyssinian_1': (40, 60, 1, (12, 8, 48, 30)),
    'yorkshire_terrier_1': (50, 30, 2, (3, 10, 27, 35)),
    'Bengal_3': (36, 44, 1, None),  # a train image without head annotation
}
TEST = {'Bengal_2': (30, 30, 1, None)}
COLOR = (200, 100, 50)


def _trimap(height, width):
  """Top half pet (1), bottom-left background (2), bottom-right border (3), a 0 stripe."""
  t = np.full((height, width), 2, np.uint8)
  t[:height // 2] = 1
  t[height // 2:, width // 2:] = 3
  t[height - 2:, :4] = 0
  return t


def _write_raw(root):
  images = os.path.join(root, 'images', 'images')
  ann = os.path.join(root, 'annotations', 'annotations')
  for d in (images, os.path.join(ann, 'trimaps'), os.path.join(ann, 'xmls')):
    os.makedirs(d, exist_ok=True)
  for split, table in (('trainval', TRAIN), ('test', TEST)):
    lines = []
    for name, (h, w, species, box) in table.items():
      if split == 'test':
        # Grayscale JPEG: decode must still give 3 channels.
        Image.fromarray(np.full((h, w), 128, np.uint8), 'L').save(
            os.path.join(images, name + '.jpg'), quality=95)
      else:
        Image.fromarray(np.broadcast_to(np.uint8(COLOR), (h, w, 3)).copy()).save(
            os.path.join(images, name + '.jpg'), quality=95)
      Image.fromarray(_trimap(h, w), 'L').save(os.path.join(ann, 'trimaps', name + '.png'))
      if box is not None:
        xmin, ymin, xmax, ymax = box
        with open(os.path.join(ann, 'xmls', name + '.xml'), 'w') as f:
          f.write(f'<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth>'
                  f'</size><object><name>pet</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}'
                  f'</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>'
                  '</annotation>')
      lines.append(f'{name} 1 {species} 1\n')
    with open(os.path.join(ann, f'{split}.txt'), 'w') as f:
      f.writelines(lines)


def _build(raw, data_dir, file_format):
  """Runs the real builder on the fake raw tree, without any network access."""
  paths = {'images': os.path.join(raw, 'images'), 'annotations': os.path.join(raw, 'annotations')}
  # url_infos reads the builder's checksums.tsv (through importlib_resources, which this
  # environment may lack); the URLs are never downloaded, so no checksums are needed.
  with mock.patch.object(tfds.core.DatasetBuilder, 'url_infos', None), \
       mock.patch.object(tfds.download.DownloadManager, 'download_and_extract',
                         return_value=paths):
    builder = tfds.builder(pets.DATASET, data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('pets')
  raw = str(root / 'raw')
  _write_raw(raw)
  _build(raw, str(root / 'array_record'), 'array_record')
  _build(raw, str(root / 'tfrecord'), 'tfrecord')
  return {'array_record': str(root / 'array_record'), 'tfrecord': str(root / 'tfrecord'),
          'root': str(root)}


def _names(data_dir, split):
  """File names by index (TFDS shuffles records, so index order is not file order)."""
  ds = tfds.data_source(pets.DATASET, split=split, data_dir=data_dir, download=False,
                        decoders={'image': tfds.decode.SkipDecoding(),
                                  'segmentation_mask': tfds.decode.SkipDecoding()})
  return [ds[i]['file_name'].decode()[:-len('.jpg')] for i in range(len(ds))]


def _expected_label(height, width):
  """The trimap resized with half-pixel nearest neighbour, then mapped to labels."""
  t = _trimap(height, width)
  rows = np.floor((np.arange(SIZE[0]) + 0.5) * height / SIZE[0]).astype(int)
  cols = np.floor((np.arange(SIZE[1]) + 0.5) * width / SIZE[1]).astype(int)
  return np.array([-1, 1, 0, -1])[np.minimum(t[rows][:, cols], 3)]


def _decode(source, index):
  raw = source[index]
  return {k: v.numpy() for k, v in source.decode({k: tf.constant(v) for k, v in raw.items()}).items()}


def test_raw_records_are_encoded_and_match_signature(dirs):
  source = pets.PetsSource(dirs['array_record'], 'train', SIZE, ('semantic', 'species', 'bbox'))
  assert len(source) == len(TRAIN)
  assert source.shape == SIZE and source.num_classes == 2
  sig = source.raw_signature
  assert list(sig) == ['image', 'segmentation_mask', 'species', 'head_bbox']
  assert sig['image'] == tf.TensorSpec((), tf.string)
  assert sig['head_bbox'] == tf.TensorSpec((4,), tf.float32)
  raw = source[0]
  assert set(raw) == set(sig)
  assert isinstance(raw['image'], bytes) and raw['image'][:2] == b'\xff\xd8'  # JPEG
  assert isinstance(raw['segmentation_mask'], bytes) and raw['segmentation_mask'][:4] == b'\x89PNG'
  assert raw['species'].dtype == np.int64 and raw['species'].shape == ()
  assert raw['head_bbox'].dtype == np.float32 and raw['head_bbox'].shape == (4,)
  assert source[-1].keys() == raw.keys()
  with pytest.raises(IndexError):
    source[len(TRAIN)]
  # Only the keys the tasks need are read.
  assert list(pets.PetsSource(dirs['array_record'], 'train', SIZE, ('edges',)).raw_signature) == ['image']


def test_decode_targets(dirs):
  source = pets.PetsSource(dirs['array_record'], 'train', SIZE,
                           ('semantic', 'species', 'bbox', 'colorization'))
  height, width = SIZE
  for index, name in enumerate(_names(dirs['array_record'], 'train')):
    h, w, species, box = TRAIN[name]
    ex = _decode(source, index)
    assert set(ex) == {'image', 'label', 'species', 'bbox'}
    assert ex['image'].shape == (height, width, 3) and ex['image'].dtype == np.float32
    np.testing.assert_allclose(ex['image'].reshape(-1, 3).mean(0), np.array(COLOR) / 255, atol=0.02)
    assert 0.0 <= ex['image'].min() and ex['image'].max() <= 1.0
    assert ex['label'].shape == SIZE and ex['label'].dtype == np.int32
    np.testing.assert_array_equal(ex['label'], _expected_label(h, w))
    assert ex['label'][2, 2] == 1 and ex['label'][-4, 6] == 0 and ex['label'][-4, -2] == -1
    assert ex['label'][-1, 0] == -1  # trimap value 0 (never in real data) is ignored
    assert ex['species'].dtype == np.int32 and ex['species'] == species - 1
    assert ex['bbox'].shape == (4,) and ex['bbox'].dtype == np.float32
    if box is None:
      np.testing.assert_array_equal(ex['bbox'], np.zeros(4))
    else:
      xmin, ymin, xmax, ymax = box
      expected = [ymin / h * height, xmin / w * width, ymax / h * height, xmax / w * width]
      np.testing.assert_allclose(ex['bbox'], expected, rtol=1e-5)
  # Abyssinian_1 40x60, box x 12..48, y 8..30 -> pixels of the 32x64 image, by hand.
  index = _names(dirs['array_record'], 'train').index('Abyssinian_1')
  np.testing.assert_allclose(_decode(source, index)['bbox'], [6.4, 12.8, 24.0, 51.2], rtol=1e-5)


def test_test_split_has_zero_boxes_and_gray_images_become_rgb(dirs):
  source = pets.PetsSource(dirs['array_record'], 'test', SIZE, ('bbox', 'species'))
  assert len(source) == 1
  ex = _decode(source, 0)
  assert set(ex) == {'image', 'species', 'bbox'}
  np.testing.assert_array_equal(ex['bbox'], np.zeros(4, np.float32))
  assert ex['image'].shape == (*SIZE, 3)
  np.testing.assert_allclose(ex['image'], 128 / 255, atol=0.02)


def test_split_slices(dirs):
  first = pets.PetsSource(dirs['array_record'], 'train[:2]', SIZE, ('semantic',))
  rest = pets.PetsSource(dirs['array_record'], 'train[2:]', SIZE, ('semantic',))
  assert (len(first), len(rest)) == (2, 1)


def test_in_tf_data_pipeline(dirs):
  source = pets.PetsSource(dirs['array_record'], 'train', SIZE, ('semantic', 'species', 'bbox'))
  specs = source.raw_signature
  keys = list(specs)

  def fetch(index):
    example = source[int(index)]
    return [example[k] for k in keys]

  def read(index):
    values = tf.numpy_function(fetch, [index], [specs[k].dtype for k in keys])
    raw = {}
    for key, value in zip(keys, values):
      value.set_shape(specs[key].shape)
      raw[key] = value
    return raw

  ds = (tf.data.Dataset.from_tensor_slices(np.arange(len(source), dtype=np.int64))
        .map(read, num_parallel_calls=2)
        .map(source.decode, num_parallel_calls=2, deterministic=True)
        .batch(len(source)))
  assert ds.element_spec['image'].shape.as_list() == [None, *SIZE, 3]
  assert ds.element_spec['label'].shape.as_list() == [None, *SIZE]
  batch = next(iter(ds))
  assert batch['image'].shape == (len(TRAIN), *SIZE, 3)
  for i in range(len(source)):
    direct = _decode(source, i)
    for key, value in direct.items():
      np.testing.assert_array_equal(batch[key][i].numpy(), value)


def test_mock_data_source_works():
  # tfds.testing.mock_data also fakes tfds.data_source (random records, real encodings).
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    source = pets.PetsSource(None, 'train', SIZE, ('semantic', 'species', 'bbox'))
    assert len(source) == 3
    ex = _decode(source, 1)
  assert ex['image'].shape == (*SIZE, 3)
  assert set(np.unique(ex['label'])) <= {-1, 0, 1}


def _one_line_error(error_type, *args):
  with pytest.raises(error_type) as info:
    pets.PetsSource(*args)
  message = str(info.value)
  assert '\n' not in message
  return message


def test_missing_data_dir(dirs):
  missing = os.path.join(dirs['root'], 'nothing')
  message = _one_line_error(DataError, missing, 'train', SIZE, ('semantic',))
  assert missing in message and '--file_format=array_record' in message
  assert os.path.exists(missing) is False  # nothing was downloaded or created


def test_tfrecord_copy(dirs):
  message = _one_line_error(DataError, dirs['tfrecord'], 'train', SIZE, ('semantic',))
  assert 'tfrecord' in message and 'array_record' in message and dirs['tfrecord'] in message
  assert 'convert_format' in message


def test_bad_split_and_config(dirs):
  message = _one_line_error(ConfigError, dirs['array_record'], 'validation', SIZE, ('semantic',))
  assert "'validation'" in message and 'test, train' in message
  message = _one_line_error(ConfigError, dirs['array_record'], 'train', SIZE, ('semantic', 'depth'))
  assert "'depth'" in message and 'semantic, species, bbox' in message
  _one_line_error(ConfigError, dirs['array_record'], 'train', (32,), ('semantic',))
  _one_line_error(ConfigError, dirs['array_record'], 'train', (0, 32), ('semantic',))


def test_check_tasks():
  assert pets.check_tasks(('semantic', 'bbox', 'semantic')) == ('semantic', 'bbox')
  assert pets.check_tasks('species,edges,denoising') == ('species', 'edges', 'denoising')
  with pytest.raises(ConfigError, match='normal'):
    pets.check_tasks(('normal',))
