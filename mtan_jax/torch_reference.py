"""PyTorch re-implementation of SegNet-MTAN and single-task SegNet, for parity tests.

The public reference (lorenmt/mtan, `im2im_pred/model_segnet_mtan.py` and
`model_segnet_single.py`) hard-codes NYUv2's three tasks and runs training at import.
`TorchMTAN` and `TorchSegNet` are independent definitions that build modules with the
same state_dict keys, shapes, initialisation and forward computation as those scripts, for
any list of tasks, so that a reference checkpoint loads into them unchanged and their
outputs can be compared against the JAX models.

`load_reference_segnet` returns the reference `SegNet` class itself, without executing the
script around it, so tests can check the re-implementation against the original.

Only tests and benchmarks import this module; it imports torch eagerly, so importing it
without torch installed raises ImportError (which `pytest.importorskip` expects).
"""

import ast
import os
import pathlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WIDTHS = (64, 128, 256, 512, 512)
TASK_KINDS = ('semantic', 'depth', 'normal')


def _conv_layer(in_ch: int, out_ch: int) -> nn.Sequential:
  """3x3 conv -> BN -> ReLU; keys `0.*` (conv) and `1.*` (BN) as in the reference."""
  return nn.Sequential(
      nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
      nn.BatchNorm2d(out_ch),
      nn.ReLU(inplace=True),
  )


def _att_layer(in_ch: int, mid_ch: int, out_ch: int) -> nn.Sequential:
  """Attention mask: 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> sigmoid."""
  return nn.Sequential(
      nn.Conv2d(in_ch, mid_ch, kernel_size=1),
      nn.BatchNorm2d(mid_ch),
      nn.ReLU(inplace=True),
      nn.Conv2d(mid_ch, out_ch, kernel_size=1),
      nn.BatchNorm2d(out_ch),
      nn.Sigmoid(),
  )


def _head(width: int, out_ch: int) -> nn.Sequential:
  """Prediction head: 3x3 conv keeping the width, then 1x1 conv to the task channels."""
  return nn.Sequential(
      nn.Conv2d(width, width, kernel_size=3, padding=1),
      nn.Conv2d(width, out_ch, kernel_size=1),
  )


def _activate(kind: str, logits: torch.Tensor) -> torch.Tensor:
  """Maps raw head outputs to the task's prediction space."""
  if kind == 'semantic':
    return F.log_softmax(logits, dim=1)
  if kind == 'normal':
    return logits / torch.norm(logits, p=2, dim=1, keepdim=True)
  return logits


def _check_task(task: tuple[str, int]) -> tuple[str, int]:
  """Validates one `(kind, channels)` pair and returns it as a plain tuple."""
  kind, channels = task
  if kind not in TASK_KINDS:
    raise ValueError(f'unknown task kind {kind!r}; expected one of {TASK_KINDS}')
  if int(channels) < 1:
    raise ValueError(f'task {kind!r} needs at least one output channel, got {channels}')
  return kind, int(channels)


