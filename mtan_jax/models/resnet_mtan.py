"""MTAN on a dilated ResNet-50 with per-task DeepLabv3 heads (MTAN-DeepLabv3).

The reference's second architecture (lorenmt/mtan, `im2im_pred/model_resnet_mtan/`:
`resnet.py`, `resnet_dilated.py`, `aspp.py`, `resnet_mtan.py`), for any list of dense tasks:

- Shared backbone: torchvision's ResNet-50 (v1.5 bottlenecks: the stride sits on the 3x3
  conv) made dilated with output stride 8: the last two stages drop their stride, and their
  3x3 convs dilate by 2 and 4 instead (the first block of each: 1 and 2). This is what
  torchvision's `replace_stride_with_dilation=[False, True, True]` builds too.
- Attention, per task and stage j: mask = sigmoid(BN(1x1 conv(ReLU(BN(1x1 conv(x)))))) (the
  SegNet-MTAN `AttentionMask`, with widths C_j -> C_j / 4 -> C_j), where x is the input of
  the stage's last block (stage 0), or that concatenated with the task's attended feature
  from stage j-1 (deeper stages). Attended = mask * the stage's last block output. After
  stages 0-2 a bottleneck shared by all tasks (`encoder_block_att[j]`) brings the attended
  feature to the next stage's width, followed by a 2x2 max-pool where the next stage halves
  the resolution (only after stage 0: the dilated stages keep it).
- Heads, one per task: DeepLabv3 (ASPP with a 1x1 branch, 3x3 branches dilated by 12, 24, 36,
  and an image-pooling branch; 1x1 projection, dropout 0.5; 3x3 conv-BN-ReLU; 1x1 conv to the
  task's channels) on the task's attended stage-3 feature, then bilinear upsampling
  (align_corners=True, as the reference) to the input size and the task's output activation.

Initialisation follows the reference's modules: the backbone has torchvision's init
(kaiming-normal fan-out convs, BatchNorm 1 / 0); the attention masks, shared attention
bottlenecks and heads keep PyTorch's default conv init (uniform in +-1/sqrt(fan_in), for
weights and biases), BatchNorm 1 / 0. The reference starts the backbone from ImageNet-
pretrained torchvision weights; none can be downloaded here, so it starts from random init.
The backbone's attribute names mirror torchvision's state_dict (`conv1`, `bn1`,
`layer1.0.conv1`, ..., `downsample.0`), so such weights can be imported later.

Parameters live under distinct top-level attributes: shared ones under `backbone` and
`encoder_block_att`, task-specific ones under `TASK_SPECIFIC` (`encoder_att`, `decoders`,
`logsigma`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtan_jax.errors import ConfigError
from mtan_jax.models.layers import AttentionMask, BatchNorm, _align_corners_matrix, max_pool
from mtan_jax.tasks import Task

RESNET50_BLOCKS = (3, 4, 6, 3)
DEFAULT_BASE_WIDTH = 64
# Bottleneck output width / its inner width.
EXPANSION = 4
# Per stage: (stride of the first block, dilation of the first block's 3x3 conv, dilation of
# the other blocks' 3x3 convs): ResNet-50 with output stride 8 (ResnetDilated(dilate_scale=8)).
STAGES = ((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))
# The stem (stride-2 conv, stride-2 max-pool) and stage 1 halve the resolution.
OUTPUT_STRIDE = 8
ASPP_RATES = (12, 24, 36)
DEFAULT_ASPP_WIDTH = 256
DEFAULT_DROPOUT = 0.5

# torchvision's ResNet init, nn.init.kaiming_normal_(mode='fan_out', nonlinearity='relu'):
# a plain normal with std sqrt(2 / fan_out), the fan counting the receptive field.
kaiming_normal_fan_out = jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default Conv2d weight init, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel = jax.nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _torch_default_bias(fan_in: int):
  """PyTorch's default Conv2d bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv(cin: int, cout: int, kernel: int, *, rngs: nnx.Rngs, dtype, stride: int = 1,
         dilation: int = 1, bias: bool = False, torch_default: bool = True) -> nnx.Conv:
  """A PyTorch-style conv: explicit padding dilation * (kernel - 1) / 2, as every conv here has.

  Explicit (not 'SAME') padding keeps PyTorch's output sizes for strided convs on odd sizes.
  `torch_default` picks PyTorch's default init; otherwise torchvision ResNet's (no bias).
  """
  pad = dilation * (kernel - 1) // 2
  fan_in = cin * kernel * kernel
  return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                  kernel_dilation=dilation, use_bias=bias,
                  kernel_init=torch_default_kernel if torch_default else kaiming_normal_fan_out,
                  bias_init=_torch_default_bias(fan_in), dtype=dtype, rngs=rngs)


