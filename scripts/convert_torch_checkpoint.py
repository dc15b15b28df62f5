r"""Converts a PyTorch MTAN / SegNet checkpoint (`.pth`) into an mtan_jax checkpoint.

  python scripts/convert_torch_checkpoint.py --pth segnet_mtan.pth \
      --config configs/mtan.py:nyuv2 --workdir runs/imported

The `.pth` may hold a state_dict (as `torch.save(model.state_dict())` writes), a dict with
one under 'state_dict' or 'model', or a whole pickled model. The config must describe the
same model (tasks, num_classes, widths). The result is a step-0 checkpoint in
`<workdir>/checkpoints`: `scripts/train.py` with the same --workdir and config continues
training from the imported weights (with a fresh optimizer), and scripts/evaluate.py,
predict.py and export.py read it like any trained run (the config is saved beside it).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mtan_jax import cli
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.errors import MtanError
from mtan_jax.steps import Steps, create_model, make_optimizer
from mtan_jax.tasks import make_tasks
from mtan_jax.torch_import import load_torch_state_dict

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config describing the model.', lock_config=True)
_PTH = flags.DEFINE_string('pth', None, 'PyTorch checkpoint to convert.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where to write the mtan_jax checkpoint.')
flags.mark_flags_as_required(['config', 'pth', 'workdir'])


def read_pth(path: str) -> dict:
  """Loads a .pth file and returns its state_dict as numpy arrays."""
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise MtanError(f'{path} does not exist')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception:  # pylint: disable=broad-except
    # A whole pickled nn.Module needs the full unpickler (only for files you trust).
    obj = torch.load(path, map_location='cpu', weights_only=False)
  if hasattr(obj, 'state_dict'):
    obj = obj.state_dict()
  for key in ('state_dict', 'model'):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not all(hasattr(v, 'numpy') for v in obj.values()):
    raise MtanError(f'{path} holds no state_dict (expected name -> tensor)')
  # DataParallel checkpoints prefix every name with 'module.'.
  return {k.removeprefix('module.'): v.detach().cpu().float().numpy() for k, v in obj.items()}


def convert(config, pth: str, workdir: str) -> int:
  """Writes the converted checkpoint; returns the number of imported tensors."""
  # Refuse an occupied workdir before the expensive part (torch, model building).
  checkpointer = Checkpointer(workdir, async_save=False)
  if checkpointer.latest_step() is not None:
    raise MtanError(f'{checkpointer.directory} already holds checkpoints; choose a new --workdir')
  tasks = make_tasks(config.tasks, config.num_classes)
  model = create_model(config.model, tasks, config.widths, config.seed, config.dtype)
  state_dict = read_pth(pth)
  load_torch_state_dict(model, state_dict, source=pth)
  # Fresh Adam moments; the state's structure (not its values) depends on the schedule's kind.
  tx, _ = make_optimizer(config, steps_per_epoch=1)
  state = Steps(model, tx, config.weighting, config.dwa_temperature).init_state()
  checkpointer.save(0, state, {'data': {}, 'history': [], 'imported_from': os.path.abspath(pth)})
  checkpointer.close()
  # The config makes the workdir self-describing for evaluate.py, predict.py and export.py.
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json(indent=2))
  return len(state_dict)


def main():
  n = convert(_CONFIG.value, _PTH.value, _WORKDIR.value)
  print(f'imported {n} tensors from {_PTH.value} into {os.path.join(_WORKDIR.value, "checkpoints")}')


if __name__ == '__main__':
  cli.run(main)
