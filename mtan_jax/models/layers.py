"""Building blocks of SegNet and MTAN, with the PyTorch reference's exact semantics.

Layout is NHWC throughout. The blocks mirror the reference's `nn.Sequential`s so that weights
import one to one (see `mtan_jax/torch_import.py`):

- `ConvLayer`: 3x3 conv (pad 1) -> BatchNorm -> ReLU.
- `AttentionMask`: 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN -> sigmoid.
- `PredictionHead`: 3x3 conv (C -> C) -> 1x1 conv (C -> task channels), no BN.

and the pooling ops SegNet needs: a 2x2 max-pool that remembers where each maximum was and the
matching max-unpool, written with reshapes and one-hot masks instead of scatter (XLA fuses
these well, and gradients flow exactly as in PyTorch: only to the first maximum of a window).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# PyTorch's nn.init.xavier_normal_: a plain (not truncated) normal with
# std = sqrt(2 / (fan_in + fan_out)); for a conv kernel the fans include the receptive field.
xavier_normal = jax.nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


class BatchNorm(nnx.Module):
  """BatchNorm over all but the channel axis, with PyTorch's conventions.

  PyTorch normalises with the biased batch variance but updates the running variance with
  the unbiased one, and its momentum 0.1 means `running = 0.9 * running + 0.1 * batch`.
  Statistics are always computed in float32, whatever the activation dtype.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.use_running_average = False

  def set_view(self, use_running_average: bool | None = None):
    """Lets `nnx.view(model, use_running_average=True)` build the evaluation view."""
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      x32 = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      n = int(np.prod([x.shape[a] for a in axes]))
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
      self.var[...] = (1.0 - m) * self.var[...] + m * unbiased
    # Subtract the mean before scaling: folding it into one bias (x * m + (b - mean * m))
    # cancels catastrophically when |mean| >> std, costing ~1e-5 relative error per layer.
    mul = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    y = (x - mean.astype(x.dtype)) * mul.astype(x.dtype) + self.bias[...].astype(x.dtype)
    return y.astype(self.dtype)


def _conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs, dtype) -> nnx.Conv:
  return nnx.Conv(cin, cout, (kernel, kernel), padding='SAME', kernel_init=xavier_normal,
                  bias_init=jax.nn.initializers.zeros, dtype=dtype, rngs=rngs)


class ConvLayer(nnx.Module):
  """3x3 conv (padding 1) -> BatchNorm -> ReLU: the reference's `conv_layer`."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv = _conv(cin, cout, 3, rngs, dtype)
    self.bn = BatchNorm(cout, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class AttentionMask(nnx.Module):
  """Task attention mask: sigmoid(BN(1x1 conv(ReLU(BN(1x1 conv(x)))))): the reference's `att_layer`."""

  def __init__(self, cin: int, cmid: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv1 = _conv(cin, cmid, 1, rngs, dtype)
    self.bn1 = BatchNorm(cmid, dtype=dtype)
    self.conv2 = _conv(cmid, cout, 1, rngs, dtype)
    self.bn2 = BatchNorm(cout, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    return jax.nn.sigmoid(self.bn2(self.conv2(x)))


class PredictionHead(nnx.Module):
  """3x3 conv (C -> C) then 1x1 conv (C -> out), no normalisation: the reference's `pred_task*`."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.conv1 = _conv(cin, cin, 3, rngs, dtype)
    self.conv2 = _conv(cin, cout, 1, rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Heads produce float32 so that log-softmax and normalisation are exact.
    return self.conv2(self.conv1(x)).astype(jnp.float32)


def max_pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """2x2 / stride 2 max-pool that also returns where each maximum was.

  Args:
    x: (B, H, W, C) with H and W even.

  Returns:
    pooled: (B, H/2, W/2, C).
    mask: (B, H/2, W/2, C, 4) one-hot of the window position of the maximum, in row-major
      window order (top-left, top-right, bottom-left, bottom-right). Ties go to the first
      maximum in that order, as in PyTorch's MaxPool2d(return_indices=True).
  """
  b, h, w, c = x.shape
  win = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4)
  mask = jax.nn.one_hot(jnp.argmax(win, axis=-1), 4, dtype=x.dtype)
  # Selecting through the mask (rather than jnp.max) sends the gradient to the arg-max only,
  # exactly like PyTorch; jnp.max would split it between tied maxima.
  return jnp.sum(win * mask, axis=-1), mask


def max_unpool(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Inverse of `max_pool_with_argmax`: writes each value back where its maximum was.

  Args:
    x: (B, h, w, C) values to place.
    mask: (B, h, w, C, 4) from `max_pool_with_argmax`.

  Returns:
    (B, 2h, 2w, C), zero everywhere except at the remembered positions.
  """
  b, h, w, c = x.shape
  out = (x[..., None] * mask.astype(x.dtype)).reshape(b, h, w, c, 2, 2)
  return out.transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, c)


def max_pool(x: jax.Array) -> jax.Array:
  """Plain 2x2 / stride 2 max-pool (used inside the attention branches)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')


@functools.cache
def _align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) linear interpolation weights with align_corners=True."""
  mat = np.zeros((n_out, n_in), np.float32)
  if n_in == 1:
    mat[:, 0] = 1.0
    return mat
  src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / max(n_out - 1, 1)
  lo = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float32)
  rows = np.arange(n_out)
  np.add.at(mat, (rows, lo), 1.0 - frac)
  np.add.at(mat, (rows, hi), frac)
  return mat


def upsample2x_bilinear(x: jax.Array) -> jax.Array:
  """x2 bilinear upsampling with align_corners=True (PyTorch's F.interpolate semantics).

  Written as two small matrix products, which is exact and maps onto the MXU / tensor cores.

  Args:
    x: (B, H, W, C).

  Returns:
    (B, 2H, 2W, C).
  """
  _, h, w, _ = x.shape
  mh = jnp.asarray(_align_corners_matrix(h, 2 * h), x.dtype)
  mw = jnp.asarray(_align_corners_matrix(w, 2 * w), x.dtype)
  x = jnp.einsum('oh,bhwc->bowc', mh, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum('pw,bowc->bopc', mw, x, precision=jax.lax.Precision.HIGHEST)
