"""Raw Cityscapes as a TFDS dataset in MTAN's format, and a random-access reader for it.

The MTAN authors released Cityscapes only as preprocessed .npy files (see
`mtan_jax.data.npy`). This module rebuilds the same targets from the official packages
(registration at https://www.cityscapes-dataset.com required):

* ``leftImg8bit_trainvaltest.zip``: ``leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png``
* ``gtFine_trainvaltest.zip``: ``gtFine/{split}/{city}/{stem}_gtFine_labelIds.png``
* ``disparity_trainvaltest.zip``: ``disparity/{split}/{city}/{stem}_disparity.png``

with ``stem = {city}_{seq}_{frame}``, e.g. ``aachen_000000_000019``.

`CityscapesMtan` (TFDS name ``cityscapes_mtan``, configs ``128x256`` and ``256x512``) reads
them from the zips or from the extracted folders, and `CityscapesTfdsSource` reads the
prepared array_record files with random access, returning the same dict as
`mtan_jax.data.npy.NpyDataset`. ``scripts/prepare_cityscapes.py`` drives both and can also
write the MTAN npy layout.

Semantic targets, from the official label table (`LABELS`, a copy of
``cityscapesscripts.helpers.labels``, which this package does not depend on):

* ``label_19``: the official trainIds. Label ids 7 road, 8 sidewalk, 11 building, 12 wall,
  13 fence, 17 pole, 19 traffic light, 20 traffic sign, 21 vegetation, 22 terrain, 23 sky,
  24 person, 25 rider, 26 car, 27 truck, 28 bus, 31 train, 32 motorcycle, 33 bicycle become
  0..18 in that order; every other id (0-6, 9 parking, 10 rail track, 14 guard rail,
  15 bridge, 16 tunnel, 18 polegroup, 29 caravan, 30 trailer; trainId 255) becomes -1.
* ``label_7``: categoryId - 1, with the rule "every non-void label maps to its category":
  0 flat = ids 7-10 (incl. parking, rail track), 1 construction = 11-16 (incl. guard rail,
  bridge, tunnel), 2 object = 17-20 (incl. polegroup), 3 nature = 21-22, 4 sky = 23,
  5 human = 24-25, 6 vehicle = 26-33 (incl. caravan, trailer); void ids 0-6 become -1.
  Note that the official category-level evaluation of cityscapesscripts instead skips the
  ignoreInEval labels (parking, rail track, guard rail, bridge, tunnel, polegroup, caravan,
  trailer); which rule the MTAN authors' label_7 files follow is not documented.

Label id -1 (license plate) never appears in labelIds PNGs; any id above 33 is an error.

Depth target: inverse depth from the disparity PNGs, see `disparity_to_inverse_depth`.

Resizing: images bilinear with antialiasing (``tf.image.resize(antialias=True)``), because a
4x or 8x downscale without a low-pass filter aliases badly and PIL's ``Image.resize``, which
the MTAN authors' successor code (lorenmt/auto-lambda ``dataset/cityscapes_preprocess.py``)
uses, also filters over the whole footprint. Labels and disparity use nearest neighbour
(as in auto-lambda's preprocessing), picking the source pixel whose centre is closest to the
target pixel's centre, so a target value is always an original value. The disparity is not
rescaled by the resize factor (see `disparity_to_inverse_depth`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import operator
import os
import pathlib
import re
import struct
import zipfile
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mtan_jax.data.pipeline import import_tensorflow
from mtan_jax.errors import ConfigError, DataError, one_line

# --------------------------------------------------------------------------------------
# The official label table.
# --------------------------------------------------------------------------------------

Label = collections.namedtuple('Label',
                               ['name', 'id', 'train_id', 'category', 'category_id',
                                'ignore_in_eval'])

# Copied by hand from cityscapesscripts/helpers/labels.py (mcordts/cityscapesScripts);
# trainId 255 means "not one of the 19 training classes". License plate (id -1) is left out
# because it never appears in labelIds images.
LABELS: tuple[Label, ...] = (
    #      name                    id  trainId  category        catId  ignoreInEval
    Label('unlabeled',             0,  255,     'void',         0,     True),
    Label('ego vehicle',           1,  255,     'void',         0,     True),
    Label('rectification border',  2,  255,     'void',         0,     True),
    Label('out of roi',            3,  255,     'void',         0,     True),
    Label('static',                4,  255,     'void',         0,     True),
    Label('dynamic',               5,  255,     'void',         0,     True),
    Label('ground',                6,  255,     'void',         0,     True),
    Label('road',                  7,  0,       'flat',         1,     False),
    Label('sidewalk',              8,  1,       'flat',         1,     False),
    Label('parking',               9,  255,     'flat',         1,     True),
    Label('rail track',            10, 255,     'flat',         1,     True),
    Label('building',              11, 2,       'construction', 2,     False),
    Label('wall',                  12, 3,       'construction', 2,     False),
    Label('fence',                 13, 4,       'construction', 2,     False),
    Label('guard rail',            14, 255,     'construction', 2,     True),
    Label('bridge',                15, 255,     'construction', 2,     True),
    Label('tunnel',                16, 255,     'construction', 2,     True),
    Label('pole',                  17, 5,       'object',       3,     False),
    Label('polegroup',             18, 255,     'object',       3,     True),
    Label('traffic light',         19, 6,       'object',       3,     False),
    Label('traffic sign',          20, 7,       'object',       3,     False),
    Label('vegetation',            21, 8,       'nature',       4,     False),
    Label('terrain',               22, 9,       'nature',       4,     False),
    Label('sky',                   23, 10,      'sky',          5,     False),
    Label('person',                24, 11,      'human',        6,     False),
    Label('rider',                 25, 12,      'human',        6,     False),
    Label('car',                   26, 13,      'vehicle',      7,     False),
    Label('truck',                 27, 14,      'vehicle',      7,     False),
    Label('bus',                   28, 15,      'vehicle',      7,     False),
    Label('caravan',               29, 255,     'vehicle',      7,     True),
    Label('trailer',               30, 255,     'vehicle',      7,     True),
    Label('train',                 31, 16,      'vehicle',      7,     False),
    Label('motorcycle',            32, 17,      'vehicle',      7,     False),
    Label('bicycle',               33, 18,      'vehicle',      7,     False),
)
MAX_LABEL_ID = 33
# The 7 MTAN classes are the non-void categories in categoryId order.
CATEGORIES_7 = ('flat', 'construction', 'object', 'nature', 'sky', 'human', 'vehicle')
CLASSES_19 = tuple(label.name for label in sorted(LABELS, key=lambda label: label.train_id)
                   if label.train_id != 255)

# Lookup tables indexed by label id (0..33); -1 marks ignored pixels as in MTAN's files.
ID_TO_TRAIN_ID = np.array([-1 if label.train_id == 255 else label.train_id for label in LABELS],
                          np.int8)
ID_TO_CATEGORY_7 = np.array([label.category_id - 1 for label in LABELS], np.int8)

# --------------------------------------------------------------------------------------
# Disparity -> inverse depth.
# --------------------------------------------------------------------------------------

# Official encoding: disparity in pixels (at 2048x1024) = (p - 1) / 256 for p > 0.
DISPARITY_PNG_SCALE = 256.0
# Extra division that reproduces MTAN's released values (see disparity_to_inverse_depth).
INVERSE_DEPTH_PER_DISPARITY_PIXEL = 1.0 / 256.0


def disparity_to_inverse_depth(p: np.ndarray) -> np.ndarray:
  """Maps raw 16-bit Cityscapes disparity PNG values to MTAN's inverse depth.

  ``inverse_depth = (p - 1) / 65536`` for ``p > 0`` and ``0`` (invalid) for ``p == 0``,
  i.e. the full-resolution disparity in pixels, ``(p - 1) / 256``, divided by another 256.
  The scale is the same for every output resolution: the disparity is resized with nearest
  neighbour and not multiplied by the resize factor.

  Evidence:

  * lorenmt/mtan issue #15 (MTAN author, 2019): "we directly use raw disparity images from
    official CityScapes dataset as ground-truth (inverse) depth labels", no conversion to
    metric depth.
  * lorenmt/mtan issue #25: the author again says the released "inverse depth actually is
    the original cityscapes disparity data ... we did not apply any further processing",
    while a user reports raw PNG values 0..32257 and released .npy values 0..0.4922.
    32257 / 65536 = 0.49220 and (32257 - 1) / 65536 = 0.49219: the release is the raw PNG
    value over 2**16, which is what an image reader that normalises 16-bit PNGs to [0, 1]
    returns ("no further processing"), and equals the official disparity in pixels / 256.
  * sunxm2357/AdaShare issue #10: the 256x512 release also has a maximum of about 0.49, so
    the authors did not rescale the disparity with the image (unlike lorenmt/auto-lambda's
    ``create_dataset.py`` ``map_disparity``, which divides (p - 1) / 256 by 4 for its own
    256x512 PNGs and marks invalid pixels -1; that is a different, later convention).
    auto-lambda's ``dataset/cityscapes_preprocess.py`` resizes disparity with NEAREST.

  Uncertain: whether the release subtracts the official offset of 1 (p / 65535, p / 65536
  and (p - 1) / 65536 all round to 0.4922; they differ by at most 1.6e-5, about 0.1% of the
  published depth errors of ~0.013). We follow the official (p - 1) encoding so the values
  stay proportional to true inverse depth; a consequence is that p == 1 (zero disparity,
  infinitely far) becomes 0 and so counts as invalid.

  Args:
    p: Raw disparity PNG values (any integer array, normally uint16).

  Returns:
    float32 inverse depth of the same shape; 0 where ``p == 0``.
  """
  p = np.asarray(p)
  # (p - 1) < 2**16 and the scale is a power of two, so the float32 result is exact.
  value = (p.astype(np.float32) - 1.0) * np.float32(
      INVERSE_DEPTH_PER_DISPARITY_PIXEL / DISPARITY_PNG_SCALE)
  return np.where(p > 0, value, np.float32(0.0)).astype(np.float32)


# --------------------------------------------------------------------------------------
# Reading the raw packages.
# --------------------------------------------------------------------------------------

RESOLUTIONS = {'128x256': (128, 256), '256x512': (256, 512)}
SPLITS = ('train', 'val')  # The test split has no public labels.
_PACKAGES = ('leftImg8bit', 'gtFine', 'disparity')
_SUFFIX = {
    'leftImg8bit': '_leftImg8bit.png',
    'gtFine': '_gtFine_labelIds.png',
    'disparity': '_disparity.png',
}
_IMAGE_NAME = re.compile(r'(?P<stem>[^/_]+_\d+_\d+)_leftImg8bit\.png')
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
# PNG colour types: 0 grayscale, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA.
_COLOR_TYPES = {0: 'grayscale', 2: 'RGB', 3: 'palette', 4: 'grayscale+alpha', 6: 'RGBA'}
_MAX_LISTED = 12


def _listing(names: Sequence[str]) -> str:
  """Returns a short one-line list of names for error messages."""
  names = sorted(names)
  if not names:
    return '(nothing)'
  shown = ', '.join(names[:_MAX_LISTED])
  if len(names) > _MAX_LISTED:
    shown += f', ... ({len(names)} entries)'
  return shown


def _png_header(data: bytes, where: str) -> tuple[int, int, int, int]:
  """Reads (height, width, bit depth, colour type) from a PNG's IHDR chunk.

  Raises:
    DataError: If `data` does not start like a PNG file.
  """
  if len(data) < 26 or data[:8] != _PNG_SIGNATURE or data[12:16] != b'IHDR':
    raise DataError(f'{where}: not a PNG file ({len(data)} bytes, starts with {data[:8]!r}), '
                    'expected a PNG from the official Cityscapes package')
  width, height = struct.unpack('>II', data[16:24])
  return height, width, data[24], data[25]


def _decode_png(data: bytes, where: str, channels: int, dtype: tf.DType) -> np.ndarray:
  """Decodes a PNG with TensorFlow, reporting corrupt or truncated files as DataError."""
  try:
    return tf.io.decode_png(data, channels=channels, dtype=dtype).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    message = one_line(e.message).split('[Op:')[0].split('}}')[-1].strip()
    raise DataError(f'{where}: cannot decode PNG ({message}), expected a complete, valid PNG '
                    '(file truncated or corrupt?)') from e


def _nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest-neighbour resize picking the source pixel whose centre is closest.

  Matches PIL's NEAREST and tf.image.resize(method='nearest') with half-pixel centres.
  """
  rows = np.minimum(((np.arange(height) + 0.5) * array.shape[0] / height).astype(np.int64),
                    array.shape[0] - 1)
  cols = np.minimum(((np.arange(width) + 0.5) * array.shape[1] / width).astype(np.int64),
                    array.shape[1] - 1)
  return array[rows[:, None], cols[None, :]]


