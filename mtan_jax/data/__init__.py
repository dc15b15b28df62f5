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

_CITYSCAPES_CLASSES = {'label_2': 2, 'label_7': 7, 'label_19': 19}

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
  dataset = config.dataset
  if dataset not in DATASETS:
    raise ConfigError(f'unknown config.dataset={dataset!r}; expected one of {", ".join(DATASETS)}')
  if dataset == 'synthetic':
    from mtan_jax.data.pipeline import SyntheticSource  # pylint: disable=g-import-not-at-top
    unknown = [t for t in task_names if t not in ('semantic', 'depth', 'normal')]
    if unknown:
      raise ConfigError(f'synthetic scenes have no targets for task(s) {unknown}')
    h, w = _image_size(config)
    # Validation scenes come from a disjoint index range of the same generator.
    train = SyntheticSource(config.synthetic_train_size, h, w, config.seed)
    val = SyntheticSource(config.synthetic_val_size, h, w, config.seed, offset=10_000_000)
    return train, val

  if not config.data_dir and dataset != 'pets':
    raise ConfigError(f'config.dataset={dataset!r} needs --config.data_dir pointing at '
                      f'{_LAYOUT_HELP[dataset]}; to train without downloading anything use '
                      f'configs/mtan.py:synthetic or configs/mtan.py:runlocal')
  if config.data_dir and not os.path.isdir(config.data_dir):
    raise DataError(f'config.data_dir={config.data_dir!r} does not exist or is not a directory; '
                    f'expected {_LAYOUT_HELP[dataset]}')
  splits = (config.train_split, config.val_split)
  if dataset == 'pets':
    from mtan_jax.data.pets import PetsSource  # pylint: disable=g-import-not-at-top
    if 'semantic' in task_names and config.num_classes != 2:
      raise ConfigError(f'config.num_classes={config.num_classes} but pet segmentation has 2 classes '
                        f'(background, pet); set --config.num_classes=2')
    return tuple(PetsSource(config.data_dir or None, split, _image_size(config), tuple(task_names))
                 for split in splits)
  label_dir = config.get('label_dir') or None
  if dataset == 'cityscapes_tfds':
    from mtan_jax.data.cityscapes_tfds import CityscapesTfdsSource  # pylint: disable=g-import-not-at-top
    h, w = _image_size(config)
    sources = tuple(CityscapesTfdsSource(config.data_dir, split, f'{h}x{w}', label_dir or 'label_7',
                                         tuple(task_names)) for split in splits)
    if 'semantic' in task_names and sources[0].num_classes != config.num_classes:
      raise ConfigError(f'config.num_classes={config.num_classes} but cityscapes_tfds labels '
                        f'{label_dir} have {sources[0].num_classes} classes; set '
                        f'--config.num_classes={sources[0].num_classes}')
    return sources
  from mtan_jax.data.npy import NpyDataset  # pylint: disable=g-import-not-at-top
  expected = _CITYSCAPES_CLASSES.get(label_dir) if dataset == 'cityscapes' else 13
  if expected is not None and expected != config.num_classes:
    raise ConfigError(f'config.num_classes={config.num_classes} but {dataset} labels '
                      f'{label_dir or "label"} have {expected} classes; set --config.num_classes={expected}')
  sources = tuple(NpyDataset(config.data_dir, split, dataset, label_dir=label_dir,
                             tasks=tuple(task_names), num_classes=config.num_classes)
                  for split in ('train', 'val'))
  if sources[0].shape != sources[1].shape:
    raise DataError(f'{config.data_dir}: train images are {sources[0].shape} but val images are '
                    f'{sources[1].shape}; expected one size')
  return sources
