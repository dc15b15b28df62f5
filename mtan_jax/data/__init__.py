"""Data sources selected by the config.

- synthetic: built-in synthetic street scenes (no download);
- cityscapes / nyuv2: the MTAN authors' preprocessed npy layouts;
- cityscapes_tfds: raw Cityscapes prepared as a TFDS dataset by scripts/prepare_cityscapes.py;
- pets: TFDS `oxford_iiit_pet` (pet segmentation, species, head box).

Self-supervised tasks (edges, colorization, denoising) need nothing from a source: the
input pipeline makes their targets from the image, for every dataset.
"""

from __future__ import annotations

import os
from typing import Sequence

from mtan_jax.errors import ConfigError, DataError

DATASETS = ('synthetic', 'cityscapes', 'nyuv2', 'cityscapes_tfds', 'pets')
# The targets the built-in synthetic scenes carry (`synthetic.render_scene`).
SYNTHETIC_TASKS = ('semantic', 'depth', 'normal')

_LAYOUT_HELP = {
    'cityscapes': ('<data_dir>/{train,val}/{image,label_7,depth}/{i}.npy as released by the MTAN '
                   'authors (128x256 or 256x512)'),
    'nyuv2': '<data_dir>/{train,val}/{image,label,depth,normal}/{i}.npy (288x384)',
    'cityscapes_tfds': ('the TFDS data_dir scripts/prepare_cityscapes.py wrote '
                        '(<data_dir>/cityscapes_mtan/<H>x<W>/...)'),
    'pets': 'the TFDS data_dir holding oxford_iiit_pet in array_record format',
}


def _image_size(config) -> tuple[int, int]:
  size = tuple(config.image_size)
  if len(size) != 2:
    raise ConfigError(f'config.image_size={size}; expected (height, width), e.g. (128, 256)')
  return int(size[0]), int(size[1])


def target_tasks(dataset: str) -> tuple[str, ...]:
  """The tasks whose targets `dataset` holds (self-supervised tasks work with every dataset).

  Each reader's own list; only 'cityscapes_tfds' imports TensorFlow (its reader needs it anyway).
  """
  # pylint: disable=g-import-not-at-top
  if dataset == 'synthetic':
    return SYNTHETIC_TASKS
  if dataset in ('cityscapes', 'nyuv2'):
    from mtan_jax.data import npy
    return tuple(npy.LAYOUT_TASKS[dataset])
  if dataset == 'pets':
    from mtan_jax.data import pets
    return tuple(pets.TARGET_TASKS)
  from mtan_jax.data import cityscapes_tfds
  return tuple(cityscapes_tfds.TASKS)


def _label_classes(config) -> tuple[int | None, str]:
  """(classes of `config.dataset`'s semantic labels or None where any count goes, their name)."""
  # pylint: disable=g-import-not-at-top
  dataset = config.dataset
  label_dir = config.get('label_dir') or None
  if dataset == 'synthetic':
    from mtan_jax.data import synthetic
    return synthetic.NUM_CLASSES, 'synthetic scene labels'
  if dataset == 'pets':
    from mtan_jax.data import pets
    return pets.NUM_CLASSES, 'pet segmentation (background, pet)'
  if dataset == 'nyuv2':
    from mtan_jax.data import npy
    return npy.NYUV2_CLASSES, f'nyuv2 labels {label_dir or npy.DEFAULT_LABEL_DIR[dataset]}'
  if dataset == 'cityscapes':
    from mtan_jax.data import npy
    label_dir = label_dir or npy.DEFAULT_LABEL_DIR[dataset]
    # Another label folder of one's own making: the config's num_classes is taken as given.
    return npy.CITYSCAPES_CLASSES.get(label_dir), f'cityscapes labels {label_dir}'
  from mtan_jax.data import cityscapes_tfds
  label_dir = label_dir or 'label_7'
  if label_dir not in cityscapes_tfds.LABEL_DIRS:
    raise ConfigError(f'config.label_dir={label_dir!r}; cityscapes_tfds has the label folders '
                      f'{", ".join(cityscapes_tfds.LABEL_DIRS)}')
  return cityscapes_tfds.LABEL_DIRS[label_dir], f'cityscapes_tfds labels {label_dir}'


