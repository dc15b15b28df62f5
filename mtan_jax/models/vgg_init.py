"""Initialises the shared SegNet encoder from ImageNet-trained VGG16 convolutions.

SegNet's encoder is VGG16's 13-conv feature extractor: level i starts with
`encoder_block[i]` and continues with `conv_block_enc[i]` (1, 1, 2, 2, 2 convs), widths
(64, 128, 256, 512, 512). `init_encoder_from_vgg16` copies VGG16's conv kernels and biases
into those 13 `ConvLayer.conv`s and leaves everything else as initialised: the BatchNorm
after each conv (VGG16 has none), the decoder, the attention branches and the heads.

Weights files (`load_vgg16`):

* a torchvision state_dict saved with `torch.save` (`.pth` / `.pt`), e.g. torchvision's
  `vgg16-397923af.pth`. Its convs are `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}`
  with `.weight` (O, I, 3, 3) and `.bias` (O,); other keys (the classifier) are ignored.
  The batch-norm variant `vgg16_bn` is accepted too: its convs are
  `features.{0,3,7,10,14,17,20,24,27,30,34,37,40}`, and its BatchNorm parameters and
  statistics are ignored (the model's own BatchNorm stays freshly initialised).
* an `.npz` with the same key names and layouts (float arrays, no pickle), which needs no
  PyTorch to read. One line makes it from a .pth (PyTorch needed once, there)::

    python -c "import numpy as np, torch; sd = torch.load('vgg16-397923af.pth', \
map_location='cpu', weights_only=True); np.savez('vgg16.npz', **{k: v.numpy() for k, v in \
sd.items() if k.startswith('features.')})"

Inputs: VGG16 was trained on ImageNet-normalised RGB (per-channel mean/std), while this
project feeds images in [0, 1]. Every copied conv is followed by BatchNorm, which removes
the resulting (almost uniform, the three ImageNet stds are 0.224-0.229) scale and the
constant offset per output channel, so no input normalisation is added here.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np

from mtan_jax.errors import ConfigError, DataError, one_line

VGG16_WIDTHS = (64, 128, 256, 512, 512)
# torchvision `features` indices of the 13 convs, in network order.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_BN_CONV_INDICES = (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)
_CONVS_PER_LEVEL = (2, 2, 3, 3, 3)


def _conv_channels() -> list[tuple[int, int]]:
  """(in, out) channels of VGG16's 13 convs, in network order."""
  channels, cin = [], 3
  for width, n in zip(VGG16_WIDTHS, _CONVS_PER_LEVEL):
    for _ in range(n):
      channels.append((cin, width))
      cin = width
  return channels


def _encoder_paths() -> list[tuple[Any, ...]]:
  """Module paths of the SegNet encoder's 13 convs, in the same order as VGG16's."""
  paths = []
  for level, n in enumerate(_CONVS_PER_LEVEL):
    paths.append(('encoder_block', level, 'conv'))
    paths.extend(('conv_block_enc', level, k, 'conv') for k in range(n - 1))
  return paths


VGG16_CONV_CHANNELS = _conv_channels()
ENCODER_CONV_PATHS = _encoder_paths()