def _reinit_torch_default(layer: nnx.Conv, rngs: nnx.Rngs) -> None:
  """Redraws a conv's kernel and bias with PyTorch's default init."""
  kh, kw, cin, _ = layer.kernel.shape
  layer.kernel[...] = torch_default_kernel(rngs.params(), layer.kernel.shape, jnp.float32)
  if layer.bias is not None:
    layer.bias[...] = _torch_default_bias(kh * kw * cin)(rngs.params(), layer.bias.shape)


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of x (B, H, W, C) to `size` (h, w) with align_corners=True.

  PyTorch's F.interpolate(mode='bilinear', align_corners=True), which the reference uses for
  the final upsampling; jax.image.resize is half-pixel (align_corners=False). Two small
  interpolation-matrix products, exact at HIGHEST precision.
  """
  _, h, w, _ = x.shape
  mh = jnp.asarray(_align_corners_matrix(h, int(size[0])), x.dtype)
  mw = jnp.asarray(_align_corners_matrix(w, int(size[1])), x.dtype)
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('pw,bowc->bopc', mw, x, precision=jax.lax.Precision.HIGHEST)


class Bottleneck(nnx.Module):
  """torchvision's Bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 wider), BN after each,
  ReLU after the first two and after the residual sum.

  Args:
    cin: input channels.
    planes: inner width; the output has EXPANSION * planes channels.
    stride: stride of the 3x3 conv and of the projection shortcut.
    dilation: dilation (and padding) of the 3x3 conv.
    downsample: project the shortcut (1x1 conv with `stride`, then BN), as the first block of
      each stage and the reference's shared attention bottlenecks do.
    torch_default: PyTorch's default conv init (the attention bottlenecks) instead of
      torchvision ResNet's (the backbone).
    rngs: parameter initialisation keys.
    dtype: compute dtype.
  """

  def __init__(self, cin: int, planes: int, *, stride: int = 1, dilation: int = 1,
               downsample: bool = False, torch_default: bool = False, rngs: nnx.Rngs,
               dtype=jnp.float32):
    cout = EXPANSION * planes
    kw = dict(rngs=rngs, dtype=dtype, torch_default=torch_default)
    self.conv1 = conv(cin, planes, 1, **kw)
    self.bn1 = BatchNorm(planes, dtype=dtype)
    self.conv2 = conv(planes, planes, 3, stride=stride, dilation=dilation, **kw)
    self.bn2 = BatchNorm(planes, dtype=dtype)
    self.conv3 = conv(planes, cout, 1, **kw)
    self.bn3 = BatchNorm(cout, dtype=dtype)
    # nnx.List([conv, bn]): the paths of torchvision's `downsample.0` / `downsample.1`.
    self.downsample = (nnx.List([conv(cin, cout, 1, stride=stride, **kw), BatchNorm(cout, dtype=dtype)])
                       if downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
    return jax.nn.relu(y + shortcut)


class DilatedResNet(nnx.Module):
  """ResNet-50's convolutional part with output stride 8 (no average pool, no classifier).

  Args:
    in_channels: input image channels.
    base_width: stem width and stage-0 inner width (64 in ResNet-50); stage j's blocks are
      base_width * 2**j wide inside and EXPANSION times that outside.
    blocks: bottlenecks per stage (ResNet-50: 3, 4, 6, 3).
    rngs: parameter initialisation keys.
    dtype: compute dtype.
  """

  def __init__(self, in_channels: int, base_width: int, blocks: Sequence[int], *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv1 = conv(in_channels, base_width, 7, stride=2, rngs=rngs, dtype=dtype, torch_default=False)
    self.bn1 = BatchNorm(base_width, dtype=dtype)
    cin = base_width
    for j, (n, (stride, first_dilation, dilation)) in enumerate(zip(blocks, STAGES)):
      planes = base_width * 2 ** j
      stage = []
      for k in range(n):
        stage.append(Bottleneck(cin, planes, stride=stride if k == 0 else 1,
                                dilation=first_dilation if k == 0 else dilation,
                                downsample=k == 0, rngs=rngs, dtype=dtype))
        cin = EXPANSION * planes
      setattr(self, f'layer{j + 1}', nnx.List(stage))
    self.out_channels = cin

  def stages(self) -> list[nnx.List]:
    return [getattr(self, f'layer{j + 1}') for j in range(len(STAGES))]

  def stem(self, x: jax.Array) -> jax.Array:
    """7x7 / 2 conv -> BN -> ReLU -> 3x3 / 2 max-pool (padding 1): 1/4 resolution."""
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))

  def features(self, x: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per stage, the input of its last block and that block's output: what MTAN attends over."""
    x = self.stem(x)
    before_last, last = [], []
    for stage in self.stages():
      for k in range(len(stage) - 1):
        x = stage[k](x)
      before_last.append(x)
      x = stage[len(stage) - 1](x)
      last.append(x)
    return before_last, last


