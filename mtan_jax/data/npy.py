"""Readers for the preprocessed .npy layouts released by the MTAN authors.

Both layouts store one array per example and target, numbered ``0.npy`` .. ``{N-1}.npy``:

* Cityscapes (128x256 or 256x512)::

    <root>/{train,val}/image/{i}.npy                   (H, W, 3) float in [0, 1]
    <root>/{train,val}/label_2|label_7|label_19/{i}.npy (H, W) -1 = ignore, else 0..C-1
    <root>/{train,val}/depth/{i}.npy                   (H, W, 1) inverse depth, 0 = invalid

* NYUv2 (288x384)::

    <root>/{train,val}/image/{i}.npy   (H, W, 3) float in [0, 1]
    <root>/{train,val}/label/{i}.npy   (H, W) -1 = ignore, else 0..12
    <root>/{train,val}/depth/{i}.npy   (H, W, 1) metres, 0 = invalid
    <root>/{train,val}/normal/{i}.npy  (H, W, 3) unit vectors, zero where invalid

Construction checks the directory structure and every file's .npy header (shape and
dtype) without reading pixel data, so a broken tree fails before training starts;
values are checked per example when it is loaded. Every problem raises a one-line
`DataError` naming the offending file or directory.
"""

import operator
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np

from mtan_jax.errors import ConfigError, DataError, one_line

_LAYOUTS = ('cityscapes', 'nyuv2')
_TASK_KEYS = {'semantic': 'label', 'depth': 'depth', 'normal': 'normal'}
# The targets each layout holds and its classes per label folder (also read by
# `mtan_jax.data.check_dataset` to check a config before any file is opened).
LAYOUT_TASKS = {
    'cityscapes': ('semantic', 'depth'),
    'nyuv2': ('semantic', 'depth', 'normal'),
}
DEFAULT_LABEL_DIR = {'cityscapes': 'label_7', 'nyuv2': 'label'}
CITYSCAPES_CLASSES = {'label_2': 2, 'label_7': 7, 'label_19': 19}
NYUV2_CLASSES = 13
# Upper sanity bounds: Cityscapes stores inverse depth (~0..0.49), NYUv2 metres (<~10).
# Values far above these mean a different preprocessing (disparity in pixels, millimetres).
_MAX_DEPTH = {'cityscapes': 10.0, 'nyuv2': 20.0}
# MTAN's SegNet backbone downsamples five times by 2, so H and W must divide by 32.
_STRIDE = 32
_IMAGE_TOL = 1e-3
_MAX_NORMAL_NORM = 1.01
# float/int only: object arrays would need pickle, strings/bools are not pixel data.
_NUMERIC_KINDS = 'fiu'
_INDEX_NAME = re.compile(r'(0|[1-9][0-9]*)\.npy')
_MAX_LISTED = 12


def _listing(directory: pathlib.Path) -> str:
  """Returns a short, one-line description of a directory's entries for error messages."""
  names = sorted(os.listdir(directory))
  if not names:
    return '(empty directory)'
  shown = ', '.join(names[:_MAX_LISTED])
  if len(names) > _MAX_LISTED:
    shown += f', ... ({len(names)} entries)'
  return shown


def _first_position(mask: np.ndarray) -> tuple[int, ...]:
  """Returns the index of the first True element of `mask` as a tuple of ints."""
  flat = int(np.flatnonzero(mask)[0])
  return tuple(int(i) for i in np.unravel_index(flat, mask.shape))


def _read_header(path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype]:
  """Reads an .npy header without touching the array data.

  Args:
    path: The .npy file.

  Returns:
    The array's shape and dtype.

  Raises:
    DataError: If the file cannot be opened, has a corrupt header, uses an unsupported
      format version or is shorter than its header says.
  """
  try:
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise DataError(
            f'{path}: .npy format version {version[0]}.{version[1]}, expected 1.0 or 2.0 '
            '(as written by np.save for numeric arrays)')
      data_offset = f.tell()
      file_size = os.fstat(f.fileno()).st_size
  except OSError as e:
    raise DataError(f'{path}: cannot open file ({one_line(e)}), expected a readable '
                    '.npy file') from e
  except ValueError as e:
    raise DataError(f'{path}: not a valid .npy file ({one_line(e)}), expected a file '
                    'written by np.save') from e
  if dtype.kind not in _NUMERIC_KINDS:
    return shape, dtype
  needed = data_offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if file_size < needed:
    raise DataError(f'{path}: file size {file_size} bytes, expected at least {needed} bytes for '
                    f'shape {shape} dtype {dtype} (file truncated or corrupt)')
  return shape, dtype