class _SegNetTrunk(nn.Module):
  """Shared SegNet encoder/decoder used by both the single-task and the MTAN network.

  Registers `encoder_block`, `decoder_block`, `conv_block_enc` and `conv_block_dec` first,
  because the reference registers them first and both its state_dict order and the order in
  which `_init_weights` draws random numbers follow registration order.
  """

  def __init__(self, widths: Sequence[int], in_channels: int):
    """Builds the shared layers.

    Args:
      widths: channel width of each encoder level, shallowest first.
      in_channels: channels of the input image.

    Raises:
      ValueError: on fewer than two levels.
    """
    super().__init__()
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2:
      raise ValueError(f'widths needs at least two levels, got {widths}')
    self.widths = widths
    levels = range(len(widths))
    # Encoder level i maps the previous level's width to widths[i]; the decoder block at
    # the same level maps back, except level 0 which stays at widths[0] for the head.
    self.encoder_block = nn.ModuleList(
        _conv_layer(in_channels if i == 0 else widths[i - 1], widths[i]) for i in levels)
    self.decoder_block = nn.ModuleList(
        _conv_layer(widths[i], widths[max(i - 1, 0)]) for i in levels)
    # The two shallowest levels get one extra conv layer, deeper ones two (SegNet's
    # VGG-16 layout). The decoder side runs at the output width of its decoder block.
    self.conv_block_enc = nn.ModuleList(self._stack(i, widths[i]) for i in levels)
    self.conv_block_dec = nn.ModuleList(
        self._stack(i, widths[max(i - 1, 0)]) for i in levels)
    self.down_sampling = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)
    self.up_sampling = nn.MaxUnpool2d(kernel_size=2, stride=2)

  @staticmethod
  def _stack(level: int, width: int) -> nn.Sequential:
    """The extra same-width conv layers at one level."""
    if level < 2:
      return _conv_layer(width, width)
    return nn.Sequential(_conv_layer(width, width), _conv_layer(width, width))

  def _init_weights(self) -> None:
    """Xavier-normal conv weights, zero biases, identity BN, as the reference does."""
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.xavier_normal_(m.weight)
        nn.init.zeros_(m.bias)
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

  def _shared(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Runs the shared encoder/decoder and keeps the features attention needs.

    Returns lists indexed by level (0 = full resolution): `enc_first` (encoder block
    output), `enc_last` (end of the level's conv stack, before pooling), `dec_in` (unpooled
    input of the decoder level) and `dec_out` (end of the decoder level's conv stack).
    """
    n = len(self.widths)
    enc_first, enc_last, indices = [], [], []
    h = x
    for level in range(n):
      first = self.encoder_block[level](h)
      last = self.conv_block_enc[level](first)
      h, idx = self.down_sampling(last)
      enc_first.append(first)
      enc_last.append(last)
      indices.append(idx)
    dec_in, dec_out = [None] * n, [None] * n
    for level in reversed(range(n)):
      dec_in[level] = self.up_sampling(h, indices[level])
      h = self.conv_block_dec[level](self.decoder_block[level](dec_in[level]))
      dec_out[level] = h
    return {'enc_first': enc_first, 'enc_last': enc_last, 'dec_in': dec_in,
            'dec_out': dec_out}


class TorchSegNet(_SegNetTrunk):
  """Single-task SegNet matching the reference `model_segnet_single.py`.

  Attributes:
    task: the `(kind, channels)` pair predicted by `pred_task`.
  """

  def __init__(self, task: tuple[str, int], widths: Sequence[int] = DEFAULT_WIDTHS,
               in_channels: int = 3):
    """Builds the network.

    Args:
      task: `(kind, channels)` with kind in `TASK_KINDS`, e.g. `('semantic', 13)`.
      widths: channel width of each encoder level, shallowest first.
      in_channels: channels of the input image.

    Raises:
      ValueError: on an unknown task kind, non-positive channels or fewer than two levels.
    """
    super().__init__(widths, in_channels)
    self.task = _check_task(task)
    self.pred_task = _head(self.widths[0], self.task[1])
    self._init_weights()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """Predicts the task from an NCHW image whose height and width divide by 2**levels."""
    features = self._shared(x)
    return _activate(self.task[0], self.pred_task(features['dec_out'][0]))


class TorchMTAN(_SegNetTrunk):
  """SegNet-MTAN matching the reference `model_segnet_mtan.py`, for any list of tasks.

  Each task gets its own attention masks (`encoder_att[t]`, `decoder_att[t]`) over the
  shared features; the attended task features pass through `encoder_block_att` /
  `decoder_block_att`, which all tasks share, and end in head `pred_task{t+1}`.

  Attributes:
    tasks: the `(kind, channels)` pairs, in head order.
    logsigma: per-task log-variance for uncertainty weighting, initialised to -0.5.
  """

  def __init__(self, tasks: Sequence[tuple[str, int]],
               widths: Sequence[int] = DEFAULT_WIDTHS, in_channels: int = 3):
    """Builds the network.

    Args:
      tasks: `(kind, channels)` pairs, e.g. `[('semantic', 13), ('depth', 1)]`.
      widths: channel width of each encoder level, shallowest first. The last two must be
        equal: the deepest decoder mask sees the unpooled deepest features next to the
        task features, both at the deepest width, but is sized for the level above.
      in_channels: channels of the input image.

    Raises:
      ValueError: on no tasks, an invalid task, fewer than two levels or unequal last two
        widths.
    """
    super().__init__(widths, in_channels)
    self.tasks = tuple(_check_task(t) for t in tasks)
    if not self.tasks:
      raise ValueError('TorchMTAN needs at least one task')
    w = self.widths
    if w[-1] != w[-2]:
      raise ValueError(f'the last two widths must be equal, got {w}')
    levels = range(len(w))
    # Encoder masks read the level's first encoder features, concatenated (from level 1 on)
    # with the task features coming up from the level below. Decoder masks read the
    # unpooled shared features concatenated with the upsampled task features, and gate the
    # decoder level's output, which has the width of the level above.
    self.encoder_att = nn.ModuleList(
        nn.ModuleList(
            _att_layer(w[i] if i == 0 else 2 * w[i], w[i], w[i]) for i in levels)
        for _ in self.tasks)
    self.decoder_att = nn.ModuleList(
        nn.ModuleList(
            _att_layer(w[i] + w[max(i - 1, 0)], w[max(i - 1, 0)], w[max(i - 1, 0)])
            for i in levels)
        for _ in self.tasks)
    # Shared task-feature convs: on the way down they widen to the next level's width,
    # on the way up they narrow to the level above; the deepest keeps its width both ways.
    last = len(w) - 1
    self.encoder_block_att = nn.ModuleList(
        _conv_layer(w[i], w[min(i + 1, last)]) for i in levels)
    self.decoder_block_att = nn.ModuleList(
        _conv_layer(w[i], w[i] if i == last else w[max(i - 1, 0)]) for i in levels)
    for t, (_, channels) in enumerate(self.tasks):
      self.add_module(f'pred_task{t + 1}', _head(w[0], channels))
    self.logsigma = nn.Parameter(torch.full((len(self.tasks),), -0.5))
    self._init_weights()

  def _attend(self, t: int, features: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """Runs task `t`'s attention path down the encoder and up the decoder."""
    h = None
    for level, first in enumerate(features['enc_first']):
      mask_in = first if h is None else torch.cat((first, h), dim=1)
      gated = self.encoder_att[t][level](mask_in) * features['enc_last'][level]
      # The pooling here is a plain max pool; its indices are not reused.
      h = F.max_pool2d(self.encoder_block_att[level](gated), kernel_size=2, stride=2)
    for level in reversed(range(len(self.widths))):
      # Bilinear upsampling, not unpooling: the task path has no pooling indices of its own.
      up = F.interpolate(h, scale_factor=2, mode='bilinear', align_corners=True)
      up = self.decoder_block_att[level](up)
      mask = self.decoder_att[t][level](torch.cat((features['dec_in'][level], up), dim=1))
      h = mask * features['dec_out'][level]
    return h

  def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], nn.Parameter]:
    """Predicts every task from an NCHW image whose height and width divide by 2**levels.

    Returns:
      `(predictions, logsigma)`: one tensor per task in task order, and the log-variances.
    """
    features = self._shared(x)
    predictions = []
    for t, (kind, _) in enumerate(self.tasks):
      head = getattr(self, f'pred_task{t + 1}')
      predictions.append(_activate(kind, head(self._attend(t, features))))
    return predictions, self.logsigma