def _bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Antialiased bilinear resize of a uint8 RGB image, returned as uint8."""
  if image.shape[:2] == (height, width):
    return image
  resized = tf.image.resize(image, (height, width), method='bilinear', antialias=True).numpy()
  return np.clip(np.round(resized), 0, 255).astype(np.uint8)


class _Package:
  """One raw package (leftImg8bit, gtFine or disparity) as an extracted folder or a zip."""

  def __init__(self, manual_dir: pathlib.Path, name: str):
    self.name = name
    self._zip = None
    self._folder = None
    # The zip extracted in place gives <manual>/<name>/; extracted into its own folder it
    # gives <manual>/<name>_trainvaltest/<name>/.
    for folder in (manual_dir / name, manual_dir / f'{name}_trainvaltest' / name):
      if folder.is_dir():
        self._folder = folder
        self.location = str(folder)
        return
    zip_path = manual_dir / f'{name}_trainvaltest.zip'
    if not zip_path.is_file():
      raise DataError(
          f'{manual_dir}: neither {name}/ nor {name}_trainvaltest.zip found (directory holds: '
          f'{_listing(os.listdir(manual_dir))}), expected the official {name}_trainvaltest.zip '
          f'or its extracted {name}/ folder')
    try:
      self._zip = zipfile.ZipFile(zip_path)
      members = self._zip.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise DataError(f'{zip_path}: cannot open zip ({one_line(e)}), expected the official '
                      f'{name}_trainvaltest.zip') from e
    self.location = str(zip_path)
    # Members normally start with '<name>/'; allow a re-zipped copy with extra parent folders.
    self._prefix = None
    for member in members:
      parts = member.split('/')
      for i in range(len(parts) - 1):
        if parts[i] == name and parts[i + 1] in ('train', 'val', 'test'):
          self._prefix = '/'.join(parts[:i + 1]) + '/'
          break
      if self._prefix is not None:
        break
    self._members = members

  def describe(self, split: str, relative: str) -> str:
    """Names a file for error messages: a path, or 'zip:member' inside a zip."""
    if self._zip is not None:
      return f'{self.location}:{self._prefix or self.name + "/"}{split}/{relative}'
    return str(self._folder / split / relative)

  def list_split(self, split: str) -> set[str]:
    """Returns the '{city}/{file}' paths of all files of one split.

    Raises:
      DataError: If the package has no folder for `split`.
    """
    if self._zip is not None:
      start = f'{self._prefix}{split}/' if self._prefix else None
      found = {m[len(start):] for m in self._members
               if start and m.startswith(start) and not m.endswith('/')}
      if not found:
        tops = {m.split('/')[0] + ('/' if '/' in m else '') for m in self._members}
        raise DataError(f'{self.location}: no {self.name}/{split}/ folder inside the zip (top '
                        f'level holds: {_listing(tops)}), expected the official '
                        f'{self.name}_trainvaltest.zip with {self.name}/train/ and '
                        f'{self.name}/val/')
      return found
    split_dir = self._folder / split
    if not split_dir.is_dir():
      raise DataError(f'{split_dir}: split folder not found ({self._folder} holds: '
                      f'{_listing(os.listdir(self._folder))}), expected {self.name}/train/ and '
                      f'{self.name}/val/ as extracted from {self.name}_trainvaltest.zip')
    found = set()
    for dirpath, _, filenames in os.walk(split_dir):
      for filename in filenames:
        found.add(os.path.relpath(os.path.join(dirpath, filename), split_dir).replace(os.sep, '/'))
    return found

  def read(self, split: str, relative: str) -> bytes:
    """Returns the bytes of one file of a split."""
    where = self.describe(split, relative)
    try:
      if self._zip is not None:
        return self._zip.read(f'{self._prefix}{split}/{relative}')
      return (self._folder / split / relative).read_bytes()
    except (OSError, KeyError, zipfile.BadZipFile, EOFError) as e:
      raise DataError(f'{where}: cannot read file ({one_line(e)}), expected a readable PNG from '
                      f'the official {self.name} package') from e


@dataclasses.dataclass(frozen=True)
class Frame:
  """One annotated frame: where its three raw files are.

  Attributes:
    split: 'train' or 'val'.
    stem: '{city}_{seq}_{frame}', e.g. 'aachen_000000_000019'.
    relative: '{city}/{stem}' inside each package's split folder.
  """
  split: str
  stem: str
  relative: str

  def file(self, package: str) -> str:
    """The file's '{city}/{name}' path inside `package`'s split folder."""
    return self.relative + _SUFFIX[package]

  @property
  def file_name(self) -> str:
    """The image's path in the official naming, e.g. 'leftImg8bit/train/aachen/...png'."""
    return f'leftImg8bit/{self.split}/{self.file("leftImg8bit")}'


