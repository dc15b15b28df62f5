"""Weight exchange with the PyTorch reference: its state_dict names <-> our NNX variables.

The reference (lorenmt/mtan) names parameters by module path, e.g. `encoder_block.0.0.weight`
(conv), `conv_block_enc.2.1.0.weight` (second conv of a two-conv block),
`encoder_att.1.2.4.running_mean` (task 1, level 2, the mask's second BatchNorm) and
`pred_task1.1.bias`. Our modules mirror that structure, so the mapping is mechanical:

- `ConvLayer` at P: conv <- P.0, BatchNorm <- P.1
- a one-conv block is the ConvLayer itself; a two-conv block holds ConvLayers at P.0 and P.1
- `AttentionMask` at P: conv1 <- P.0, bn1 <- P.1, conv2 <- P.3, bn2 <- P.4 (P.2 / P.5 are the
  parameter-free ReLU / sigmoid)
- `PredictionHead` at P: conv1 <- P.0, conv2 <- P.1
- conv weights (O, I, kh, kw) <-> kernels (kh, kw, I, O); BN weight/bias/running_mean/
  running_var <-> scale/bias/mean/var; `num_batches_tracked` is not needed (momentum is fixed).

Values are numpy arrays here, so this module needs no torch; `scripts/convert_torch_checkpoint.py`
reads `.pth` files.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx

from mtan_jax.errors import DataError
from mtan_jax.models.layers import AttentionMask, BatchNorm, ConvLayer, PredictionHead
from mtan_jax.models.mtan import MTAN
from mtan_jax.models.segnet import SegNet, SegNetBackbone

# Entries of a torch state_dict that carry no model value we need.
_IGNORED_SUFFIXES = ('num_batches_tracked',)


def _conv_vars(conv: nnx.Conv, prefix: str, out: dict) -> None:
  out[f'{prefix}.weight'] = (conv.kernel, 'conv')
  out[f'{prefix}.bias'] = (conv.bias, 'plain')


def _bn_vars(bn: BatchNorm, prefix: str, out: dict) -> None:
  for torch_name, var in (('weight', bn.scale), ('bias', bn.bias), ('running_mean', bn.mean),
                          ('running_var', bn.var)):
    out[f'{prefix}.{torch_name}'] = (var, 'plain')


def _module_vars(module, prefix: str, out: dict) -> None:
  if isinstance(module, ConvLayer):
    _conv_vars(module.conv, f'{prefix}.0', out)
    _bn_vars(module.bn, f'{prefix}.1', out)
  elif isinstance(module, AttentionMask):
    _conv_vars(module.conv1, f'{prefix}.0', out)
    _bn_vars(module.bn1, f'{prefix}.1', out)
    _conv_vars(module.conv2, f'{prefix}.3', out)
    _bn_vars(module.bn2, f'{prefix}.4', out)
  elif isinstance(module, PredictionHead):
    _conv_vars(module.conv1, f'{prefix}.0', out)
    _conv_vars(module.conv2, f'{prefix}.1', out)
  elif isinstance(module, nnx.List):
    if len(module) == 1 and isinstance(module[0], ConvLayer):
      # One-conv blocks are a bare Sequential(conv, bn, relu) in the reference.
      _module_vars(module[0], prefix, out)
    else:
      for i, child in enumerate(module):
        _module_vars(child, f'{prefix}.{i}', out)
  else:
    raise TypeError(f'no PyTorch name mapping for {type(module).__name__} at {prefix}')


def torch_variables(model: SegNetBackbone) -> dict[str, tuple[nnx.Variable, str]]:
  """Maps each reference state_dict name to (our variable, kind) for `model`."""
  out: dict[str, tuple[nnx.Variable, str]] = {}
  names = ['encoder_block', 'conv_block_enc', 'decoder_block', 'conv_block_dec']
  if isinstance(model, MTAN):
    names += ['encoder_att', 'decoder_att', 'encoder_block_att', 'decoder_block_att']
  for name in names:
    _module_vars(getattr(model, name), name, out)
  if isinstance(model, MTAN):
    for k, head in enumerate(model.heads()):
      _module_vars(head, f'pred_task{k + 1}', out)
    out['logsigma'] = (model.logsigma, 'plain')
  elif isinstance(model, SegNet):
    _module_vars(model.pred_task, 'pred_task', out)
  return out


def _to_ours(value: np.ndarray, kind: str) -> np.ndarray:
  return np.transpose(value, (2, 3, 1, 0)) if kind == 'conv' else value


def _to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  return np.transpose(value, (3, 2, 0, 1)) if kind == 'conv' else value


def _groups(names: list[str]) -> list[str]:
  """Names for an error message: the keys themselves when few, else their modules
  ('pred_task3', 'encoder_att.2', ...)."""
  if len(names) <= 3:
    return names
  groups = []
  for name in names:
    parts = name.split('.')
    group = '.'.join(parts[:2]) if parts[0] in ('encoder_att', 'decoder_att') else parts[0]
    if group not in groups:
      groups.append(group)
  return groups


def load_torch_state_dict(model: SegNetBackbone, state_dict: Mapping[str, np.ndarray],
                          source: str = 'state_dict') -> None:
  """Copies a reference state_dict (numpy values) into `model`, in place.

  Args:
    model: an MTAN or SegNet built with the same tasks and widths as the PyTorch model.
    state_dict: name -> numpy array (e.g. `{k: v.numpy() for k, v in sd.items()}`).
    source: where the state_dict came from, for error messages.

  Raises:
    DataError: a name is missing or unexpected, or a shape differs (the message names it).
  """
  targets = torch_variables(model)
  given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
  missing = sorted(set(targets) - set(given))
  unexpected = sorted(set(given) - set(targets))
  if missing or unexpected:
    raise DataError(f'{source} does not fit this model: {len(missing)} missing '
                    f'{_groups(missing)}, {len(unexpected)} unexpected {_groups(unexpected)}; '
                    f'check config.tasks, num_classes and widths')
  # Check every shape before writing anything, so a bad file never leaves a half-loaded model.
  values = {}
  for name, (var, kind) in targets.items():
    values[name] = _to_ours(np.asarray(given[name], np.float32), kind)
    if values[name].shape != var.shape:
      raise DataError(f'{source}: {name} has shape {np.asarray(given[name]).shape}, expected '
                      f'{_to_torch(np.zeros(var.shape), kind).shape} for this model')
  for name, (var, _) in targets.items():
    var[...] = values[name]


def export_torch_state_dict(model: SegNetBackbone) -> dict[str, np.ndarray]:
  """The model's weights as a reference state_dict (numpy arrays, torch layouts)."""
  return {name: np.ascontiguousarray(_to_torch(np.asarray(var[...]), kind))
          for name, (var, kind) in torch_variables(model).items()}