def load_reference_segnet(checkout: str | os.PathLike) -> type:
  """Returns the original `SegNet` class of a lorenmt/mtan checkout.

  The reference script parses command-line flags and starts training at module level, so
  it cannot be imported. Only its `SegNet` class definition is executed, in a namespace
  holding the names the class body uses (`torch`, `nn`, `F`); the script's star imports
  of its data and training helpers are skipped because the class does not need them.

  Args:
    checkout: root of a checkout containing `im2im_pred/model_segnet_mtan.py`.

  Returns:
    The reference `SegNet` class (NYUv2's three tasks, widths 64..512).

  Raises:
    FileNotFoundError: if the script is missing.
    ValueError: if the script defines no top-level class `SegNet`.
  """
  path = pathlib.Path(checkout) / 'im2im_pred' / 'model_segnet_mtan.py'
  if not path.is_file():
    raise FileNotFoundError(f'MTAN reference script not found: {path}')
  tree = ast.parse(path.read_text(encoding='utf-8'), filename=str(path))
  classes = [node for node in tree.body
             if isinstance(node, ast.ClassDef) and node.name == 'SegNet']
  if not classes:
    raise ValueError(f'no top-level class SegNet in {path}')
  namespace = {'__name__': 'model_segnet_mtan', 'torch': torch, 'nn': nn, 'F': F}
  module = ast.Module(body=classes[-1:], type_ignores=[])
  exec(compile(module, str(path), 'exec'), namespace)  # pylint: disable=exec-used
  return namespace['SegNet']


def count_parameters(module: nn.Module) -> int:
  """Number of trainable parameter elements in `module`."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)