class RawCityscapes:
  """The three raw Cityscapes packages in a manual directory, as zips or folders."""

  def __init__(self, manual_dir: str | os.PathLike):
    """Finds the packages.

    Args:
      manual_dir: Directory holding leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip and
        disparity_trainvaltest.zip, or their extracted leftImg8bit/, gtFine/, disparity/.

    Raises:
      DataError: If the directory is missing or empty, or a package cannot be found.
    """
    self.manual_dir = pathlib.Path(manual_dir)
    if not self.manual_dir.is_dir():
      raise DataError(f'{self.manual_dir}: manual directory does not exist, expected a directory '
                      f'holding {_EXPECTED_PACKAGES}')
    if not os.listdir(self.manual_dir):
      raise DataError(f'{self.manual_dir}: manual directory is empty, expected '
                      f'{_EXPECTED_PACKAGES}')
    self.packages = {name: _Package(self.manual_dir, name) for name in _PACKAGES}

  def frames(self, split: str) -> list[Frame]:
    """Lists the frames of a split in file-name order, checking every image has its targets.

    Raises:
      DataError: If a split folder is missing, it has no images, or an image lacks its
        labelIds or disparity file.
    """
    files = {name: package.list_split(split) for name, package in self.packages.items()}
    frames = []
    for relative in sorted(files['leftImg8bit']):
      match = _IMAGE_NAME.fullmatch(relative.rsplit('/', 1)[-1])
      if match is None:
        continue  # Not an image of the official naming (e.g. a README).
      frame = Frame(split, match['stem'], relative[:-len(_SUFFIX['leftImg8bit'])])
      for package in ('gtFine', 'disparity'):
        if frame.file(package) not in files[package]:
          raise DataError(
              f'{self.packages["leftImg8bit"].describe(split, frame.file("leftImg8bit"))}: image '
              f'has no {package} file, expected '
              f'{self.packages[package].describe(split, frame.file(package))}')
      frames.append(frame)
    if not frames:
      raise DataError(f'{self.packages["leftImg8bit"].describe(split, "")}: no '
                      '{city}/{city}_{seq}_{frame}_leftImg8bit.png images found, expected the '
                      f'Cityscapes {split} images')
    return frames

  def example(self, frame: Frame, height: int, width: int) -> dict[str, np.ndarray | str]:
    """Reads, checks and resizes one frame into the dataset's features.

    Raises:
      DataError: On a corrupt/truncated PNG, a wrong bit depth or colour type, a label or
        disparity size different from the image's, or a label id above 33.
    """
    image_where, image_data = self._read(frame, 'leftImg8bit')
    label_where, label_data = self._read(frame, 'gtFine')
    disp_where, disp_data = self._read(frame, 'disparity')

    image_h, image_w, depth, color = _png_header(image_data, image_where)
    if depth != 8 or color not in (2, 6):
      raise DataError(f'{image_where}: {depth}-bit {_COLOR_TYPES.get(color, color)} PNG, expected '
                      'an 8-bit RGB leftImg8bit image')
    for where, data, bits, kind in ((label_where, label_data, 8, 'labelIds'),
                                    (disp_where, disp_data, 16, 'disparity')):
      h, w, depth, color = _png_header(data, where)
      if depth != bits or color != 0:
        hint = ''
        if kind == 'labelIds' and color != 0:
          hint = ' (the *_gtFine_color.png images are not label ids)'
        article = 'an' if bits == 8 else 'a'
        raise DataError(f'{where}: {depth}-bit {_COLOR_TYPES.get(color, color)} PNG, expected '
                        f'{article} {bits}-bit grayscale {kind} PNG{hint}')
      if (h, w) != (image_h, image_w):
        raise DataError(f'{where}: {kind} size (H, W) = ({h}, {w}), expected ({image_h}, '
                        f'{image_w}) like its image {image_where}')

    image = _decode_png(image_data, image_where, 3, tf.uint8)
    ids = _decode_png(label_data, label_where, 1, tf.uint8)[..., 0]
    disparity = _decode_png(disp_data, disp_where, 1, tf.uint16)[..., 0]
    bad = ids > MAX_LABEL_ID
    if bad.any():
      row, col = (int(i) for i in np.argwhere(bad)[0])
      raise DataError(f'{label_where}: label id {int(ids[row, col])} at (row {row}, col {col}) '
                      f'({int(bad.sum())} such pixels), expected Cityscapes label ids 0..'
                      f'{MAX_LABEL_ID}')

    ids = _nearest(ids, height, width)
    return {
        'image': _bilinear(image, height, width),
        'label_19': ID_TO_TRAIN_ID[ids],
        'label_7': ID_TO_CATEGORY_7[ids],
        'depth': disparity_to_inverse_depth(_nearest(disparity, height, width))[..., None],
        'file_name': frame.file_name,
    }

  def _read(self, frame: Frame, package: str) -> tuple[str, bytes]:
    relative = frame.file(package)
    return (self.packages[package].describe(frame.split, relative),
            self.packages[package].read(frame.split, relative))


