"""Tests for MTAN-DeepLabv3 (`mtan_jax.models.resnet_mtan`).

Full-size parameter counts are taken abstractly (`nnx.eval_shape`); forward passes use one
tiny model (base width 8, two bottlenecks per stage, 16-wide heads) on 32x64 images and run
eagerly, which is faster than compiling for a few calls. The parity test compares against
`torch_resnet_mtan` below: a PyTorch statement of the reference (lorenmt/mtan,
im2im_pred/model_resnet_mtan/) with its state_dict names but every width a parameter (the
reference hard-codes ResNet-50's). At full size it loads the reference model's state_dict
strictly and gives bit-identical outputs and running statistics, in train and eval mode
(checked once with the reference's own modules; the reference is not available in CI). The
full-size JAX model with the reference's weights copied in matched the reference itself to
1e-4 (eval) / 5e-4 (train) absolute on 64x96 inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtan_jax.errors import ConfigError
from mtan_jax.models import layers
from mtan_jax.models.resnet_mtan import ResNetMTAN, resize_bilinear_align_corners
from mtan_jax.steps import count_params
from mtan_jax.tasks import make_tasks

TINY = dict(base_width=8, depth_blocks=(2, 2, 2, 2), head_hidden=16)
NUM_CLASSES = 5
SIZE = (32, 64)


def tiny_model(task_names=('semantic', 'depth', 'normal'), seed=0, **kwargs):
  return ResNetMTAN(make_tasks(task_names, NUM_CLASSES), rngs=nnx.Rngs(seed), **{**TINY, **kwargs})


@pytest.fixture(scope='module')
def tiny():
  """One tiny 3-task model for the whole file (tests take clones): building one compiles
  about a hundred small init kernels, most of the file's time."""
  return tiny_model()


def images(batch=2, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch,) + SIZE + (3,))


def is_dropout_state(path) -> bool:
  return 'dropout' in path


# The reference's counts: sum(p.numel() for p in MTANDeepLabv3().parameters()) with its own
# module definitions (torch 2.13 CPU; torchvision stubbed, the pretrained download replaced by
# a random ResNet-50's state_dict; the task lists rebuilt with its att_layer / DeepLabHead for
# 7 classes + depth), plus one log-sigma per task (its training scripts' uncertainty
# weighting): NYUv2 92,347,921 + 3, Cityscapes 72,044,232 + 2.
@pytest.mark.parametrize('task_names, num_classes, expected', [
    (('semantic', 'depth', 'normal'), 13, 92_347_924),
    (('semantic', 'depth'), 7, 72_044_234),
])
def test_full_size_parameter_count_matches_reference(task_names, num_classes, expected):
  model = nnx.eval_shape(lambda: ResNetMTAN(make_tasks(task_names, num_classes), rngs=nnx.Rngs(0)))
  assert count_params(model) == expected


def test_tiny_forward_shapes_activations_and_train_mode_statistics(tiny):
  model = nnx.clone(tiny)
  stats = lambda: [np.array(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))
                   if path[-1] != 'key']
  before = stats()
  preds = model(images())
  assert [p.shape for p in preds] == [(2,) + SIZE + (c,) for c in (NUM_CLASSES, 1, 3)]
  assert all(p.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(p))) for p in preds)
  np.testing.assert_allclose(jnp.sum(jnp.exp(preds[0]), axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(preds[2], axis=-1), 1.0, rtol=1e-5)
  # Train mode updates every BatchNorm's running statistics (backbone, shared attention
  # bottlenecks, per-task masks, heads, including the ASPP pooling branch's) and counts
  # the dropout calls.
  after = stats()
  assert not any(np.array_equal(a, b) for a, b in zip(before, after))
  assert int(model.decoders[0].aspp.dropout.count[...]) == 1
  # The evaluation view changes nothing.
  nnx.view(model, use_running_average=True)(images())
  assert all(np.array_equal(a, b) for a, b in zip(after, stats()))


def test_task_specific_parameters(tiny):
  names = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}
  assert all(any(n.startswith(p) for n in names) for p in ResNetMTAN.TASK_SPECIFIC)
  shared = {n for n in names if not n.startswith(ResNetMTAN.TASK_SPECIFIC)}
  assert shared == {'backbone', 'encoder_block_att'}
  assert tiny.logsigma.shape == (3,)
  np.testing.assert_array_equal(tiny.logsigma[...], -0.5)
  assert tiny.heads() == list(tiny.decoders)

  # Task t's prediction depends on task t's attention masks and head, never on another's.
  x = images()
  base = nnx.view(tiny, use_running_average=True)(x)
  for t in range(3):
    model = nnx.clone(tiny)
    for module in (model.encoder_att[t], model.decoders[t]):
      params = nnx.state(module, nnx.Param)
      nnx.update(module, jax.tree.map(lambda v: jnp.asarray(np.asarray(v) * 1.5 + 0.1), params))
    preds = nnx.view(model, use_running_average=True)(x)
    for u in range(3):
      assert np.array_equal(preds[u], base[u]) == (u != t), (t, u)


