"""Oxford-IIIT Pet (TFDS `oxford_iiit_pet`) as a random-access source for the input pipeline.

The examples come from `tfds.data_source`, which reads TFDS's array_record files by index,
so the pipeline can shuffle indices (as it does for the npy layouts) instead of streaming.
Only the array_record (or parquet) format supports random access; a copy prepared as
tfrecord (TFDS's default) must be converted or rebuilt::

    tfds build oxford_iiit_pet --file_format=array_record --data_dir=DATA_DIR
    # or, without the tfds command line (which imports apache-beam at start-up):
    python -c "import tensorflow_datasets as tfds; tfds.builder('oxford_iiit_pet', \
        data_dir='DATA_DIR', file_format='array_record').download_and_prepare()"
    # an existing tfrecord copy can be converted in place (needs apache-beam installed):
    tfds convert_format --dataset_version_dir=DATA_DIR/oxford_iiit_pet/4.0.0 \
        --out_file_format=array_record

Building needs the `importlib_resources` package (tfds locates the builder's checksums
with it) and network access to the Oxford VGG server (~800 MB).

The source protocol (what `mtan_jax.data.pipeline` relies on) splits the work in two:

* `PetsSource[i]` runs in Python and only reads one record: the JPEG image and PNG trimap
  stay encoded (`tfds.decode.SkipDecoding`), so it is cheap and holds the GIL briefly.
  It returns a dict with the keys of `raw_signature`:

  ==================== ============ ======= ===========================================
  key                  dtype        shape   when
  ==================== ============ ======= ===========================================
  'image'              tf.string    ()      always (encoded JPEG, occasionally PNG)
  'segmentation_mask'  tf.string    ()      task 'semantic' (encoded PNG trimap)
  'species'            tf.int64     ()      task 'species' (0 cat, 1 dog)
  'head_bbox'          tf.float32   (4,)    task 'bbox' (normalised ymin, xmin, ymax, xmax)
  ==================== ============ ======= ===========================================

* `PetsSource.decode(raw)` is pure TensorFlow, for `tf.data.Dataset.map` with parallel
  calls: it decodes and resizes to the model's resolution `image_size` (H, W) and returns
  'image' float32 (H, W, 3) in [0, 1] plus, per task, 'label' int32 (H, W) (1 pet,
  0 background, -1 ignored border), 'species' int32 () and 'bbox' float32 (4,) in pixels
  of the resized image.

Images are resized to (H, W) without keeping the aspect ratio (pet photos are roughly 4:3
or 3:4; the reference work this dataset comes from squashes them to 256x256 too), so a
box in pixels of the resized image is the normalised box times (H, W, H, W).
"""

from __future__ import annotations

import json
import operator
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mtan_jax.data.pipeline import import_tensorflow
from mtan_jax.errors import ConfigError, DataError, one_line

DATASET = 'oxford_iiit_pet'
# Tasks with targets in the dataset, and the self-supervised tasks whose targets are
# computed from the image alone (so any image source provides them).
TARGET_TASKS = ('semantic', 'species', 'bbox')
SELF_SUPERVISED_TASKS = ('edges', 'colorization', 'denoising')
TASKS = TARGET_TASKS + SELF_SUPERVISED_TASKS
# Binary segmentation: 0 background, 1 pet; the trimap's border band is ignored (-1).
NUM_CLASSES = 2
IGNORE_LABEL = -1
# Trimap value -> label, indexed by min(value, 3): 1 pet -> 1, 2 background -> 0,
# 3 border -> -1. Values outside 1..3 (0 or > 3, never in the real trimaps) are ignored too
# rather than silently read as a class.
_TRIMAP_TO_LABEL = (IGNORE_LABEL, 1, 0, IGNORE_LABEL)
# Raw record keys (TFDS feature names) needed per task.
_RAW_KEYS = {'semantic': 'segmentation_mask', 'species': 'species', 'bbox': 'head_bbox'}
_PREPARE_HINT = ('tfds build oxford_iiit_pet --file_format=array_record --data_dir={d} (or in '
                 "Python: tfds.builder('oxford_iiit_pet', data_dir='{d}', "
                 "file_format='array_record').download_and_prepare())")