# --------------------------------------------------------------------------------------
# The TFDS builder.
# --------------------------------------------------------------------------------------

_EXPECTED_PACKAGES = ('leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip and '
                      'disparity_trainvaltest.zip (or their extracted leftImg8bit/, gtFine/, '
                      'disparity/ folders)')
_MANUAL_DIR_MISSING = re.compile(r'Manual directory (.*?) does not exist or is empty')


@dataclasses.dataclass(eq=False)
class CityscapesMtanConfig(tfds.core.BuilderConfig):
  """A Cityscapes output resolution.

  Attributes:
    height: Output image height in pixels.
    width: Output image width in pixels.
  """
  height: int = 128
  width: int = 256


class CityscapesMtan(tfds.core.GeneratorBasedBuilder):
  """Cityscapes train/val at MTAN's resolutions: image, 19/7-class labels, inverse depth."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      CityscapesMtanConfig(name=name, height=h, width=w,
                           description=f'Images resized to {h}x{w} (H x W).')
      for name, (h, w) in RESOLUTIONS.items()
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Register at https://www.cityscapes-dataset.com/ and download, from its Downloads page,
  leftImg8bit_trainvaltest.zip (11 GB), gtFine_trainvaltest.zip (241 MB) and
  disparity_trainvaltest.zip (3.5 GB). Put the three zips (or their extracted
  leftImg8bit/, gtFine/ and disparity/ folders) into the manual directory, then run
  `python scripts/prepare_cityscapes.py --manual_dir DIR --data_dir DATA_DIR`.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    """No download checksums: everything comes from the manual directory.

    TFDS's default looks for a checksums file next to the builder's code, which needs the
    optional `importlib_resources` package; skipping the lookup keeps it optional.
    """
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    h, w = self.builder_config.height, self.builder_config.width
    # Raw tensors stored as bytes rather than PNG-encoded tfds.features.Image: random access
    # (tfds.data_source) then costs one record read plus np.frombuffer per example, with no
    # PNG decoding and no int64 upcasting of the default tf.Example encoding. The price is
    # disk space: ~0.29 MB per example at 128x256, ~0.9 GB for the train split (4x that at
    # 256x512).
    def tensor(shape, dtype, doc):
      return tfds.features.Tensor(shape=shape, dtype=dtype,
                                  encoding=tfds.features.Encoding.BYTES, doc=doc)
    return self.dataset_info_from_configs(
        description=('Cityscapes fine train/val images with 19-class and 7-category '
                     'semantic labels and inverse depth from disparity, in the MTAN format.'),
        features=tfds.features.FeaturesDict({
            'image': tensor((h, w, 3), np.uint8, 'RGB, bilinear antialiased resize.'),
            'label_19': tensor((h, w), np.int8, 'Official trainIds 0..18, -1 ignore.'),
            'label_7': tensor((h, w), np.int8, 'categoryId - 1 (0..6), -1 void.'),
            'depth': tensor((h, w, 1), np.float32, '(p - 1) / 65536 of disparity PNG, 0 invalid.'),
            'file_name': tfds.features.Text(doc='leftImg8bit/{split}/{city}/..._leftImg8bit.png'),
        }),
        homepage='https://www.cityscapes-dataset.com/',
        citation=('@inproceedings{Cordts2016Cityscapes, title={The Cityscapes Dataset for '
                  'Semantic Urban Scene Understanding}, author={Cordts, Marius and others}, '
                  'booktitle={CVPR}, year={2016}}'),
        # Keys are indices in file-name order, so example i is the same frame everywhere.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError as e:
      # TFDS reports an empty or missing manual dir as a multi-line AssertionError.
      match = _MANUAL_DIR_MISSING.search(str(e))
      where = match.group(1) if match else 'manual directory'
      raise DataError(f'{where}: manual directory is missing or empty, expected '
                      f'{_EXPECTED_PACKAGES}') from e
    raw = RawCityscapes(manual_dir)
    # List and pair every split before decoding anything, so structural problems (a missing
    # val folder, an image without its label) fail in seconds, not after the train split.
    frames = {split: raw.frames(split) for split in SPLITS}
    return {split: self._generate_examples(raw, frames[split]) for split in SPLITS}

  def _generate_examples(self, raw: RawCityscapes, frames: list[Frame]) -> Iterator:
    h, w = self.builder_config.height, self.builder_config.width
    for index, frame in enumerate(frames):
      yield index, raw.example(frame, h, w)


def _parse_resolution(resolution: str) -> str:
  if resolution not in RESOLUTIONS:
    raise ConfigError(f'resolution {resolution!r}, expected one of {tuple(RESOLUTIONS)}')
  return resolution


def prepare_dataset(manual_dir: str | os.PathLike, data_dir: str | os.PathLike,
                    resolution: str = '128x256') -> CityscapesMtan:
  """Builds ``cityscapes_mtan/<resolution>`` in array_record format under `data_dir`.

  Does nothing if that dataset version is already prepared there.

  Args:
    manual_dir: Directory with the three official zips or their extracted folders.
    data_dir: TFDS data directory to write to.
    resolution: '128x256' or '256x512'.

  Returns:
    The prepared builder.

  Raises:
    ConfigError: If `resolution` is unknown.
    DataError: If the raw data is missing or malformed.
  """
  resolution = _parse_resolution(resolution)
  RawCityscapes(manual_dir)  # One-line errors for a missing/empty dir before TFDS starts.
  import_tensorflow()  # Keeps decode/resize ops off the accelerator JAX uses.
  builder = CityscapesMtan(config=resolution, data_dir=os.fspath(data_dir),
                           file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(manual_dir),
          # Nothing to fetch: no GCS lookup (machines may be offline) and no statistics pass.
          try_download_gcs=False,
          compute_stats=tfds.download.ComputeStatsMode.SKIP,
      ),
      file_format='array_record')
  return builder


# --------------------------------------------------------------------------------------
# Random-access reader.
# --------------------------------------------------------------------------------------

# Classes per label folder and the tasks with targets (also read by `mtan_jax.data.check_dataset`).
LABEL_DIRS = {'label_7': 7, 'label_19': 19}
TASKS = ('semantic', 'depth')


def _prepare_hint(data_dir: str | os.PathLike, resolution: str) -> str:
  return (f'python scripts/prepare_cityscapes.py --manual_dir RAW_DIR --data_dir {data_dir} '
          f'--resolution {resolution}')


class CityscapesTfdsSource:
  """Random access to a prepared ``cityscapes_mtan`` split, like `NpyDataset`.

  Attributes:
    data_dir: The TFDS data directory.
    split: The TFDS split: 'train' or 'val', optionally sliced like 'train[:90%]'.
    resolution: '128x256' or '256x512'.
    label_dir: 'label_7' or 'label_19'.
    tasks: The tasks whose targets are returned.
    num_classes: 7 or 19.
  """

  def __init__(self, data_dir: str | os.PathLike, split: str, resolution: str = '128x256',
               label_dir: str = 'label_7', tasks: Sequence[str] = ('semantic', 'depth')):
    """Opens the prepared array_record files.

    Raises:
      ConfigError: If `split`, `resolution`, `label_dir` or `tasks` is invalid.
      DataError: If the dataset is not prepared in `data_dir` or not in array_record format.
    """
    self.resolution = _parse_resolution(resolution)
    if not isinstance(split, str) or split.split('[')[0] not in SPLITS:
      raise ConfigError(f'split {split!r}, expected one of {SPLITS}, optionally sliced like '
                        "'train[:90%]' (the Cityscapes test split has no public labels)")
    if label_dir not in LABEL_DIRS:
      raise ConfigError(f'label_dir {label_dir!r}, expected one of {tuple(LABEL_DIRS)} for '
                        'Cityscapes prepared from the raw packages')
    if isinstance(tasks, str):
      raise ConfigError(f'tasks {tasks!r} is a string, expected a sequence such as '
                        f"('{tasks}',)")
    for task in tasks:
      if task not in TASKS:
        raise ConfigError(f'task {task!r}, expected tasks from {TASKS} (Cityscapes has no '
                          'other targets)')
    self.tasks = tuple(dict.fromkeys(tasks))
    self.split = split
    self.label_dir = label_dir
    self.num_classes = LABEL_DIRS[label_dir]
    self.data_dir = os.fspath(data_dir)
    self._shape = RESOLUTIONS[resolution]
    self._check_prepared()
    import_tensorflow()  # Keeps decode/resize ops off the accelerator JAX uses.
    try:
      # download=False: a missing copy must fail here, not start a manual-download build.
      self._source = tfds.data_source(f'cityscapes_mtan/{resolution}', split=split,
                                      data_dir=self.data_dir, download=False)
    except (ValueError, KeyError) as e:
      # The dataset is there (checked above), so this is tfds rejecting the split string.
      raise ConfigError(f'split {split!r} for {self._version_dir}: {one_line(e)}; expected '
                        f"one of {SPLITS}, optionally sliced like 'train[:90%]'") from e
    except (NotImplementedError, OSError, AssertionError) as e:
      raise DataError(f'{self._version_dir}: cannot open prepared dataset ({one_line(e)}), '
                      'expected array_record files written by '
                      f'{_prepare_hint(self.data_dir, resolution)}') from e
    self._len = len(self._source)
    if self._len == 0:
      raise DataError(f'{self._version_dir}: split {split!r} has no examples, expected a '
                      'non-empty split')

  @property
  def _version_dir(self) -> pathlib.Path:
    return (pathlib.Path(self.data_dir) / 'cityscapes_mtan' / self.resolution /
            str(CityscapesMtan.VERSION))

  def _check_prepared(self) -> None:
    """Fails with a one-line hint when the dataset is absent or not random-access."""
    if not os.path.isdir(self.data_dir):
      raise DataError(f'{self.data_dir}: data_dir does not exist, expected a TFDS data directory '
                      f'prepared with {_prepare_hint(self.data_dir, self.resolution)}')
    info_path = self._version_dir / 'dataset_info.json'
    if not info_path.is_file():
      raise DataError(f'{self._version_dir}: prepared dataset not found, expected it to be built '
                      f'with {_prepare_hint(self.data_dir, self.resolution)}')
    try:
      info = json.loads(info_path.read_text())
    except (OSError, ValueError) as e:
      raise DataError(f'{info_path}: unreadable dataset info ({one_line(e)}), expected the JSON '
                      'written by TFDS; delete the folder and prepare it again') from e
    # TFDS omits the field for its default format, tfrecord.
    file_format = info.get('fileFormat', 'tfrecord')
    if file_format != 'array_record':
      raise DataError(f'{self._version_dir}: dataset prepared in {file_format} format, expected '
                      'array_record for random access; delete that folder and run '
                      f'{_prepare_hint(self.data_dir, self.resolution)}')

  def __len__(self) -> int:
    """Returns the number of examples in the split."""
    return self._len

  @property
  def shape(self) -> tuple[int, int]:
    """The (H, W) of every example."""
    return self._shape

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Reads one example.

    Args:
      index: Example index (file-name order); negative indices count from the end.

    Returns:
      A dict with 'image' (H, W, 3) float32 in [0, 1] and, for the selected tasks,
      'label' (H, W) int32 (-1 ignore) and 'depth' (H, W, 1) float32 (0 invalid).

    Raises:
      IndexError: If `index` is out of range (this also ends iteration).
    """
    index = operator.index(index)
    if not -self._len <= index < self._len:
      raise IndexError(f'index {index} out of range for {self._len} examples')
    record = self._source[index % self._len]
    example = {'image': record['image'].astype(np.float32) / np.float32(255.0)}
    if 'semantic' in self.tasks:
      example['label'] = record[self.label_dir].astype(np.int32)
    if 'depth' in self.tasks:
      example['depth'] = np.asarray(record['depth'], np.float32)
    return example