class DropoutState(nnx.BatchStat):
  """Dropout's key and call count.

  A BatchStat because the train step (`mtan_jax.steps`) carries exactly Params and
  BatchStats from step to step (and checkpoints them): like BatchNorm's running statistics,
  this state changes in every train-mode forward pass. It is not a trainable parameter.
  """


class Dropout(nnx.Module):
  """Inverted dropout that is active in train mode and off in the evaluation view.

  The evaluation view is `nnx.view(model, use_running_average=True)` (BatchNorm's switch,
  the one `mtan_jax.steps` uses) or `deterministic=True`. Each train-mode call draws its mask
  from the module's key folded with a call count that it then increments.
  """

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    if not 0.0 <= rate < 1.0:
      raise ConfigError(f'dropout rate {rate}; expected 0 <= rate < 1')
    self.rate = float(rate)
    self.key = DropoutState(jax.random.key_data(rngs.dropout()))
    self.count = DropoutState(jnp.zeros((), jnp.uint32))
    self.deterministic = False

  def set_view(self, use_running_average: bool | None = None, deterministic: bool | None = None):
    for flag in (use_running_average, deterministic):
      if flag is not None:
        self.deterministic = flag

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    key = jax.random.fold_in(jax.random.wrap_key_data(self.key[...]), self.count[...])
    self.count[...] = self.count[...] + 1
    keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class ConvBNReLU(nnx.Module):
  """Conv (no bias, PyTorch default init) -> BatchNorm -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int, *, dilation: int = 1, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.conv = conv(cin, cout, kernel, dilation=dilation, rngs=rngs, dtype=dtype)
    self.bn = BatchNorm(cout, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class ASPP(nnx.Module):
  """DeepLabv3's atrous spatial pyramid pooling.

  `convs`: a 1x1 branch, one dilated 3x3 branch per rate, and the image-pooling branch
  (global average -> 1x1 conv -> BN -> ReLU, broadcast back over the map: the reference's
  bilinear resize of a 1x1 map); `project`: 1x1 conv-BN-ReLU of their concatenation, then
  dropout.
  """

  def __init__(self, cin: int, width: int, rates: Sequence[int], dropout: float, *,
               rngs: nnx.Rngs, dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype)
    self.convs = nnx.List([ConvBNReLU(cin, width, 1, **kw)]
                          + [ConvBNReLU(cin, width, 3, dilation=r, **kw) for r in rates]
                          + [ConvBNReLU(cin, width, 1, **kw)])
    self.project = ConvBNReLU(width * len(self.convs), width, 1, **kw)
    self.dropout = Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.convs)
    branches = [self.convs[k](x) for k in range(n - 1)]
    pooled = self.convs[n - 1](jnp.mean(x, axis=(1, 2), keepdims=True))
    branches.append(jnp.broadcast_to(pooled, branches[0].shape[:-1] + pooled.shape[-1:]))
    return self.dropout(self.project(jnp.concatenate(branches, axis=-1)))


class DeepLabHead(nnx.Module):
  """ASPP -> 3x3 conv-BN-ReLU -> 1x1 conv (with bias) to the task's channels."""

  def __init__(self, cin: int, width: int, cout: int, dropout: float, *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.aspp = ASPP(cin, width, ASPP_RATES, dropout, rngs=rngs, dtype=dtype)
    self.block = ConvBNReLU(width, width, 3, rngs=rngs, dtype=dtype)
    self.classifier = conv(width, cout, 1, bias=True, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.classifier(self.block(self.aspp(x)))
    # float32 logits, so that upsampling, log-softmax and normalisation are exact.
    return y.astype(jnp.promote_types(y.dtype, jnp.float32))


def _check_blocks(blocks: Sequence[int]) -> tuple[int, ...]:
  blocks = tuple(int(b) for b in blocks)
  # The masks read the input of each stage's last block, which must be a block's output
  # (with the stage's width and resolution), hence at least two blocks per stage.
  if len(blocks) != len(STAGES) or min(blocks) < 2:
    raise ConfigError(f'depth_blocks={blocks}; expected {len(STAGES)} counts of at least 2 '
                      f'bottlenecks per stage, e.g. {RESNET50_BLOCKS} (ResNet-50)')
  return blocks


def check_input_size(height: int, width: int) -> None:
  """Raises ConfigError unless both sides are positive multiples of the output stride 8.

  Stage 0's attended feature is max-pooled 2x2 (floor) to meet stage 1's, which a stride-2
  conv produced (ceil): the two agree when stage 0's size is even.
  """
  if height <= 0 or width <= 0 or height % OUTPUT_STRIDE or width % OUTPUT_STRIDE:
    raise ConfigError(f'image size {height}x{width} is not divisible by {OUTPUT_STRIDE}; the '
                      f'dilated ResNet has output stride {OUTPUT_STRIDE}, so height and width must '
                      f'be multiples of {OUTPUT_STRIDE} (e.g. 288x384)')


class ResNetMTAN(nnx.Module):
  """MTAN-DeepLabv3: a dilated ResNet-50 shared by all tasks, per-task attention, DeepLabv3 heads.

  Call it on images (B, H, W, C_in) (H, W multiples of 8) to get one prediction
  (B, H, W, task.channels) per task, each passed through its task's output activation.
  `logsigma` holds one learned log-variance per task for uncertainty weighting (initialised
  to -0.5). Dense tasks only.

  Full size (the reference): base_width 64, depth_blocks (3, 4, 6, 3), head_hidden 256;
  92,347,924 parameters for NYUv2 (13 classes, depth, normal), 72,044,234 for Cityscapes
  (7 classes, depth). For tiny test models shrink all three (blocks down to 2 per stage).

  Args:
    tasks: the dense tasks, in head order.
    widths: SegNet-style level widths, accepted so that every model builds from the same
      config; only widths[0] (the stem width, 64 in both SegNet and ResNet-50) is read, as the
      default of `base_width`. None: 64.
    in_channels: input image channels.
    rngs: parameter initialisation keys (and the heads' dropout keys).
    dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    image_size: optional input (height, width), only checked (multiples of 8).
    head_hidden: width of the DeepLabv3 heads (ASPP branches and the conv after them): 256.
    base_width: ResNet base width (64 in ResNet-50); overrides `widths`.
    depth_blocks: bottlenecks per ResNet stage, at least 2 each (ResNet-50: 3, 4, 6, 3).
    dropout: the ASPP projection's dropout rate in train mode (0.5 in the reference).
  """

  # Top-level attributes whose parameters only one task's loss depends on; everything else
  # (`backbone`, `encoder_block_att`) is shared.
  TASK_SPECIFIC: tuple[str, ...] = ('encoder_att', 'decoders', 'logsigma')

  def __init__(self, tasks: Sequence[Task], widths: Sequence[int] | None = None,
               in_channels: int = 3, *, rngs: nnx.Rngs, dtype=jnp.float32,
               image_size: Sequence[int] | None = None, head_hidden: int = DEFAULT_ASPP_WIDTH,
               base_width: int | None = None, depth_blocks: Sequence[int] = RESNET50_BLOCKS,
               dropout: float = DEFAULT_DROPOUT):
    if not tasks:
      raise ConfigError('ResNetMTAN needs at least one task')
    for task in tasks:
      if task.image_level:
        raise ConfigError(f'task {task.name!r} is image-level; ResNetMTAN supports dense tasks only')
    if base_width is None:
      base_width = int(widths[0]) if widths else DEFAULT_BASE_WIDTH
    if int(base_width) < 1 or int(head_hidden) < 1:
      raise ConfigError(f'ResNetMTAN base_width={base_width}, head_hidden={head_hidden}; '
                        'expected positive integers')
    if image_size is not None:
      check_input_size(*(int(s) for s in image_size))
    self.tasks = tuple(tasks)
    self.dtype = dtype
    self.base_width = int(base_width)
    blocks = _check_blocks(depth_blocks)
    self.backbone = DilatedResNet(in_channels, self.base_width, blocks, rngs=rngs, dtype=dtype)
    # Stage output widths: 256, 512, 1024, 2048 at full size.
    ch = [EXPANSION * self.base_width * 2 ** j for j in range(len(STAGES))]
    self.encoder_att = nnx.List([
        nnx.List([AttentionMask(ch[0] if j == 0 else 2 * ch[j], ch[j] // 4, ch[j], rngs=rngs, dtype=dtype)
                  for j in range(len(STAGES))])
        for _ in self.tasks])
    # AttentionMask builds with SegNet-MTAN's Xavier init; the reference's att_layer here keeps
    # PyTorch's default.
    for masks in self.encoder_att:
      for mask in masks:
        _reinit_torch_default(mask.conv1, rngs)
        _reinit_torch_default(mask.conv2, rngs)
    # Shared by all tasks: stage j's attended feature to stage j+1's width (planes = C_{j+1}/4).
    self.encoder_block_att = nnx.List([
        Bottleneck(ch[j], ch[j + 1] // EXPANSION, downsample=True, torch_default=True, rngs=rngs, dtype=dtype)
        for j in range(len(STAGES) - 1)])
    self.decoders = nnx.List([
        DeepLabHead(ch[-1], int(head_hidden), task.channels, dropout, rngs=rngs, dtype=dtype)
        for task in self.tasks])
    self.logsigma = nnx.Param(jnp.full((len(self.tasks),), -0.5, jnp.float32))

  def heads(self) -> list[nnx.Module]:
    return list(self.decoders)

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Per-task predictions (B, H, W, channels) for images x (B, H, W, C_in)."""
    height, width = x.shape[1:3]
    check_input_size(height, width)
    before_last, last = self.backbone.features(x.astype(self.dtype))
    num_tasks = len(self.tasks)
    attended: list[jax.Array | None] = [None] * num_tasks
    # Stage by stage over all tasks, the reference's order.
    for j in range(len(STAGES)):
      for t in range(num_tasks):
        inp = before_last[j] if j == 0 else jnp.concatenate([before_last[j], attended[t]], axis=-1)
        a = self.encoder_att[t][j](inp) * last[j]
        if j < len(STAGES) - 1:
          a = self.encoder_block_att[j](a)
          if STAGES[j + 1][0] == 2:
            a = max_pool(a)
        attended[t] = a
    return [task.activate(resize_bilinear_align_corners(head(a), (height, width)))
            for task, head, a in zip(self.tasks, self.heads(), attended)]
