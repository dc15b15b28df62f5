r"""The multi-task learning zoo: any architecture with any weighting method, on one data set.

The variant (after the colon) is `ARCH[,METHOD[,DATASET]]`; the rest is configs/mtan.py's
defaults for DATASET (cityscapes, nyuv2, synthetic or runlocal; default cityscapes):

  python scripts/train.py --config configs/zoo.py:split_wide,pcgrad,nyuv2 \
      --config.data_dir=/data/nyuv2 --workdir runs/split_wide_pcgrad

ARCH: mtan, segnet (single-task; several tasks = hard sharing), split, split_wide,
split_deep, dense, cross_stitch (the MTAN paper's baselines), stan (MTAN with the data set's
first task only), mtan_resnet50 (MTAN on a dilated ResNet-50 with DeepLabv3 heads).
METHOD: any of `mtan_jax.weighting.METHODS` (default: equal); its hyper-parameters via
--config.weighting_params="name=value,...". A grid of these with seeds and a results table:
scripts/sweep.py.
"""

import ml_collections

from configs import mtan as mtan_config

ARCHS = ('mtan', 'segnet', 'split', 'split_wide', 'split_deep', 'dense', 'cross_stitch', 'stan',
         'mtan_resnet50')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for `ARCH[,METHOD[,DATASET]]`."""
  parts = [p.strip() for p in (arg or 'mtan').split(',')]
  if len(parts) > 3:
    raise ValueError(f'configs/zoo.py:{arg}: expected ARCH[,METHOD[,DATASET]]')
  arch, method, dataset = (parts + ['equal', 'cityscapes'][len(parts) - 1:])[:3]
  if arch not in ARCHS:
    raise ValueError(f'configs/zoo.py: unknown architecture {arch!r}; expected one of {", ".join(ARCHS)}')
  c = mtan_config.get_config(dataset)
  c.model = 'mtan' if arch == 'stan' else arch
  if arch == 'stan':
    c.tasks = tuple(c.tasks[:1])
  c.weighting = method
  return c
