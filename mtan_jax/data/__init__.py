"""Data sources selected by the config: built-in synthetic scenes or MTAN's npy layouts."""

from __future__ import annotations

import os
from typing import Sequence

from mtan_jax.errors import ConfigError, DataError

DATASETS = ('synthetic', 'cityscapes', 'nyuv2')

_CITYSCAPES_CLASSES = {'label_2': 2, 'label_7': 7, 'label_19': 19}

_LAYOUT_HELP = {
    'cityscapes': ('<data_dir>/{train,val}/{image,label_7,depth}/{i}.npy as released by the MTAN '
                   'authors (128x256 or 256x512)'),
    'nyuv2': '<data_dir>/{train,val}/{image,label,depth,normal}/{i}.npy (288x384)',
}


def make_sources(config, task_names: Sequence[str]):
  """Returns (train_source, val_source) for `config.dataset`.

  Args:
    config: the run's ConfigDict (dataset, data_dir, label_dir, image_size, synthetic_*).
    task_names: the tasks being trained; decides which targets are loaded.

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
    size = tuple(config.image_size)
    if len(size) != 2:
      raise ConfigError(f'config.image_size={size}; expected (height, width), e.g. (128, 256)')
    h, w = (int(s) for s in size)
    # Validation scenes come from a disjoint index range of the same generator.
    train = SyntheticSource(config.synthetic_train_size, h, w, config.seed)
    val = SyntheticSource(config.synthetic_val_size, h, w, config.seed, offset=10_000_000)
    return train, val

  from mtan_jax.data.npy import NpyDataset  # pylint: disable=g-import-not-at-top
  if not config.data_dir:
    raise ConfigError(f'config.dataset={dataset!r} needs --config.data_dir pointing at '
                      f'{_LAYOUT_HELP[dataset]}; to train without downloading anything use '
                      f'configs/mtan.py:synthetic or configs/mtan.py:runlocal')
  if not os.path.isdir(config.data_dir):
    raise DataError(f'config.data_dir={config.data_dir!r} does not exist or is not a directory; '
                    f'expected {_LAYOUT_HELP[dataset]}')
  label_dir = config.get('label_dir') or None
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