def test_init_follows_reference(tiny):
  # torchvision's kaiming-normal fan-out: std sqrt(2 / (9 * 64)) for a 3x3, 64 -> 64 conv.
  kernel = np.asarray(tiny.backbone.layer4[1].conv2.kernel[...])
  assert kernel.shape == (3, 3, 64, 64)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (9 * 64)), rtol=0.03)
  # PyTorch's default conv init: uniform in +-1/sqrt(fan_in), for kernel and bias.
  for conv in (tiny.encoder_att[0][3].conv1, tiny.decoders[0].classifier,
               tiny.encoder_block_att[2].conv2, tiny.decoders[0].aspp.convs[1].conv):
    k = np.asarray(conv.kernel[...])
    bound = 1 / np.sqrt(np.prod(k.shape[:3]))
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.9 * bound
    if conv.bias is not None:
      assert np.abs(np.asarray(conv.bias[...])).max() <= bound
  bn = tiny.decoders[0].block.bn
  np.testing.assert_array_equal(bn.scale[...], 1.0)
  np.testing.assert_array_equal(bn.bias[...], 0.0)


def test_dropout_only_in_train_mode(tiny):
  model = nnx.clone(tiny)
  x = images()
  eval_view = nnx.view(model, use_running_average=True)
  np.testing.assert_array_equal(eval_view(x)[1], eval_view(x)[1])
  # Train mode: BatchNorm normalises with batch statistics either way; only the dropout mask
  # changes between calls (a new key each call)...
  assert not np.allclose(model(x)[1], model(x)[1])
  # ... unless the view turns dropout off.
  no_dropout = nnx.view(model, deterministic=True)
  np.testing.assert_array_equal(no_dropout(x)[1], no_dropout(x)[1])


def test_widths_give_the_base_width():
  tasks = make_tasks(('depth',), NUM_CLASSES)
  model = nnx.eval_shape(lambda: ResNetMTAN(tasks, (8, 16, 16, 32, 32), rngs=nnx.Rngs(0),
                                            depth_blocks=(2, 2, 2, 2)))
  assert model.base_width == 8
  assert model.backbone.layer4[0].conv3.kernel.shape == (1, 1, 64, 256)


def test_invalid_configs_raise(tiny):
  with pytest.raises(ConfigError, match='image-level'):
    ResNetMTAN(make_tasks(('semantic', 'species'), 2), rngs=nnx.Rngs(0), **TINY)
  with pytest.raises(ConfigError, match='depth_blocks'):
    ResNetMTAN(make_tasks(('depth',), 2), rngs=nnx.Rngs(0), **{**TINY, 'depth_blocks': (2, 1, 2, 2)})
  with pytest.raises(ConfigError, match='divisible by 8'):
    ResNetMTAN(make_tasks(('depth',), 2), rngs=nnx.Rngs(0), image_size=(36, 64), **TINY)
  with pytest.raises(ConfigError, match='at least one task'):
    ResNetMTAN((), rngs=nnx.Rngs(0), **TINY)
  with pytest.raises(ConfigError, match='divisible by 8'):
    tiny(jnp.zeros((1, 36, 64, 3)))