def check_dataset(config, task_names: Sequence[str]) -> None:
  """Checks the config's data settings without opening any data file.

  The known dataset, a data_dir that exists where the dataset needs one, the number of
  semantic classes its labels have, the tasks it has targets for and (cityscapes_tfds) a
  prepared resolution. `make_sources` starts with it, and `mtan_jax.config_checks` runs it
  before anything is built.

  Args:
    config: the run's ConfigDict.
    task_names: the tasks whose targets come from the dataset (not the self-supervised ones).

  Raises:
    ConfigError: a one-line message naming the `config.<key>` and what was expected.
    DataError: `config.data_dir` does not exist or is not a directory.
  """
  dataset = config.dataset
  if dataset not in DATASETS:
    raise ConfigError(f'unknown config.dataset={dataset!r}; expected one of {", ".join(DATASETS)}')
  if dataset != 'synthetic':
    if not config.data_dir and dataset != 'pets':
      raise ConfigError(f'config.dataset={dataset!r} needs --config.data_dir pointing at '
                        f'{_LAYOUT_HELP[dataset]}; to train without downloading anything use '
                        f'configs/mtan.py:synthetic or configs/mtan.py:runlocal')
    if config.data_dir and not os.path.isdir(config.data_dir):
      raise DataError(f'config.data_dir={config.data_dir!r} does not exist or is not a directory; '
                      f'expected {_LAYOUT_HELP[dataset]}')
  if 'semantic' in task_names:
    expected, what = _label_classes(config)
    if expected is not None and expected != config.num_classes:
      raise ConfigError(f'config.num_classes={config.num_classes} but {what} have {expected} classes; '
                        f'set --config.num_classes={expected}')
  provided = target_tasks(dataset)
  missing = [t for t in task_names if t not in provided]
  if missing:
    raise ConfigError(f'config.tasks={tuple(task_names)}: config.dataset={dataset!r} has no targets '
                      f'for {", ".join(missing)}; it provides {", ".join(provided)} (the self-supervised '
                      f'tasks edges, colorization and denoising work with any dataset)')
  if dataset == 'cityscapes_tfds':
    from mtan_jax.data import cityscapes_tfds  # pylint: disable=g-import-not-at-top
    h, w = _image_size(config)
    if f'{h}x{w}' not in cityscapes_tfds.RESOLUTIONS:
      raise ConfigError(f'config.image_size={(h, w)}; cityscapes_tfds is prepared at '
                        f'{" or ".join(cityscapes_tfds.RESOLUTIONS)} (scripts/prepare_cityscapes.py)')


def make_sources(config, task_names: Sequence[str]):
  """Returns (train_source, val_source) for `config.dataset`.

  Args:
    config: the run's ConfigDict (dataset, data_dir, label_dir, image_size, train_split,
      val_split, synthetic_*).
    task_names: the tasks whose targets come from the dataset (not the self-supervised
      ones); decides which targets are loaded.

  Returns:
    Two indexable sources with `shape` (H, W) and `num_classes`.
  """
  check_dataset(config, task_names)
  dataset = config.dataset
  if dataset == 'synthetic':
    from mtan_jax.data.pipeline import SyntheticSource  # pylint: disable=g-import-not-at-top
    h, w = _image_size(config)
    # Validation scenes come from a disjoint index range of the same generator.
    train = SyntheticSource(config.synthetic_train_size, h, w, config.seed)
    val = SyntheticSource(config.synthetic_val_size, h, w, config.seed, offset=10_000_000)
    return train, val

  splits = (config.train_split, config.val_split)
  if dataset == 'pets':
    from mtan_jax.data.pets import PetsSource  # pylint: disable=g-import-not-at-top
    return tuple(PetsSource(config.data_dir or None, split, _image_size(config), tuple(task_names))
                 for split in splits)
  label_dir = config.get('label_dir') or None
  if dataset == 'cityscapes_tfds':
    from mtan_jax.data.cityscapes_tfds import CityscapesTfdsSource  # pylint: disable=g-import-not-at-top
    h, w = _image_size(config)
    return tuple(CityscapesTfdsSource(config.data_dir, split, f'{h}x{w}', label_dir or 'label_7',
                                      tuple(task_names)) for split in splits)
  from mtan_jax.data.npy import NpyDataset  # pylint: disable=g-import-not-at-top
  sources = tuple(NpyDataset(config.data_dir, split, dataset, label_dir=label_dir,
                             tasks=tuple(task_names), num_classes=config.num_classes)
                  for split in ('train', 'val'))
  if sources[0].shape != sources[1].shape:
    raise DataError(f'{config.data_dir}: train images are {sources[0].shape} but val images are '
                    f'{sources[1].shape}; expected one size')
  return sources
