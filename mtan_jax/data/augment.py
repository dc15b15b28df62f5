"""The MTAN reference's NYUv2 augmentation (random scale-crop + horizontal flip) in pure TF.

Reference (lorenmt/mtan, `im2im_pred/create_dataset.py`, applied to every training example
when augmentation is on): pick a scale sc uniformly from (1.0, 1.2, 1.5); crop an
int(H / sc) x int(W / sc) window at a uniformly random position (inclusive integer ranges);
resize it back to H x W with `F.interpolate` (image and normal: bilinear, align_corners=True;
label and depth: PyTorch's legacy 'nearest'); divide depth by sc (the scene looks sc times
closer); then, with probability 0.5, flip everything horizontally and negate the normals' x
component. Normals are not renormalised after bilinear resampling, as in the reference.

Everything here works on ONE example (no batch axis) with static (H, W), uses only
graph-compatible TF ops, and draws its randomness from stateless Philox ops keyed by an
explicit seed, so it runs in `tf.data.Dataset.map(num_parallel_calls=AUTOTUNE)` and a resumed
run sees exactly the same augmented examples. The two resize primitives reproduce PyTorch's
index and weight arithmetic (float32), so results match `F.interpolate` to float round-off.

Per-key treatment (`kinds`), by default from the key name:
  'image' / 'dense': bilinear, align_corners=True.
  'label': nearest (any dtype; values, including -1, are only copied).
  'depth': nearest, then divided by the scale (0 = invalid stays 0).
  'normal': bilinear, align_corners=True; channel 0 (x) negated on flip.
  'bbox': a (4,) float box [ymin, xmin, ymax, xmax] in pixel units, moved with the image.
  'none': returned unchanged.
Keys not named above: float tensors with the example's (H, W) leading shape are 'dense',
other (H, W, ...) tensors are 'label', anything else (scalars such as 'species' or the
pipeline's 'mask') is 'none'.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

KINDS = ('image', 'dense', 'label', 'depth', 'normal', 'bbox', 'none')
_DEFAULT_KINDS = {'image': 'image', 'label': 'label', 'depth': 'depth', 'normal': 'normal',
                  'bbox': 'bbox'}
_BILINEAR = ('image', 'dense', 'normal')
_NEAREST = ('label', 'depth')
DEFAULT_SCALES = (1.0, 1.2, 1.5)


def _torch_scaled_range(numerator, denominator, out_size: int) -> tf.Tensor:
  """float32(float32(numerator / denominator) * dst) for dst = 0..out_size-1, as PyTorch.

  PyTorch computes the scale and the source coordinate in float32. Writing that directly as
  float32 TF ops is not safe in a `tf.function`: Grappler's constant folding rewrites
  (x / c1) * c2 into x * (c2 / c1), which rounds differently and moves src = 39 to
  38.99999 (a different source index). So the same float32 values are computed in float64
  with explicit casts, which no rewrite looks through: the quotient of two integers below
  2^20 rounds to float32 exactly as a direct float32 division would, and the product of a
  float32 with an integer below 2^24 is exact in float64 before its one rounding to float32.
  """
  quotient = tf.cast(numerator, tf.float64) / tf.cast(denominator, tf.float64)
  scale = tf.cast(tf.cast(quotient, tf.float32), tf.float64)
  return tf.cast(scale * tf.range(out_size, dtype=tf.float64), tf.float32)


def _bilinear_axis(in_size: tf.Tensor, out_size: int):
  """PyTorch's align_corners=True source indices and weights along one axis.

  src = dst * (in - 1) / (out - 1) in float32 (0 when out == 1), i0 = floor(src),
  i1 = min(i0 + 1, in - 1), weight of i1 = src - i0: upsample_bilinear2d's arithmetic.
  """
  in_size = tf.cast(in_size, tf.int32)
  src = _torch_scaled_range(in_size - 1, max(out_size - 1, 1), out_size)
  if out_size == 1:
    src = tf.zeros([1], tf.float32)
  i0 = tf.cast(src, tf.int32)  # truncation == floor, src >= 0
  i1 = tf.minimum(i0 + 1, in_size - 1)
  lam1 = src - tf.cast(i0, tf.float32)
  return i0, i1, 1.0 - lam1, lam1


def _nearest_axis(in_size: tf.Tensor, out_size: int) -> tf.Tensor:
  """PyTorch's legacy 'nearest' source indices along one axis.

  src = min(floor(dst * s), in - 1) with s = in / out computed in float32, exactly as
  PyTorch does (so it agrees with F.interpolate even where float32 rounding makes it differ
  from the exact floor(dst * in / out)).
  """
  in_size = tf.cast(in_size, tf.int32)
  src = tf.floor(_torch_scaled_range(in_size, out_size, out_size))
  return tf.minimum(tf.cast(src, tf.int32), in_size - 1)


def _apply_bilinear(x, rows, cols):
  """Bilinear resampling of (H, W, ...) `x` given per-axis (i0, i1, w0, w1)."""
  r0, r1, rw0, rw1 = rows
  c0, c1, cw0, cw1 = cols
  dtype = x.dtype
  x = tf.cast(x, tf.float32)
  extra = [1] * (x.shape.rank - 2)
  rw0 = tf.reshape(rw0, [-1, 1] + extra)
  rw1 = tf.reshape(rw1, [-1, 1] + extra)
  cw0 = tf.reshape(cw0, [1, -1] + extra)
  cw1 = tf.reshape(cw1, [1, -1] + extra)
  top = tf.gather(x, r0, axis=0)
  bottom = tf.gather(x, r1, axis=0)
  # Same association as PyTorch: h0l * (w0l * x00 + w1l * x01) + h1l * (w0l * x10 + w1l * x11).
  top = cw0 * tf.gather(top, c0, axis=1) + cw1 * tf.gather(top, c1, axis=1)
  bottom = cw0 * tf.gather(bottom, c0, axis=1) + cw1 * tf.gather(bottom, c1, axis=1)
  return tf.cast(rw0 * top + rw1 * bottom, dtype)


def _apply_nearest(x, rows, cols):
  return tf.gather(tf.gather(x, rows, axis=0), cols, axis=1)


def resize_bilinear_align_corners(x: tf.Tensor, out_h: int, out_w: int) -> tf.Tensor:
  """`F.interpolate(mode='bilinear', align_corners=True)` for one (H, W[, C]) tensor.

  Args:
    x: (H, W) or (H, W, C) float tensor; H, W may be dynamic.
    out_h: output height (Python int).
    out_w: output width (Python int).

  Returns:
    (out_h, out_w[, C]) tensor of x's dtype (computed in float32).
  """
  x = tf.convert_to_tensor(x)
  shape = tf.shape(x)
  out = _apply_bilinear(x, _bilinear_axis(shape[0], out_h), _bilinear_axis(shape[1], out_w))
  out.set_shape([out_h, out_w] + x.shape[2:].as_list())
  return out


def resize_nearest_torch(x: tf.Tensor, out_h: int, out_w: int) -> tf.Tensor:
  """`F.interpolate(mode='nearest')` (PyTorch's legacy nearest) for one (H, W[, C]) tensor.

  Source index floor(dst * in / out) (float32 arithmetic, as PyTorch), clamped to in - 1.

  Args:
    x: (H, W) or (H, W, C) tensor of any dtype; H, W may be dynamic.
    out_h: output height (Python int).
    out_w: output width (Python int).

  Returns:
    (out_h, out_w[, C]) tensor of x's dtype; every value is copied from x.
  """
  x = tf.convert_to_tensor(x)
  shape = tf.shape(x)
  out = _apply_nearest(x, _nearest_axis(shape[0], out_h), _nearest_axis(shape[1], out_w))
  out.set_shape([out_h, out_w] + x.shape[2:].as_list())
  return out


def _spatial_size(example: Mapping[str, tf.Tensor], kinds: Mapping[str, str]):
  """The examples' static (H, W), taken from the 'image' key or the first dense key."""
  keys = sorted(example, key=lambda k: (k != 'image', k))
  for key in keys:
    if kinds[key] not in ('bbox', 'none'):
      shape = tf.TensorShape(example[key].shape)
      if shape.rank is None or shape.rank < 2 or shape[0] is None or shape[1] is None:
        raise ValueError(f'augment: {key!r} has shape {shape}; dense keys need a static (H, W)')
      return int(shape[0]), int(shape[1])
  raise ValueError(f'augment: no dense key to define (H, W) among {sorted(example)}')


def resolve_kinds(example: Mapping[str, tf.Tensor],
                  kinds: Mapping[str, str] | None = None) -> dict[str, str]:
  """How `augment` treats each key: `kinds` overrides, then the defaults by name and type.

  Args:
    example: per-example tensors.
    kinds: optional key -> kind (one of KINDS) overrides.

  Returns:
    key -> kind for every key of `example`.
  """
  kinds = dict(kinds or {})
  for key, kind in kinds.items():
    if kind not in KINDS:
      raise ValueError(f'augment: kind {kind!r} for {key!r}; expected one of {KINDS}')
  resolved = {k: kinds.get(k, _DEFAULT_KINDS.get(k)) for k in example}
  named = [k for k, v in resolved.items() if v not in (None, 'bbox', 'none')]
  ref_shape = None
  if named:
    ref_key = sorted(named, key=lambda k: (k != 'image', k))[0]
    ref_shape = tf.TensorShape(example[ref_key].shape)[:2]
  for key, kind in resolved.items():
    if kind is not None:
      continue
    value = tf.convert_to_tensor(example[key])
    spatial = value.shape.rank is not None and value.shape.rank >= 2 and (
        ref_shape is None or value.shape[:2] == ref_shape)
    if not spatial:
      resolved[key] = 'none'
    else:
      resolved[key] = 'dense' if value.dtype.is_floating else 'label'
  return resolved


def crop_size(height: int, width: int, scale: float) -> tuple[int, int]:
  """The reference's crop size: (int(H / sc), int(W / sc)), Python float division."""
  return int(height / scale), int(width / scale)


def _scale_f64(scale) -> tf.Tensor:
  # A Python float must become float64 directly: tf.cast(1.2, tf.float64) would go through a
  # float32 constant (1.2000000477) and int(48 / that) would be 39 instead of 40.
  if isinstance(scale, (int, float)):
    return tf.constant(float(scale), tf.float64)
  return tf.cast(scale, tf.float64)


def _crop_size_tensor(size: int, scale) -> tf.Tensor:
  # float64 division then floor: bit-identical to Python's int(size / scale) for scale > 0.
  return tf.cast(tf.floor(tf.constant(float(size), tf.float64) / _scale_f64(scale)), tf.int32)


def transform_bbox(box: tf.Tensor, height: int, width: int, scale, i, j, flip) -> tf.Tensor:
  """Moves a [ymin, xmin, ymax, xmax] pixel box with the crop, resize and flip.

  Box coordinates are continuous pixel-edge coordinates of the (H, W) image: a box covering
  rows r0..r1 and columns c0..c1 is [r0, c0, r1 + 1, c1 + 1], the whole image [0, 0, H, W].
  The crop window [i, i + h) x [j, j + w) is stretched onto [0, H) x [0, W), so
  y -> (y - i) * H / h and x -> (x - j) * W / w (this is exact for the nearest-resized
  labels; the align_corners image content is within half a pixel of it); a flip maps
  x -> W - x and swaps xmin / xmax. The result is clipped to the image. An all-zero box
  ("no box") stays all zero, and so does a box that leaves the crop entirely (zero area after
  clipping): the object is no longer visible.

  Args:
    box: (4,) float [ymin, xmin, ymax, xmax].
    height: image height H.
    width: image width W.
    scale: the crop's scale (float or scalar tensor).
    i: crop top row (int or scalar tensor).
    j: crop left column.
    flip: whether the example is flipped (bool or scalar bool tensor).

  Returns:
    (4,) float box of `box`'s dtype.
  """
  box = tf.convert_to_tensor(box)
  dtype = box.dtype
  b = tf.cast(box, tf.float32)
  h = tf.cast(_crop_size_tensor(height, scale), tf.float32)
  w = tf.cast(_crop_size_tensor(width, scale), tf.float32)
  fi, fj = tf.cast(i, tf.float32), tf.cast(j, tf.float32)
  sy, sx = float(height) / h, float(width) / w
  ymin = tf.clip_by_value((b[0] - fi) * sy, 0.0, float(height))
  ymax = tf.clip_by_value((b[2] - fi) * sy, 0.0, float(height))
  xmin = tf.clip_by_value((b[1] - fj) * sx, 0.0, float(width))
  xmax = tf.clip_by_value((b[3] - fj) * sx, 0.0, float(width))
  flip = tf.cast(flip, tf.bool)
  xmin, xmax = (tf.where(flip, float(width) - xmax, xmin),
                tf.where(flip, float(width) - xmin, xmax))
  out = tf.stack([ymin, xmin, ymax, xmax])
  visible = tf.reduce_any(b != 0.0) & (ymax > ymin) & (xmax > xmin)
  out = tf.where(visible, out, tf.zeros_like(out))
  return tf.cast(out, dtype)


def augment_with_params(example: Mapping[str, tf.Tensor], scale, i, j, flip,
                        kinds: Mapping[str, str] | None = None) -> dict[str, tf.Tensor]:
  """Applies one fixed scale-crop (+ flip) to every key of an example.

  Args:
    example: per-example tensors (no batch axis) with a static (H, W).
    scale: crop scale sc >= 1 (float or scalar tensor); the crop is int(H/sc) x int(W/sc).
    i: crop top row, 0 <= i <= H - int(H/sc) (int or scalar int tensor).
    j: crop left column, 0 <= j <= W - int(W/sc).
    flip: flip horizontally after resizing (bool or scalar bool tensor).
    kinds: optional per-key kind overrides (see the module docstring).

  Returns:
    A new dict with the same keys, shapes and dtypes.
  """
  kinds = resolve_kinds(example, kinds)
  if all(kind == 'none' for kind in kinds.values()):
    return dict(example)
  height, width = _spatial_size(example, kinds)
  h = _crop_size_tensor(height, scale)
  w = _crop_size_tensor(width, scale)
  i = tf.cast(i, tf.int32)
  j = tf.cast(j, tf.int32)
  flip = tf.cast(flip, tf.bool)

  # Fold the crop offset into the source indices and the flip into the output order: every
  # output column is computed independently, so reversing its index/weight arrays flips the
  # output exactly, with no extra pass over the data.
  def along_width(params):
    return tuple(tf.where(flip, tf.reverse(p, [0]), p) for p in params)

  r0, r1, rw0, rw1 = _bilinear_axis(h, height)
  c0, c1, cw0, cw1 = _bilinear_axis(w, width)
  bilinear_rows = (r0 + i, r1 + i, rw0, rw1)
  bilinear_cols = along_width((c0 + j, c1 + j, cw0, cw1))
  nearest_rows = _nearest_axis(h, height) + i
  nearest_cols = along_width((_nearest_axis(w, width) + j,))[0]

  out = {}
  for key, value in example.items():
    kind = kinds[key]
    if kind == 'none':
      out[key] = value
      continue
    value = tf.convert_to_tensor(value)
    if kind == 'bbox':
      out[key] = transform_bbox(value, height, width, scale, i, j, flip)
      continue
    if tuple(value.shape[:2]) != (height, width):
      raise ValueError(f'augment: {key!r} has shape {value.shape}; '
                       f'expected ({height}, {width}, ...)')
    if kind in _BILINEAR:
      result = _apply_bilinear(value, bilinear_rows, bilinear_cols)
    else:
      result = _apply_nearest(value, nearest_rows, nearest_cols)
    if kind == 'depth':
      result = result / tf.cast(_scale_f64(scale), result.dtype)
    if kind == 'normal':
      sign = tf.where(flip, -1.0, 1.0)
      signs = tf.concat([tf.reshape(sign, [1]), tf.ones([value.shape[-1] - 1])], 0)
      result = result * tf.cast(signs, result.dtype)
    result.set_shape(value.shape)
    out[key] = result
  return out


def sample_params(seed: tf.Tensor, height: int, width: int,
                  scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True):
  """Draws the reference's (scale, i, j, flip) from a stateless seed.

  scale uniform over `scales`; i uniform over 0..H - int(H/scale) and j over
  0..W - int(W/scale) (inclusive, as `random.randint`); flip with probability 0.5 (always
  False when `flip` is False). Each draw has its own Philox stream folded from `seed`.

  Args:
    seed: shape [2] int32/int64 tensor.
    height: image height H.
    width: image width W.
    scales: candidate scales, each >= 1.
    flip: whether flipping is enabled.

  Returns:
    (scale float64 scalar, i int32 scalar, j int32 scalar, flip bool scalar) tensors.
  """
  scales = tuple(float(s) for s in scales)
  if not scales or min(scales) < 1.0:
    raise ValueError(f'augment: scales={scales}; need at least one scale, all >= 1 '
                     f'(the crop must fit inside the image)')
  seed = tf.convert_to_tensor(seed)

  def draw(stream, maxval):
    sub = tf.random.experimental.stateless_fold_in(seed, stream, alg='philox')
    return tf.random.stateless_uniform([], sub, minval=0, maxval=maxval, dtype=tf.int32,
                                       alg='philox')

  k = draw(0, len(scales))
  scale = tf.gather(tf.constant(scales, tf.float64), k)
  # The crop sizes with Python's own arithmetic, indexed by the drawn scale.
  sizes = [crop_size(height, width, s) for s in scales]
  h = tf.gather(tf.constant([s[0] for s in sizes], tf.int32), k)
  w = tf.gather(tf.constant([s[1] for s in sizes], tf.int32), k)
  i = draw(1, height - h + 1)
  j = draw(2, width - w + 1)
  do_flip = draw(3, 2) > 0 if flip else tf.constant(False)
  return scale, i, j, do_flip


def augment(example: Mapping[str, tf.Tensor], seed: tf.Tensor,
            scales: Sequence[float] = DEFAULT_SCALES, flip: bool = True,
            kinds: Mapping[str, str] | None = None) -> dict[str, tf.Tensor]:
  """The reference's random scale-crop and horizontal flip of one example.

  Args:
    example: per-example tensors (no batch axis) with a static (H, W), e.g. 'image' (H, W, 3)
      float, 'label' (H, W) int (-1 = ignore), 'depth' (H, W, 1) float (0 = invalid),
      'normal' (H, W, 3) float, 'bbox' (4,) float [ymin, xmin, ymax, xmax] in pixels.
    seed: shape [2] int32/int64 tensor; the same seed gives the same output.
    scales: candidate crop scales (each >= 1), chosen uniformly.
    flip: flip horizontally with probability 0.5.
    kinds: optional per-key kind overrides (see the module docstring).

  Returns:
    A new dict with the same keys, shapes and dtypes.
  """
  resolved = resolve_kinds(example, kinds)
  if all(kind == 'none' for kind in resolved.values()):
    return dict(example)
  height, width = _spatial_size(example, resolved)
  scale, i, j, do_flip = sample_params(seed, height, width, scales, flip)
  return augment_with_params(example, scale, i, j, do_flip, resolved)