class NpyDataset:
  """One split of an MTAN npy layout.

  Attributes:
    root: The dataset root directory.
    split: The split name, e.g. 'train' or 'val'.
    layout: 'cityscapes' or 'nyuv2'.
    label_dir: Name of the semantic label subdirectory.
    tasks: The tasks whose targets are loaded.
    num_classes: Number of semantic classes; labels must lie in {-1} and [0, num_classes).
  """

  def __init__(self,
               root: str | os.PathLike,
               split: str,
               layout: str,
               label_dir: str | None = None,
               tasks: Sequence[str] | None = None,
               num_classes: int | None = None):
    """Checks the split's directory structure and every file header.

    Args:
      root: Dataset root containing the split directories.
      split: Split directory name under `root`, e.g. 'train' or 'val'.
      layout: 'cityscapes' or 'nyuv2'.
      label_dir: Semantic label subdirectory; defaults to 'label_7' for Cityscapes and
        'label' for NYUv2.
      tasks: Tasks whose targets are needed, out of 'semantic', 'depth' and 'normal';
        defaults to all tasks of the layout (Cityscapes has no normals).
      num_classes: Number of semantic classes; defaults to 2/7/19 for Cityscapes'
        label_2/label_7/label_19 and 13 for NYUv2.

    Raises:
      ConfigError: If `layout`, `tasks`, `label_dir` or `num_classes` is invalid.
      DataError: If the directory structure or any file header is malformed.
    """
    if layout not in _LAYOUTS:
      raise ConfigError(f'layout {layout!r}, expected one of {_LAYOUTS}')
    self.layout = layout
    self.tasks = self._check_tasks(layout, tasks)
    self.label_dir = DEFAULT_LABEL_DIR[layout] if label_dir is None else label_dir
    self.num_classes = self._check_num_classes(layout, self.label_dir, num_classes)
    self.root = pathlib.Path(root)
    self.split = split

    subdirs = {'image': 'image'}
    for task in self.tasks:
      key = _TASK_KEYS[task]
      subdirs[key] = self.label_dir if key == 'label' else key
    split_dir = self._check_structure(subdirs)
    self._dirs = {key: split_dir / name for key, name in subdirs.items()}
    self._len = self._check_file_names()
    # Set from image/0.npy by validate_headers, which reads the headers anyway.
    self._shape = (0, 0)
    self.validate_headers()

  @staticmethod
  def _check_tasks(layout: str, tasks: Sequence[str] | None) -> tuple[str, ...]:
    """Validates the requested tasks against the layout."""
    if tasks is None:
      return LAYOUT_TASKS[layout]
    if isinstance(tasks, str):
      raise ConfigError(f'tasks {tasks!r} is a string, expected a sequence of task names such '
                        f"as ('{tasks}',)")
    result = []
    for task in tasks:
      if task not in _TASK_KEYS:
        raise ConfigError(f'task {task!r}, expected one of {tuple(_TASK_KEYS)}')
      if task not in LAYOUT_TASKS[layout]:
        raise ConfigError(f'task {task!r} is not available for layout {layout!r} ({layout} has '
                          f'no {task} targets), expected tasks from {LAYOUT_TASKS[layout]}')
      if task not in result:
        result.append(task)
    return tuple(result)

  @staticmethod
  def _check_num_classes(layout: str, label_dir: str, num_classes: int | None) -> int:
    """Resolves and validates the number of semantic classes."""
    if num_classes is None:
      if layout == 'nyuv2':
        return NYUV2_CLASSES
      if label_dir not in CITYSCAPES_CLASSES:
        raise ConfigError(f'label_dir {label_dir!r} has no default num_classes, expected one of '
                          f'{tuple(CITYSCAPES_CLASSES)} or an explicit num_classes')
      return CITYSCAPES_CLASSES[label_dir]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
      raise ConfigError(f'num_classes {num_classes!r}, expected a positive integer')
    return num_classes

  def _check_structure(self, subdirs: dict[str, str]) -> pathlib.Path:
    """Checks that the root, the split directory and the needed subdirectories exist."""
    if not self.root.exists():
      raise DataError(f'{self.root}: dataset root does not exist, expected a directory '
                      f'containing {self.split}/')
    if not self.root.is_dir():
      raise DataError(f'{self.root}: dataset root is not a directory, expected a directory '
                      f'containing {self.split}/')
    split_dir = self.root / self.split
    if not split_dir.is_dir():
      raise DataError(f'{split_dir}: split directory {self.split!r} not found; {self.root} '
                      f'contains: {_listing(self.root)}')
    for name in subdirs.values():
      if not (split_dir / name).is_dir():
        raise DataError(f'{split_dir / name}: subdirectory {name!r} not found, expected '
                        f'{sorted(subdirs.values())} for {self.layout}; {split_dir} contains: '
                        f'{_listing(split_dir)}')
    return split_dir

  def _check_file_names(self) -> int:
    """Checks that every subdirectory holds 0.npy..{N-1}.npy with the same N.

    Returns:
      The number of examples N.
    """
    count = None
    image_dir = self._dirs['image']
    for directory in self._dirs.values():
      indices = set()
      for name in os.listdir(directory):
        # Other files (READMEs, .DS_Store) are harmless; only .npy names must be indices.
        if not name.endswith('.npy'):
          continue
        match = _INDEX_NAME.fullmatch(name)
        if match is None:
          raise DataError(f'{directory / name}: file name {name!r}, expected {{i}}.npy with i an '
                          'integer without leading zeros as in the MTAN npy layout')
        indices.add(int(match.group(1)))
      if not indices:
        raise DataError(f'{directory}: no .npy files, expected 0.npy..{{N-1}}.npy; directory '
                        f'contains: {_listing(directory)}')
      if len(indices) != max(indices) + 1:
        missing = min(set(range(max(indices) + 1)) - indices)
        raise DataError(f'{directory / f"{missing}.npy"}: file missing, found {len(indices)} '
                        f'files numbered up to {max(indices)}.npy, expected 0.npy..'
                        f'{max(indices)}.npy without gaps')
      if count is None:
        count = len(indices)
      elif len(indices) != count:
        raise DataError(f'{directory}: {len(indices)} .npy files but {image_dir} has {count}, '
                        'expected the same number of examples in every subdirectory')
    return count

  def _path(self, key: str, index: int) -> pathlib.Path:
    """Returns the file holding target `key` of example `index`."""
    return self._dirs[key] / f'{index}.npy'

  def validate_headers(self) -> None:
    """Checks every file's shape and dtype from its .npy header without reading data.

    Sets the split's (H, W) from ``image/0.npy``.

    Raises:
      DataError: If a header is corrupt, a dtype is not float/int, a shape does not match
        its target's expected shape or H/W is not divisible by 32.
    """
    first = self._path('image', 0)
    shape, _ = _read_header(first)
    if len(shape) != 3 or shape[2] != 3:
      raise DataError(f'{first}: image shape {shape}, expected (H, W, 3) RGB as in the MTAN npy '
                      'layout')
    height, width = shape[:2]
    if height <= 0 or width <= 0 or height % _STRIDE or width % _STRIDE:
      raise DataError(f'{first}: image size (H, W) = ({height}, {width}), expected positive H and '
                      f'W divisible by {_STRIDE} (MTAN pools five times by 2)')
    self._shape = (height, width)
    expected = {
        'image': (height, width, 3),
        'label': (height, width),
        'depth': (height, width, 1),
        'normal': (height, width, 3),
    }
    for key in self._dirs:
      for index in range(self._len):
        path = self._path(key, index)
        shape, dtype = _read_header(path)
        if dtype.kind not in _NUMERIC_KINDS:
          raise DataError(f'{path}: {key} dtype {dtype}, expected a float or integer array')
        if shape != expected[key]:
          raise DataError(f'{path}: {key} shape {shape}, expected {expected[key]} (same H, W '
                          f'as {first})')

  def __len__(self) -> int:
    """Returns the number of examples in the split."""
    return self._len

  @property
  def shape(self) -> tuple[int, int]:
    """The (H, W) of every example in the split."""
    return self._shape

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Loads and value-checks one example.

    Args:
      index: Example index; negative indices count from the end.

    Returns:
      A dict with 'image' (H, W, 3) float32 and, for the selected tasks, 'label' (H, W)
      int32, 'depth' (H, W, 1) float32 and 'normal' (H, W, 3) float32.

    Raises:
      IndexError: If `index` is out of range (this also ends iteration).
      DataError: If a file cannot be read or holds values outside its valid range.
    """
    index = operator.index(index)
    if not -self._len <= index < self._len:
      raise IndexError(f'index {index} out of range for {self._len} examples')
    index %= self._len
    checks = {
        'image': self._check_image,
        'label': self._check_label,
        'depth': self._check_depth,
        'normal': self._check_normal,
    }
    example = {}
    for key in self._dirs:
      path = self._path(key, index)
      example[key] = checks[key](path, self._load(path, key))
    return example

  @staticmethod
  def _load(path: pathlib.Path, key: str) -> np.ndarray:
    """Loads one array without pickle and rejects NaN/Inf."""
    try:
      array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise DataError(f'{path}: cannot read {key} data ({one_line(e)}), expected a valid '
                      'numeric .npy file') from e
    if array.dtype.kind == 'f':
      bad = ~np.isfinite(array)
      if bad.any():
        position = _first_position(bad)
        raise DataError(f'{path}: {key} value {array[position]} at {position} ({int(bad.sum())} '
                        'non-finite values), expected finite values')
    return array

  @staticmethod
  def _check_image(path: pathlib.Path, array: np.ndarray) -> np.ndarray:
    """Checks that the image is in [0, 1] and returns it as float32."""
    low, high = float(array.min()), float(array.max())
    if low < -_IMAGE_TOL or high > 1 + _IMAGE_TOL:
      hint = ''
      if low >= 0 and high <= 255:
        hint = '; values look like 0..255 pixels, divide by 255'
      raise DataError(f'{path}: image value range [{low:g}, {high:g}], expected floats in [0, 1] '
                      f"as in MTAN's npy images{hint}")
    return array.astype(np.float32, copy=False)

  def _check_label(self, path: pathlib.Path, array: np.ndarray) -> np.ndarray:
    """Checks that labels are integers in {-1} and [0, C) and returns them as int32."""
    if array.dtype.kind == 'f':
      fractional = array != np.round(array)
      if fractional.any():
        position = _first_position(fractional)
        raise DataError(f'{path}: label value {array[position]:g} at {position}, expected '
                        'integral class indices')
    invalid = (array != -1) & ((array < 0) | (array >= self.num_classes))
    if invalid.any():
      position = _first_position(invalid)
      value = array[position]
      hint = '; MTAN marks ignored pixels with -1' if value == 255 else ''
      raise DataError(f'{path}: label value {value:g} at {position}, expected -1 (ignore) or '
                      f'0..{self.num_classes - 1} for {self.num_classes} classes ({self.label_dir})'
                      f'{hint}')
    return array.astype(np.int32)

  def _check_depth(self, path: pathlib.Path, array: np.ndarray) -> np.ndarray:
    """Checks the depth range and returns it as float32."""
    low, high = float(array.min()), float(array.max())
    limit = _MAX_DEPTH[self.layout]
    if low < 0:
      raise DataError(f'{path}: depth minimum {low:g}, expected depth >= 0 (0 marks invalid '
                      'pixels)')
    if high > limit:
      meaning = 'inverse depth' if self.layout == 'cityscapes' else 'depth in metres'
      raise DataError(f'{path}: depth maximum {high:g}, expected {meaning} in [0, {limit:g}] as '
                      f"in MTAN's {self.layout} npy files")
    return array.astype(np.float32, copy=False)

  @staticmethod
  def _check_normal(path: pathlib.Path, array: np.ndarray) -> np.ndarray:
    """Checks that normals are unit vectors or zero and returns them as float32."""
    normal = array.astype(np.float32, copy=False)
    norms = np.linalg.norm(normal, axis=-1)
    too_long = norms > _MAX_NORMAL_NORM
    if too_long.any():
      position = _first_position(too_long)
      raise DataError(f'{path}: normal norm {float(norms[position]):g} at {position}, expected '
                      f'unit vectors (norm <= {_MAX_NORMAL_NORM}) or zero where invalid')
    return normal
