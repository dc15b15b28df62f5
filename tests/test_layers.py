"""Tests for the SegNet / MTAN building blocks in `mtan_jax.models.layers`.

Each op is checked against a NumPy re-implementation written here and, where PyTorch defines
the semantics the reference relies on (max-pool indices and their tie-breaking, max-unpool,
bilinear upsampling with align_corners=True, BatchNorm's running statistics), against
PyTorch itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
F = torch.nn.functional

from mtan_jax.models import layers  # pylint: disable=wrong-import-position


# ---------------------------------------------------------------------------------------------
# NumPy references and converters.


def np_max_pool_with_argmax(x):
  """2x2 max-pool of NHWC `x`; returns (pooled, window position 0..3 of the first maximum)."""
  b, h, w, c = x.shape
  win = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
  # np.argmax returns the first maximum, in row-major window order.
  pos = np.argmax(win, axis=-1)
  return np.max(win, axis=-1), pos


def np_upsample2x_align_corners(x):
  """x2 bilinear upsampling of NHWC `x` with align_corners=True, in float64."""
  x = np.asarray(x, np.float64)

  def along(arr, axis):
    n_in = arr.shape[axis]
    n_out = 2 * n_in
    if n_in == 1:
      return np.repeat(arr, n_out, axis=axis)
    src = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    shape = [1] * arr.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    return np.take(arr, lo, axis=axis) * (1 - frac) + np.take(arr, hi, axis=axis) * frac

  return along(along(x, 1), 2)


def to_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def to_nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def torch_pool(x_nhwc):
  """PyTorch max_pool2d(return_indices=True); returns NHWC pooled values and window positions."""
  pooled, idx = F.max_pool2d(to_nchw(x_nhwc), kernel_size=2, stride=2, return_indices=True)
  w = x_nhwc.shape[2]
  rows, cols = np.divmod(idx.numpy(), w)
  pos = (rows % 2) * 2 + (cols % 2)
  return to_nhwc(pooled), np.transpose(pos, (0, 2, 3, 1)), idx


def tie_data():
  """A (1, 2, 8, 1) input whose four windows each have ties, plus the expected first-max positions."""
  # Windows (row-major, top-left, top-right, bottom-left, bottom-right):
  #   0: all equal                -> 0
  #   1: maxima at TR and BR      -> 1
  #   2: maxima at BL and BR      -> 2
  #   3: maxima at TL and BR      -> 0
  top = [5, 5, 1, 7, 0, 0, 9, 2]
  bottom = [5, 5, 3, 7, 4, 4, 1, 9]
  x = np.array([top, bottom], np.float32).reshape(1, 2, 8, 1)
  return x, np.array([0, 1, 2, 0]).reshape(1, 1, 4, 1), np.array([5, 7, 4, 9], np.float32).reshape(1, 1, 4, 1)


# ---------------------------------------------------------------------------------------------
# max_pool_with_argmax


def test_max_pool_with_argmax_matches_numpy():
  x = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)
  pooled, mask = layers.max_pool_with_argmax(jnp.asarray(x))
  ref_pooled, ref_pos = np_max_pool_with_argmax(x)
  assert pooled.shape == (2, 3, 4, 3)
  assert mask.shape == (2, 3, 4, 3, 4)
  np.testing.assert_array_equal(np.asarray(pooled), ref_pooled)
  np.testing.assert_array_equal(np.asarray(mask), np.eye(4, dtype=np.float32)[ref_pos])


def test_max_pool_with_argmax_ties_go_to_first_maximum():
  x, expected_pos, expected_val = tie_data()
  pooled, mask = layers.max_pool_with_argmax(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(pooled), expected_val)
  np.testing.assert_array_equal(np.argmax(np.asarray(mask), axis=-1), expected_pos)
  # Exactly one position per window, even when all four are equal.
  np.testing.assert_array_equal(np.asarray(mask).sum(-1), np.ones_like(expected_val))


def _pool_input(rng, kind, shape, levels):
  """Pooling input: 'random' normals, or 'ties': `levels` distinct values, so that most
  windows contain tied maxima."""
  if kind == 'random':
    return rng.normal(size=shape).astype(np.float32)
  return rng.integers(0, levels, size=shape).astype(np.float32)


@pytest.mark.parametrize('kind', ['random', 'ties'])
def test_max_pool_with_argmax_matches_torch(kind):
  rng = np.random.default_rng(1)
  x = _pool_input(rng, kind, (2, 8, 6, 3), levels=3)
  pooled, mask = layers.max_pool_with_argmax(jnp.asarray(x))
  t_pooled, t_pos, _ = torch_pool(x)
  np.testing.assert_array_equal(np.asarray(pooled), t_pooled)
  np.testing.assert_array_equal(np.argmax(np.asarray(mask), axis=-1), t_pos)
  if kind == 'ties':
    # Make sure the data really exercised tie-breaking: count the maxima in each window.
    windows = x.reshape(2, 4, 2, 3, 2, 3)
    num_maxima = (windows == windows.max(axis=(2, 4), keepdims=True)).sum(axis=(2, 4))
    assert (num_maxima > 1).mean() > 0.3
    _, ref_pos = np_max_pool_with_argmax(x)
    np.testing.assert_array_equal(ref_pos, t_pos)


def test_max_pool_with_argmax_explicit_ties_match_torch():
  x, expected_pos, _ = tie_data()
  _, t_pos, _ = torch_pool(x)
  np.testing.assert_array_equal(t_pos, expected_pos)


# ---------------------------------------------------------------------------------------------
# max_unpool


def test_max_unpool_matches_torch():
  rng = np.random.default_rng(2)
  x = rng.integers(0, 3, size=(2, 8, 6, 3)).astype(np.float32)
  _, mask = layers.max_pool_with_argmax(jnp.asarray(x))
  _, _, idx = torch_pool(x)
  values = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
  ours = layers.max_unpool(jnp.asarray(values), mask)
  ref = F.max_unpool2d(to_nchw(values), idx, kernel_size=2, stride=2, output_size=(8, 6))
  assert ours.shape == (2, 8, 6, 3)
  np.testing.assert_array_equal(np.asarray(ours), to_nhwc(ref))


def test_max_unpool_inverts_pool_at_maxima():
  x = np.random.default_rng(3).normal(size=(1, 4, 4, 2)).astype(np.float32)
  pooled, mask = layers.max_pool_with_argmax(jnp.asarray(x))
  restored = np.asarray(layers.max_unpool(pooled, mask))
  # Exactly one non-zero per window, equal to the window maximum at its place.
  ref_pooled, ref_pos = np_max_pool_with_argmax(x)
  expected = np.zeros_like(x)
  for b, i, j, c in np.ndindex(ref_pos.shape):
    dr, dc = divmod(ref_pos[b, i, j, c], 2)
    expected[b, 2 * i + dr, 2 * j + dc, c] = ref_pooled[b, i, j, c]
  np.testing.assert_array_equal(restored, expected)


@pytest.mark.parametrize('kind', ['random', 'ties'])
def test_max_pool_gradient_matches_torch(kind):
  rng = np.random.default_rng(4)
  x = _pool_input(rng, kind, (2, 4, 6, 3), levels=2)
  w = rng.normal(size=(2, 2, 3, 3)).astype(np.float32)

  grad = jax.grad(lambda v: jnp.sum(layers.max_pool_with_argmax(v)[0] * w))(jnp.asarray(x))

  xt = to_nchw(x).requires_grad_(True)
  pooled, _ = F.max_pool2d(xt, kernel_size=2, stride=2, return_indices=True)
  (pooled * to_nchw(w)).sum().backward()
  np.testing.assert_allclose(np.asarray(grad), to_nhwc(xt.grad), rtol=0, atol=1e-7)
  # Exactly one input per window receives the window's gradient.
  nonzero = (np.asarray(grad) != 0).reshape(2, 2, 2, 3, 2, 3).sum(axis=(2, 4))
  assert nonzero.max() == 1


def test_max_pool_gradient_all_equal_window_goes_to_top_left():
  x = jnp.full((1, 2, 2, 1), 3.0)
  grad = jax.grad(lambda v: jnp.sum(layers.max_pool_with_argmax(v)[0]))(x)
  np.testing.assert_array_equal(np.asarray(grad)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# upsample2x_bilinear and max_pool


@pytest.mark.parametrize('hw', [(1, 5), (2, 3), (4, 8), (3, 1), (5, 7)])
def test_upsample_matches_torch(hw):
  x = np.random.default_rng(5).normal(size=(2, *hw, 3)).astype(np.float32)
  ours = layers.upsample2x_bilinear(jnp.asarray(x))
  ref = F.interpolate(to_nchw(x), scale_factor=2, mode='bilinear', align_corners=True)
  assert ours.shape == (2, 2 * hw[0], 2 * hw[1], 3)
  np.testing.assert_allclose(np.asarray(ours), to_nhwc(ref), rtol=0, atol=1e-6)


@pytest.mark.parametrize('hw', [(2, 3), (4, 8), (1, 4)])
def test_upsample_matches_numpy_formula(hw):
  x = np.random.default_rng(6).uniform(-3, 3, size=(1, *hw, 2)).astype(np.float32)
  ours = np.asarray(layers.upsample2x_bilinear(jnp.asarray(x)))
  np.testing.assert_allclose(ours, np_upsample2x_align_corners(x), rtol=0, atol=1e-6)
  # align_corners=True keeps the four corner pixels exactly.
  for (i, j), (oi, oj) in [((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)), ((-1, -1), (-1, -1))]:
    np.testing.assert_array_equal(ours[0, oi, oj], x[0, i, j])


def test_upsample_keeps_linear_ramp_linear():
  # With align_corners=True a linear ramp 0..n-1 maps to an evenly spaced ramp 0..n-1 of 2n points.
  x = jnp.arange(4.0).reshape(1, 4, 1, 1) * jnp.ones((1, 1, 3, 1))
  out = np.asarray(layers.upsample2x_bilinear(x))[0, :, 0, 0]
  np.testing.assert_allclose(out, np.linspace(0.0, 3.0, 8), rtol=0, atol=1e-6)


def test_max_pool_matches_numpy():
  x = np.random.default_rng(7).normal(size=(2, 6, 4, 5)).astype(np.float32)
  ref = x.reshape(2, 3, 2, 2, 2, 5).max(axis=(2, 4))
  np.testing.assert_array_equal(np.asarray(layers.max_pool(jnp.asarray(x))), ref)


# ---------------------------------------------------------------------------------------------
# BatchNorm


def _bn_input(seed=8):
  rng = np.random.default_rng(seed)
  # A large mean offset relative to the spread: the regime where folding the mean into the
  # bias would lose precision.
  return (rng.normal(size=(4, 5, 6, 3)) * [0.5, 2.0, 1.0] + [10.0, -3.0, 0.0]).astype(np.float32)


def _random_affine(bn, seed=9):
  rng = np.random.default_rng(seed)
  bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, size=bn.scale.shape), jnp.float32)
  bn.bias[...] = jnp.asarray(rng.normal(size=bn.bias.shape), jnp.float32)


def test_batchnorm_init():
  bn = layers.BatchNorm(3)
  np.testing.assert_array_equal(np.asarray(bn.scale[...]), np.ones(3))
  np.testing.assert_array_equal(np.asarray(bn.bias[...]), np.zeros(3))
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), np.zeros(3))
  np.testing.assert_array_equal(np.asarray(bn.var[...]), np.ones(3))
  assert isinstance(bn.scale, nnx.Param) and isinstance(bn.mean, nnx.BatchStat)
  assert bn.epsilon == 1e-5


def test_batchnorm_train_normalises_with_biased_variance():
  x = _bn_input()
  bn = layers.BatchNorm(3)
  _random_affine(bn)
  y = np.asarray(bn(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  mean = x64.mean(axis=(0, 1, 2))
  var = x64.var(axis=(0, 1, 2))  # biased (ddof=0)
  ref = (x64 - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...], np.float64) + np.asarray(bn.bias[...], np.float64)
  np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5)


def test_batchnorm_running_stats_use_unbiased_variance():
  x = _bn_input()
  bn = layers.BatchNorm(3)
  bn.mean[...] = jnp.asarray([1.0, 2.0, 3.0])
  bn.var[...] = jnp.asarray([0.5, 4.0, 2.0])
  old_mean, old_var = np.array([1.0, 2.0, 3.0]), np.array([0.5, 4.0, 2.0])
  bn(jnp.asarray(x))
  x64 = x.astype(np.float64)
  n = x.shape[0] * x.shape[1] * x.shape[2]
  np.testing.assert_allclose(np.asarray(bn.mean[...]), 0.9 * old_mean + 0.1 * x64.mean((0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 * old_var + 0.1 * x64.var((0, 1, 2), ddof=1), rtol=1e-5)
  # The biased variance would be visibly different at n = 120.
  assert not np.allclose(np.asarray(bn.var[...]), 0.9 * old_var + 0.1 * x64.var((0, 1, 2)), rtol=1e-4)
  assert n == 120


def test_batchnorm_eval_view_uses_running_stats_and_does_not_update():
  x = _bn_input()
  bn = layers.BatchNorm(3)
  _random_affine(bn)
  bn.mean[...] = jnp.asarray([9.0, -2.0, 0.5])
  bn.var[...] = jnp.asarray([0.3, 3.0, 1.5])
  mean, var = np.asarray(bn.mean[...]).copy(), np.asarray(bn.var[...]).copy()
  view = nnx.view(bn, use_running_average=True)
  y = np.asarray(view(jnp.asarray(x)))
  ref = (x.astype(np.float64) - mean) / np.sqrt(var + 1e-5) * np.asarray(bn.scale[...]) + np.asarray(bn.bias[...])
  np.testing.assert_allclose(y, ref, rtol=0, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(bn.mean[...]), mean)
  np.testing.assert_array_equal(np.asarray(bn.var[...]), var)
  # The original module stays in train mode.
  assert not bn.use_running_average
  assert view.use_running_average


def test_batchnorm_matches_torch_train_and_eval():
  x = _bn_input()
  bn = layers.BatchNorm(3)
  _random_affine(bn)
  tbn = torch.nn.BatchNorm2d(3)
  with torch.no_grad():
    tbn.weight.copy_(torch.tensor(np.asarray(bn.scale[...])))
    tbn.bias.copy_(torch.tensor(np.asarray(bn.bias[...])))
  # Two train steps, so running stats start from non-default values on the second.
  for seed in (8, 10):
    xi = _bn_input(seed)
    y = np.asarray(bn(jnp.asarray(xi)))
    with torch.no_grad():
      ty = to_nhwc(tbn.train()(to_nchw(xi)))
    np.testing.assert_allclose(y, ty, rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), tbn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var[...]), tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
  y = np.asarray(nnx.view(bn, use_running_average=True)(jnp.asarray(x)))
  with torch.no_grad():
    ty = to_nhwc(tbn.eval()(to_nchw(x)))
  np.testing.assert_allclose(y, ty, rtol=0, atol=1e-5)


def test_batchnorm_keeps_float32_stats_for_bfloat16_inputs():
  bn = layers.BatchNorm(3, dtype=jnp.bfloat16)
  y = bn(jnp.asarray(_bn_input(), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Initialisation


def test_xavier_normal_conv_init():
  layer = layers.ConvLayer(64, 128, rngs=nnx.Rngs(0))
  kernel = np.asarray(layer.conv.kernel[...], np.float64)
  assert kernel.shape == (3, 3, 64, 128)
  fan_in, fan_out = 9 * 64, 9 * 128
  std = np.sqrt(2.0 / (fan_in + fan_out))
  # 73,728 samples: the sample std is within ~0.3% of the true one; allow 3%.
  assert abs(kernel.std() / std - 1) < 0.03
  assert abs(kernel.mean()) < 0.02 * std
  # A plain normal, not truncated: ~4.6% of samples lie beyond 2 std.
  assert 0.035 < np.mean(np.abs(kernel) > 2 * std) < 0.055
  np.testing.assert_array_equal(np.asarray(layer.conv.bias[...]), np.zeros(128))
  np.testing.assert_array_equal(np.asarray(layer.bn.scale[...]), np.ones(128))
  np.testing.assert_array_equal(np.asarray(layer.bn.bias[...]), np.zeros(128))


def test_xavier_normal_1x1_and_head_init():
  mask = layers.AttentionMask(256, 128, 256, rngs=nnx.Rngs(1))
  k1 = np.asarray(mask.conv1.kernel[...], np.float64)
  assert k1.shape == (1, 1, 256, 128)
  assert abs(k1.std() / np.sqrt(2.0 / (256 + 128)) - 1) < 0.03
  head = layers.PredictionHead(64, 13, rngs=nnx.Rngs(2))
  k = np.asarray(head.conv1.kernel[...], np.float64)
  assert abs(k.std() / np.sqrt(2.0 / (9 * 64 + 9 * 64)) - 1) < 0.03
  for conv in (mask.conv1, mask.conv2, head.conv1, head.conv2):
    assert not np.any(np.asarray(conv.bias[...]))


# ---------------------------------------------------------------------------------------------
# Task-stacked layers: (B, T, ..., C) activations must behave exactly like T calls in task order.


def _stacked_input(num_tasks=3, seed=11):
  """(B, T, H, W, C) data whose tasks have clearly different statistics."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(4, num_tasks, 5, 6, 3)) * rng.uniform(0.5, 2.0, size=(1, num_tasks, 1, 1, 3))
  return (x + rng.normal(scale=3.0, size=(1, num_tasks, 1, 1, 3))).astype(np.float32)