def check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
  """Validates task names against what Oxford-IIIT Pet provides.

  Args:
    tasks: task names; a string is read as comma-separated names ('semantic,species'),
      like a `--config.tasks=` override.

  Returns:
    The names in order, without duplicates.

  Raises:
    ConfigError: If a task is neither a pets target ('semantic', 'species', 'bbox') nor a
      self-supervised task computed from the image ('edges', 'colorization', 'denoising').
  """
  if isinstance(tasks, str):
    tasks = tasks.split(',')
  result = []
  for task in tasks:
    name = str(task).strip()
    if name not in TASKS:
      raise ConfigError(f'task {name!r} is not available for dataset {DATASET}; pets provide '
                        f'{", ".join(TARGET_TASKS)} (and the self-supervised '
                        f'{", ".join(SELF_SUPERVISED_TASKS)}, computed from the image)')
    if name not in result:
      result.append(name)
  return tuple(result)


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
  """Returns image_size as (H, W) positive ints or raises ConfigError."""
  try:
    size = tuple(operator.index(s) for s in image_size)
  except TypeError:
    size = ()
  if len(size) != 2 or min(size) < 1:
    raise ConfigError(f'image_size={image_size!r}; expected (height, width) positive integers, '
                      'e.g. (256, 256)')
  return size


def _data_dir_name(data_dir: str | None) -> str:
  """The data_dir as users should see it in messages (TFDS's default when None)."""
  if data_dir:
    return str(data_dir)
  return os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')