def _read_pth(path: pathlib.Path) -> dict[str, Any]:
  """Reads a torch.save'd state_dict as {name: numpy array} (tensors only)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f'{path}: reading a .pth needs PyTorch (pip install torch), expected it '
                      'installed or an .npz of the same weights (see mtan_jax/models/vgg_init.py '
                      'for the one-line conversion)') from e
  try:
    # weights_only: a state_dict needs no arbitrary unpickling, and a hostile file gets none.
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: cannot read as a PyTorch state_dict ({one_line(e)}), expected a '
                    "file written by torch.save(model.state_dict()) such as torchvision's "
                    'vgg16-397923af.pth') from e
  if not isinstance(state, dict):
    raise DataError(f'{path}: holds a {type(state).__name__}, expected a state_dict (a dict of '
                    "tensors named 'features.0.weight', ...)")
  return {str(k): v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _read_npz(path: pathlib.Path) -> dict[str, Any]:
  """Reads an .npz without pickle as {name: numpy array}."""
  try:
    with np.load(path, allow_pickle=False) as data:
      return {name: data[name] for name in data.files}
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: cannot read as .npz ({one_line(e)}), expected np.savez output with '
                    "arrays named 'features.0.weight', ...") from e


def _conv_indices(state: dict[str, Any], path: pathlib.Path) -> tuple[int, ...]:
  """Picks the vgg16 or vgg16_bn naming from the keys present."""
  if 'features.2.weight' in state or 'features.3.weight' not in state:
    return VGG16_CONV_INDICES
  # vgg16_bn: features.1 and .4 are BatchNorm (1-D weights), .3 is the second conv.
  if np.ndim(state['features.3.weight']) == 4:
    return VGG16_BN_CONV_INDICES
  raise DataError(f"{path}: 'features.3.weight' has shape {np.shape(state['features.3.weight'])}, "
                  'expected the torchvision vgg16 naming (convs features.0, .2, .5, ...) or '
                  'vgg16_bn (convs features.0, .3, .7, ...)')


def load_vgg16(path: str | os.PathLike) -> list[tuple[np.ndarray, np.ndarray]]:
  """Reads VGG16's 13 conv layers from a torchvision state_dict (.pth/.pt) or an .npz.

  Args:
    path: the weights file (see the module docstring for the formats).

  Returns:
    13 (kernel, bias) pairs in network order: kernel float32 (3, 3, I, O) (HWIO, Flax's
    layout, transposed from PyTorch's OIHW), bias float32 (O,).

  Raises:
    ConfigError: If a .pth is given and PyTorch is not installed.
    DataError: If the file is missing or unreadable, or a conv weight or bias is missing,
      has the wrong shape or holds non-finite values.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f'{path}: VGG16 weights file not found, expected a torchvision vgg16 '
                    'state_dict (.pth) or an .npz of it')
  suffix = path.suffix.lower()
  if suffix == '.npz':
    state = _read_npz(path)
  elif suffix in ('.pth', '.pt'):
    state = _read_pth(path)
  else:
    raise DataError(f'{path}: unknown weights file type {suffix!r}, expected .pth/.pt (torch.save '
                    'state_dict) or .npz')
  indices = _conv_indices(state, path)
  layers = []
  for index, (cin, cout) in zip(indices, VGG16_CONV_CHANNELS):
    pair = []
    for name, expected in ((f'features.{index}.weight', (cout, cin, 3, 3)),
                           (f'features.{index}.bias', (cout,))):
      if name not in state:
        raise DataError(f'{path}: key {name!r} missing, expected VGG16 conv weights under '
                        f'features.{{{",".join(map(str, indices))}}}.{{weight,bias}}')
      value = np.asarray(state[name])
      if value.shape != expected:
        raise DataError(f'{path}: {name} has shape {value.shape}, expected {expected} '
                        '(torchvision VGG16, OIHW)')
      if value.dtype.kind != 'f' or not np.isfinite(value).all():
        raise DataError(f'{path}: {name} has dtype {value.dtype} or non-finite values, expected '
                        'finite floats')
      pair.append(value.astype(np.float32))
    weight, bias = pair
    layers.append((np.ascontiguousarray(weight.transpose(2, 3, 1, 0)), bias))
  return layers


def _path_names(key_path) -> tuple[Any, ...]:
  """A jax key path as plain names: ('encoder_block', 0, 'conv', 'kernel')."""
  names = []
  for entry in key_path:
    if isinstance(entry, jax.tree_util.DictKey):
      name = entry.key
    elif isinstance(entry, jax.tree_util.SequenceKey):
      name = entry.idx
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      name = entry.name
    else:
      name = getattr(entry, 'key', entry)
    if isinstance(name, str) and name.isdigit():
      name = int(name)  # restored pure dicts may spell list indices as strings
    names.append(name)
  # nnx.State leaves sit under each Variable's `value`.
  if names and names[-1] == 'value':
    names.pop()
  return tuple(names)


def _dotted(path: tuple[Any, ...]) -> str:
  return '.'.join(str(p) for p in path)