def _perturb_bn(bn, seed):
  """Random affine and running statistics, so that mixing up modules or tasks shows."""
  rng = np.random.default_rng(seed)
  _random_affine(bn, seed)
  bn.mean[...] = jnp.asarray(rng.normal(size=bn.mean.shape), jnp.float32)
  bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, size=bn.var.shape), jnp.float32)


def _bn_stats(bn):
  return np.asarray(bn.mean[...]), np.asarray(bn.var[...])


@pytest.mark.parametrize('num_tasks', [1, 3])
def test_batchnorm_per_task_equals_sequential_calls(num_tasks):
  x = _stacked_input(num_tasks)
  grouped = layers.BatchNorm(3)
  _perturb_bn(grouped, 12)
  plain = nnx.clone(grouped)
  y = np.asarray(grouped(jnp.asarray(x), per_task=True))
  ref = np.stack([np.asarray(plain(jnp.asarray(x[:, t]))) for t in range(num_tasks)], axis=1)
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
  for a, b in zip(_bn_stats(grouped), _bn_stats(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Per-task statistics really differ from pooled ones on this data.
  if num_tasks > 1:
    pooled = np.asarray(nnx.clone(plain)(jnp.asarray(x.reshape(-1, 5, 6, 3))))
    assert not np.allclose(y.reshape(-1, 5, 6, 3), pooled, atol=1e-2)


def test_batchnorm_per_task_eval_is_plain_batchnorm():
  x = _stacked_input()
  bn = layers.BatchNorm(3)
  _perturb_bn(bn, 13)
  view = nnx.view(bn, use_running_average=True)
  stats = _bn_stats(bn)
  y = np.asarray(view(jnp.asarray(x), per_task=True))
  np.testing.assert_array_equal(y, np.asarray(view(jnp.asarray(x))))
  for a, b in zip(_bn_stats(bn), stats):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('train', [True, False])
def test_batch_norm_per_task_equals_each_module_on_its_slice(train):
  x = _stacked_input()
  bns = [layers.BatchNorm(3) for _ in range(3)]
  for t, bn in enumerate(bns):
    _perturb_bn(bn, 20 + t)
  refs = [nnx.clone(bn) for bn in bns]
  if not train:
    bns = [nnx.view(bn, use_running_average=True) for bn in bns]
    refs = [nnx.view(bn, use_running_average=True) for bn in refs]
  y = np.asarray(layers.batch_norm_per_task(bns, jnp.asarray(x)))
  ref = np.stack([np.asarray(bn(jnp.asarray(x[:, t]))) for t, bn in enumerate(refs)], axis=1)
  np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
  for bn, ref_bn in zip(bns, refs):
    for a, b in zip(_bn_stats(bn), _bn_stats(ref_bn)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_batch_norm_per_task_rejects_wrong_task_count():
  with pytest.raises(ValueError, match='2 BatchNorm modules'):
    layers.batch_norm_per_task([layers.BatchNorm(3), layers.BatchNorm(3)], jnp.asarray(_stacked_input()))


def test_batch_norm_per_task_keeps_float32_stats_for_bfloat16():
  bns = [layers.BatchNorm(3, dtype=jnp.bfloat16) for _ in range(3)]
  y = layers.batch_norm_per_task(bns, jnp.asarray(_stacked_input(), jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  assert all(bn.mean[...].dtype == jnp.float32 and bn.var[...].dtype == jnp.float32 for bn in bns)


def test_conv_layer_per_task_equals_sequential_calls():
  x = _stacked_input()
  layer = layers.ConvLayer(3, 4, rngs=nnx.Rngs(3))
  _perturb_bn(layer.bn, 14)
  ref_layer = nnx.clone(layer)
  y = np.asarray(layer(jnp.asarray(x), per_task=True))
  ref = np.stack([np.asarray(ref_layer(jnp.asarray(x[:, t]))) for t in range(3)], axis=1)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(_bn_stats(layer.bn), _bn_stats(ref_layer.bn)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def _attention_modules(num_tasks, cin, seed=30):
  masks = [layers.AttentionMask(cin, 4, 5, rngs=nnx.Rngs(seed + t)) for t in range(num_tasks)]
  for t, mask in enumerate(masks):
    _perturb_bn(mask.bn1, seed + 10 * t)
    _perturb_bn(mask.bn2, seed + 10 * t + 1)
    rng = np.random.default_rng(seed + t)
    for conv in (mask.conv1, mask.conv2):
      conv.bias[...] = jnp.asarray(rng.normal(size=conv.bias.shape), jnp.float32)
  return masks


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('with_task_input', [False, True])
def test_attention_masks_equal_per_task_masks_on_concat(train, with_task_input):
  num_tasks = 3
  rng = np.random.default_rng(15)
  shared = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
  task = rng.normal(size=(2, num_tasks, 4, 6, 2)).astype(np.float32) if with_task_input else None
  masks = _attention_modules(num_tasks, 5 if with_task_input else 3)
  refs = [nnx.clone(m) for m in masks]
  if not train:
    masks = [nnx.view(m, use_running_average=True) for m in masks]
    refs = [nnx.view(m, use_running_average=True) for m in refs]
  y = layers.attention_masks(masks, jnp.asarray(shared), None if task is None else jnp.asarray(task))
  assert y.shape == (2, num_tasks, 4, 6, 5)
  # The reference's order: [shared feature, task feature] along channels.
  inputs = [shared if task is None else np.concatenate([shared, task[:, t]], axis=-1)
            for t in range(num_tasks)]
  ref = np.stack([np.asarray(m(jnp.asarray(i))) for m, i in zip(refs, inputs)], axis=1)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
  for mask, ref_mask in zip(masks, refs):
    for bn, ref_bn in ((mask.bn1, ref_mask.bn1), (mask.bn2, ref_mask.bn2)):
      for a, b in zip(_bn_stats(bn), _bn_stats(ref_bn)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_attention_masks_reject_wrong_input_width():
  masks = _attention_modules(2, 5)
  with pytest.raises(ValueError, match='5 input channels, given 3'):
    layers.attention_masks(masks, jnp.zeros((1, 2, 2, 3)))


def test_attention_masks_bfloat16_matches_module_dtype():
  masks = [layers.AttentionMask(3, 4, 5, rngs=nnx.Rngs(t), dtype=jnp.bfloat16) for t in range(2)]
  refs = [nnx.clone(m) for m in masks]
  shared = jnp.asarray(np.random.default_rng(16).normal(size=(2, 4, 6, 3)), jnp.float32)
  y = layers.attention_masks(masks, shared)
  assert y.dtype == jnp.bfloat16
  ref = np.stack([np.asarray(m(shared), np.float32) for m in refs], axis=1)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0, atol=2e-2)
