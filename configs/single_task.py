r"""Single-task SegNet: the baseline that Delta_MTL compares multi-task models against.

Same protocol as configs/mtan.py (Adam 1e-4 halved at epoch 100, 200 epochs), one task:

  python scripts/train.py --config configs/single_task.py:semantic \
      --config.data_dir=/data/cityscapes128 --workdir runs/stl_semantic

Variants: semantic, depth (Cityscapes); nyuv2_semantic, nyuv2_depth, nyuv2_normal (NYUv2);
synthetic_semantic, synthetic_depth, synthetic_normal (built-in scenes). Its
final_metrics.json feeds `--config.single_task_baselines` of an MTAN run.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mtan  # pylint: disable=g-import-not-at-top,wrong-import-position

_TASKS = ('semantic', 'depth', 'normal')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the single-task config for variant `arg` ('[nyuv2_|synthetic_]TASK')."""
  arg = arg or 'semantic'
  dataset, _, task = arg.rpartition('_')
  if task not in _TASKS or dataset not in ('', 'nyuv2', 'synthetic'):
    raise ValueError(f'unknown variant {arg!r} of configs/single_task.py; expected TASK, nyuv2_TASK or '
                     f'synthetic_TASK with TASK one of {", ".join(_TASKS)}')
  if dataset == '' and task == 'normal':
    raise ValueError('Cityscapes has no surface normals; use nyuv2_normal or synthetic_normal')
  c = mtan.get_config(dataset or None)
  c.model = 'segnet'
  c.tasks = (task,)
  # One task: nothing to weight.
  c.weighting = 'equal'
  return c