def _check_info_files(data_dir: str | None) -> None:
  """A damaged `dataset_info.json` fails with its path (TFDS would raise a protobuf ParseError)."""
  root = pathlib.Path(_data_dir_name(data_dir)) / DATASET
  for info in sorted(root.glob('*/dataset_info.json')):
    try:
      json.loads(info.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
      raise DataError(f'{info}: unreadable dataset info ({one_line(e)}), expected the JSON written '
                      f'by TFDS; delete {info.parent} and prepare it again with: '
                      f'{_PREPARE_HINT.format(d=_data_dir_name(data_dir))}') from None


def _open_error(data_dir: str | None, split: str, error: Exception) -> Exception:
  """Turns a failed `tfds.data_source` into a one-line DataError/ConfigError.

  `tfds.data_source(download=False)` reports a missing dataset and a tfrecord copy with the
  same NotImplementedError, so the builder is asked which case it is.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shown = _data_dir_name(data_dir)
  hint = _PREPARE_HINT.format(d=shown)
  try:
    builder = tfds.builder(DATASET, data_dir=data_dir)
    prepared = builder.is_prepared()
    version_dir = str(builder.data_dir)
  except Exception as e:  # pylint: disable=broad-except
    return DataError(f'data_dir={shown!r}: cannot open {DATASET} ({one_line(e)}), expected an '
                     f'array_record copy prepared with: {hint}')
  if not prepared:
    return DataError(f'data_dir={shown!r}: no prepared {DATASET} {builder.version} '
                     f'({version_dir} has no dataset_info.json), expected an array_record copy; '
                     f'prepare it with: {hint}')
  if isinstance(error, NotImplementedError):
    formats = sorted(str(f.value) for f in builder.info.available_file_formats())
    return DataError(f'{version_dir}: {DATASET} is prepared as {", ".join(formats) or "tfrecord"}, '
                     'expected array_record for random access; convert it with `tfds '
                     f'convert_format --dataset_version_dir={version_dir} '
                     f'--out_file_format=array_record` (needs apache-beam) or rebuild with: {hint}')
  if isinstance(error, (ValueError, KeyError)):
    splits = ', '.join(sorted(builder.info.splits))
    reason = one_line(error).rstrip('.')
    return ConfigError(f'split {split!r} for {DATASET} under {shown}: {reason}; expected one of '
                       f"{splits}, optionally sliced like 'train[:90%]'")
  return DataError(f'{version_dir}: cannot open {DATASET} split {split!r} ({one_line(error)})')


class PetsSource:
  """One split of Oxford-IIIT Pet, indexable, returning encoded records (see module doc).

  Attributes:
    data_dir: TFDS data directory given (None: TFDS's default).
    split: TFDS split, e.g. 'train', 'test' or 'train[:90%]'.
    tasks: the validated task names.
    num_classes: 2 (background, pet).
  """

  num_classes = NUM_CLASSES

  def __init__(self, data_dir: str | None, split: str, image_size: Sequence[int],
               tasks: Sequence[str]):
    """Opens the split's array_record files (reads no image yet).

    Args:
      data_dir: TFDS data directory holding `oxford_iiit_pet/4.0.0/` in array_record
        format; None uses TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets).
      split: TFDS split, e.g. 'train', 'test', 'train[:90%]', 'train[90%:]'.
      image_size: (H, W) the model runs at; every decoded example has this size.
      tasks: task names, see `check_tasks`.

    Raises:
      ConfigError: If a task, `image_size` or `split` is invalid.
      DataError: If the dataset is missing, prepared as tfrecord or the split is empty.
    """
    self.tasks = check_tasks(tasks)
    self._size = _check_image_size(image_size)
    self.data_dir = data_dir
    self.split = split
    self._keys = ('image',) + tuple(_RAW_KEYS[t] for t in TARGET_TASKS if t in self.tasks)
    _check_info_files(data_dir)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    # Keep images and trimaps encoded: decoding them here would run PIL under the GIL in
    # the tf.data numpy_function; `decode` does it in TensorFlow's parallel map instead.
    decoders = {'image': tfds.decode.SkipDecoding(),
                'segmentation_mask': tfds.decode.SkipDecoding()}
    try:
      # download=False: a missing copy must fail here, not start an 800 MB download.
      self._source = tfds.data_source(DATASET, split=split, data_dir=data_dir, download=False,
                                      decoders=decoders)
    except (NotImplementedError, ValueError, KeyError, OSError) as e:
      raise _open_error(data_dir, split, e) from e
    self._len = len(self._source)
    if self._len == 0:
      raise DataError(f'data_dir={_data_dir_name(data_dir)!r}: split {split!r} of {DATASET} has '
                      'no examples, expected a non-empty split')

  def __len__(self) -> int:
    """Returns the number of examples in the split."""
    return self._len

  @property
  def shape(self) -> tuple[int, int]:
    """The (H, W) every decoded example has: the model's resolution, not the files'."""
    return self._size

  @property
  def raw_signature(self) -> dict[str, Any]:
    """`tf.TensorSpec` per key of what `__getitem__` returns (see the module docstring)."""
    tf = import_tensorflow()
    specs = {
        'image': tf.TensorSpec((), tf.string),
        'segmentation_mask': tf.TensorSpec((), tf.string),
        'species': tf.TensorSpec((), tf.int64),
        'head_bbox': tf.TensorSpec((4,), tf.float32),
    }
    return {key: specs[key] for key in self._keys}

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Reads one record without decoding its image or trimap.

    Args:
      index: example index; negative indices count from the end.

    Returns:
      A dict with the keys and types of `raw_signature`: bytes for 'image' and
      'segmentation_mask', a 0-d int64 array for 'species', a (4,) float32 array for
      'head_bbox'.

    Raises:
      IndexError: If `index` is out of range (this also ends iteration).
    """
    index = operator.index(index)
    if not -self._len <= index < self._len:
      raise IndexError(f'index {index} out of range for {self._len} examples')
    record = self._source[index % self._len]
    converters = {
        'image': bytes,
        'segmentation_mask': bytes,
        'species': lambda v: np.asarray(v, np.int64),
        'head_bbox': lambda v: np.asarray(v, np.float32).reshape(4),
    }
    return {key: converters[key](record[key]) for key in self._keys}

  def decode(self, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Decodes one raw record to the model's resolution; pure TensorFlow (for tf.data map).

    The image is resized bilinearly with antialiasing: pet photos (about 500x375) are
    downscaled, and plain bilinear would sample only 2x2 pixels per output and alias fur
    and edges; antialiased resizing is also what PIL and torchvision's Resize do. The trimap
    is resized with nearest neighbour so labels stay labels.

    Args:
      raw: tensors with the keys and specs of `raw_signature`.

    Returns:
      'image' float32 (H, W, 3) in [0, 1]; with 'semantic': 'label' int32 (H, W) with
      1 pet, 0 background, -1 border (ignored); with 'species': 'species' int32 ()
      0 cat / 1 dog; with 'bbox': 'bbox' float32 (4,) [ymin, xmin, ymax, xmax] in pixels
      of the resized image, all zeros when the example has no head box (the whole test
      split and a few train images).
    """
    tf = import_tensorflow()
    height, width = self._size
    # expand_animations=False: always (h, w, 3), even for the odd GIF/PNG in the files.
    image = tf.io.decode_image(raw['image'], channels=3, expand_animations=False)
    image = tf.image.convert_image_dtype(image, tf.float32)
    image = tf.image.resize(image, (height, width), method='bilinear', antialias=True)
    # Antialiasing kernels are non-negative, but keep [0, 1] exact against rounding.
    out = {'image': tf.ensure_shape(tf.clip_by_value(image, 0.0, 1.0), (height, width, 3))}
    if 'semantic' in self.tasks:
      trimap = tf.io.decode_png(raw['segmentation_mask'], channels=1)
      trimap = tf.image.resize(trimap, (height, width), method='nearest')[..., 0]
      index = tf.minimum(tf.cast(trimap, tf.int32), len(_TRIMAP_TO_LABEL) - 1)
      label = tf.gather(tf.constant(_TRIMAP_TO_LABEL, tf.int32), index)
      out['label'] = tf.ensure_shape(label, (height, width))
    if 'species' in self.tasks:
      out['species'] = tf.cast(tf.reshape(raw['species'], ()), tf.int32)
    if 'bbox' in self.tasks:
      scale = tf.constant([height, width, height, width], tf.float32)
      out['bbox'] = tf.reshape(tf.cast(raw['head_bbox'], tf.float32), (4,)) * scale
    return out