def write_npy_layout(data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     resolution: str = '128x256') -> dict[str, int]:
  """Writes a prepared dataset as MTAN's npy layout, readable by `NpyDataset`.

  Writes ``{out_dir}/{train,val}/image/{i}.npy`` (H, W, 3) float32 in [0, 1],
  ``label_7/{i}.npy`` and ``label_19/{i}.npy`` (H, W) float32 with -1 ignore (the released
  files hold floats too), and ``depth/{i}.npy`` (H, W, 1) float32 inverse depth, 0 invalid.
  Index i is the prepared dataset's example i (file-name order).

  Returns:
    The number of examples written per split.

  Raises:
    DataError: If the dataset is not prepared, or `out_dir` already holds a split folder
      that is not empty (mixing two preparations would silently corrupt the layout).
  """
  out = pathlib.Path(out_dir)
  for split in SPLITS:
    if (out / split).is_dir() and any((out / split).iterdir()):
      raise DataError(f'{out / split}: directory already exists and is not empty, expected a new '
                      'or empty --npy_out directory')
  counts = {}
  for split in SPLITS:
    source = CityscapesTfdsSource(data_dir, split, resolution)
    records = source._source  # pylint: disable=protected-access
    folders = {name: out / split / name for name in ('image', 'label_7', 'label_19', 'depth')}
    for folder in folders.values():
      folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(records)):
      record = records[i]
      np.save(folders['image'] / f'{i}.npy', record['image'].astype(np.float32) / np.float32(255))
      np.save(folders['label_7'] / f'{i}.npy', record['label_7'].astype(np.float32))
      np.save(folders['label_19'] / f'{i}.npy', record['label_19'].astype(np.float32))
      np.save(folders['depth'] / f'{i}.npy', np.asarray(record['depth'], np.float32))
    counts[split] = len(records)
  return counts