def init_encoder_from_vgg16(params: Any, path: str | os.PathLike, in_channels: int = 3) -> Any:
  """Returns `params` with the 13 SegNet encoder convs replaced by VGG16's.

  Args:
    params: a SegNet or MTAN model's parameters: the `nnx.State` of `nnx.Param`s from
      `nnx.split(model, nnx.Param, nnx.BatchStat)` (what `Steps` / `TrainState.params`
      hold), or the same tree as a pure dict (`nnx.to_pure_dict(state)`).
    path: VGG16 weights file, see `load_vgg16`.
    in_channels: the model's input channels: 3 (RGB), or 1 for colorization, which feeds
      the L channel only. With 1, VGG's first kernel is summed over its three input
      channels: a gray image replicated to RGB (r = g = b = L) gives
      sum_c w[c] * L = (sum_c w[c]) * L, so the one-channel conv responds to L exactly as
      the RGB conv responds to the gray image.

  Returns:
    A new tree of the same structure (and array placement) with `encoder_block[i].conv`
    and `conv_block_enc[i][k].conv` kernels and biases from VGG16, cast to the parameters'
    dtypes; every other leaf (BatchNorm scale/bias, decoder, attention, heads, log-sigma)
    is the same object as in `params`.

  Raises:
    ConfigError: If `in_channels` is not 1 or 3, the model's first conv takes another number
      of channels, the widths are not VGG16's (64, 128, 256, 512, 512) or `params` is not a
      SegNet/MTAN parameter tree.
    DataError: If the weights file is missing or malformed (see `load_vgg16`).
  """
  if in_channels not in (1, 3):
    raise ConfigError(f'in_channels={in_channels!r} for VGG16 encoder init, expected 3 (RGB) or 1 '
                      '(L channel, colorization)')
  leaves = {_path_names(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  targets = {}
  for layer, module in enumerate(ENCODER_CONV_PATHS):
    for kind in ('kernel', 'bias'):
      key = module + (kind,)
      if key not in leaves:
        raise ConfigError(f'parameters have no {_dotted(key)}, expected the parameter state of a '
                          'SegNet or MTAN model (nnx.split(model, nnx.Param, nnx.BatchStat)[1])')
      targets[key] = (layer, kind)

  first = leaves[ENCODER_CONV_PATHS[0] + ('kernel',)]
  if np.ndim(first) == 4 and np.shape(first)[2] != in_channels:
    raise ConfigError(f'in_channels={in_channels} but the model\'s first conv '
                      f'{_dotted(ENCODER_CONV_PATHS[0])}.kernel takes {np.shape(first)[2]} input '
                      f'channels (shape {np.shape(first)}), expected them to agree')
  # Check every shape before loading anything big, so a width mismatch fails fast.
  for key, (layer, kind) in targets.items():
    cin, cout = VGG16_CONV_CHANNELS[layer]
    if layer == 0:
      cin = in_channels
    expected = (3, 3, cin, cout) if kind == 'kernel' else (cout,)
    found = tuple(np.shape(leaves[key]))
    if found != expected:
      raise ConfigError(f'encoder init from VGG16 needs config.widths={VGG16_WIDTHS}: '
                        f'{_dotted(key)} has shape {found}, VGG16 features.'
                        f'{VGG16_CONV_INDICES[layer]} gives {expected}')

  layers = load_vgg16(path)
  if in_channels == 1:
    kernel, bias = layers[0]
    layers[0] = (kernel.sum(axis=2, keepdims=True), bias)

  def replace(key_path, leaf):
    key = _path_names(key_path)
    if key not in targets:
      return leaf
    layer, kind = targets[key]
    value = layers[layer][0 if kind == 'kernel' else 1]
    value = value.astype(leaf.dtype if hasattr(leaf, 'dtype') else np.float32)
    if isinstance(leaf, jax.Array):
      # Keep the leaf's placement (one device or a sharding) for jitted steps.
      return jax.device_put(value, leaf.sharding)
    return value

  return jax.tree_util.tree_map_with_path(replace, params)