def test_resize_matches_align_corners_upsampling():
  x = jax.random.normal(jax.random.key(1), (2, 5, 7, 3))
  np.testing.assert_allclose(resize_bilinear_align_corners(x, (10, 14)), layers.upsample2x_bilinear(x),
                             rtol=1e-6, atol=1e-6)
  # Corners map to corners (align_corners=True).
  y = resize_bilinear_align_corners(x, (13, 29))
  np.testing.assert_allclose(y[:, ::12, ::28], x[:, ::4, ::6], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Parity with a PyTorch statement of the reference.


def torch_resnet_mtan(torch, out_channels, base_width, blocks, aspp_width):
  """The reference's MTANDeepLabv3 with its state_dict names, every width a parameter.

  ResNet-50 stages dilated to output stride 8, per-task att_layer masks, shared bottlenecks
  between stages, per-task DeepLabv3 heads, align_corners=True upsampling. Dropout is left
  out (p = 0): the test compares deterministic outputs.
  """
  nn, F = torch.nn, torch.nn.functional

  class Bottleneck(nn.Module):

    def __init__(self, cin, planes, stride=1, dilation=1, downsample=False):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
      self.downsample = (nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(4 * planes)) if downsample else None)

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = F.relu(self.bn2(self.conv2(y)))
      y = self.bn3(self.conv3(y))
      return F.relu(y + (x if self.downsample is None else self.downsample(x)))

  def branch(cin, cout, kernel, dilation=1):
    return [nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU()]

  class ASPP(nn.Module):

    def __init__(self, cin):
      super().__init__()
      self.convs = nn.ModuleList(
          [nn.Sequential(*branch(cin, aspp_width, 1))]
          + [nn.Sequential(*branch(cin, aspp_width, 3, r)) for r in (12, 24, 36)]
          + [nn.Sequential(nn.AdaptiveAvgPool2d(1), *branch(cin, aspp_width, 1))])
      self.project = nn.Sequential(*branch(5 * aspp_width, aspp_width, 1), nn.Dropout(0.0))

    def forward(self, x):
      outs = [c(x) for c in self.convs[:-1]]
      outs.append(F.interpolate(self.convs[-1](x), size=x.shape[-2:], mode='bilinear', align_corners=False))
      return self.project(torch.cat(outs, 1))

  def att_layer(cin, cmid, cout):
    return nn.Sequential(nn.Conv2d(cin, cmid, 1), nn.BatchNorm2d(cmid), nn.ReLU(),
                         nn.Conv2d(cmid, cout, 1), nn.BatchNorm2d(cout), nn.Sigmoid())

  class Model(nn.Module):

    def __init__(self):
      super().__init__()
      b = base_width
      ch = [4 * b * 2 ** j for j in range(4)]
      self.shared_conv = nn.Sequential(nn.Conv2d(3, b, 7, 2, 3, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                                       nn.MaxPool2d(3, 2, 1))
      cin = b
      # (stride, first block's dilation, other blocks' dilation): output stride 8.
      for j, (stride, d0, d) in enumerate(((1, 1, 1), (2, 1, 1), (1, 1, 2), (1, 2, 4))):
        stage = [Bottleneck(cin if k == 0 else ch[j], ch[j] // 4, stride if k == 0 else 1,
                            d0 if k == 0 else d, downsample=k == 0) for k in range(blocks[j])]
        cin = ch[j]
        setattr(self, f'shared_layer{j + 1}_b', nn.Sequential(*stage[:-1]))
        setattr(self, f'shared_layer{j + 1}_t', stage[-1])
        setattr(self, f'encoder_att_{j + 1}', nn.ModuleList(
            [att_layer(ch[0] if j == 0 else 2 * ch[j], ch[j] // 4, ch[j]) for _ in out_channels]))
        if j < 3:
          setattr(self, f'encoder_block_att_{j + 1}', Bottleneck(ch[j], ch[j + 1] // 4, downsample=True))
      self.decoders = nn.ModuleList([
          nn.Sequential(ASPP(ch[3]), *branch(aspp_width, aspp_width, 3), nn.Conv2d(aspp_width, c, 1))
          for c in out_channels])

    def forward(self, x):
      size = x.shape[-2:]
      x = self.shared_conv(x)
      a = [None] * len(out_channels)
      for j in range(4):
        u_b = getattr(self, f'shared_layer{j + 1}_b')(x)
        x = getattr(self, f'shared_layer{j + 1}_t')(u_b)
        for t, att in enumerate(getattr(self, f'encoder_att_{j + 1}')):
          a[t] = att(u_b if j == 0 else torch.cat((u_b, a[t]), 1)) * x
          if j < 3:
            a[t] = getattr(self, f'encoder_block_att_{j + 1}')(a[t])
          if j == 0:
            a[t] = F.max_pool2d(a[t], 2, 2)
      return [F.interpolate(dec(a_t), size=size, mode='bilinear', align_corners=True)
              for dec, a_t in zip(self.decoders, a)]

  return Model()


_LEAF = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'mean': 'running_mean',
         'var': 'running_var'}


def reference_key(path, blocks) -> str:
  """The reference state_dict key of a ResNetMTAN Param / BatchNorm statistic path."""
  p = [str(x) for x in path]
  leaf, top, rest = _LEAF[p[-1]], p[0], p[1:-1]
  if top == 'backbone':
    if rest[0] in ('conv1', 'bn1'):
      return f'shared_conv.{int(rest[0] == "bn1")}.{leaf}'
    stage, k = int(rest[0][len('layer'):]), int(rest[1])
    prefix = f'shared_layer{stage}_b.{k}' if k < blocks[stage - 1] - 1 else f'shared_layer{stage}_t'
    return '.'.join([prefix] + rest[2:] + [leaf])
  if top == 'encoder_att':
    t, j, name = rest
    return f'encoder_att_{int(j) + 1}.{t}.{dict(conv1=0, bn1=1, conv2=3, bn2=4)[name]}.{leaf}'
  if top == 'encoder_block_att':
    return '.'.join([f'encoder_block_att_{int(rest[0]) + 1}'] + rest[1:] + [leaf])
  assert top == 'decoders', path
  t, part = rest[0], rest[1]
  index = dict(conv=0, bn=1)
  if part == 'aspp' and rest[2] == 'convs':
    b = int(rest[3])
    # The pooling branch's Sequential starts with AdaptiveAvgPool2d.
    return f'decoders.{t}.0.convs.{b}.{index[rest[4]] + (b == 4)}.{leaf}'
  if part == 'aspp':
    return f'decoders.{t}.0.project.{index[rest[3]]}.{leaf}'
  if part == 'block':
    return f'decoders.{t}.{index[rest[2]] + 1}.{leaf}'
  return f'decoders.{t}.4.{leaf}'


def copy_reference_weights(model, state_dict, blocks) -> None:
  """Loads a reference state_dict into `model` (every reference tensor used exactly once)."""
  arrays = {k: v.detach().numpy() for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  used = set()
  for kind in (nnx.Param, nnx.BatchStat):
    for path, var in nnx.to_flat_state(nnx.state(model, kind)):
      if path[0] == 'logsigma' or is_dropout_state(path):
        continue
      key = reference_key(path, blocks)
      value = arrays[key]
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value  # OIHW -> HWIO
      assert value.shape == var.shape, (path, key)
      var[...] = jnp.asarray(value)
      used.add(key)
  assert used == set(arrays)


@pytest.mark.parametrize('train', [False, True])
def test_matches_torch_reference(tiny, train):
  torch = pytest.importorskip('torch')
  blocks = TINY['depth_blocks']
  torch.manual_seed(0)
  ref = torch_resnet_mtan(torch, (NUM_CLASSES, 1, 3), TINY['base_width'], blocks, TINY['head_hidden'])
  with torch.no_grad():
    # Non-trivial BatchNorm affine and running statistics, so that evaluation exercises them.
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
  model = nnx.clone(tiny)
  copy_reference_weights(model, ref.state_dict(), blocks)
  x = np.asarray(images())
  ref.train(train)
  with torch.no_grad():
    expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
  expected[0] = torch.log_softmax(expected[0], 1)
  expected[2] = expected[2] / torch.norm(expected[2], p=2, dim=1, keepdim=True)
  # Train mode without dropout (the reference's random mask cannot be matched).
  view = nnx.view(model, deterministic=True) if train else nnx.view(model, use_running_average=True)
  preds = view(jnp.asarray(x))
  for want, got in zip(expected, preds):
    np.testing.assert_allclose(got, want.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  if train:
    stats = ref.state_dict()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
      if not is_dropout_state(path):
        np.testing.assert_allclose(var[...], stats[reference_key(path, blocks)].numpy(), rtol=1e-4, atol=1e-5)
