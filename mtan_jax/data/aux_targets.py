"""Self-supervised auxiliary targets computed from the image alone, in pure TensorFlow.

Every function works on ONE example (no batch axis), uses only graph-compatible TF ops (no
`tf.numpy_function`, no Python loops over pixels) and is deterministic, so it can run inside
`tf.data.Dataset.map(..., num_parallel_calls=tf.data.AUTOTUNE)` outside the Python GIL.
Randomness (the noise target) comes only from stateless ops keyed by an explicit seed, so a
resumed run sees exactly the same examples.

Targets:
  * `canny_edges`: a Canny edge map (H, W, 1) in {0, 1}.
  * `colorization`: the L channel as input and the ab channels as target (CIE Lab, D65).
  * `add_gaussian_noise`: a noisy copy of the image (denoising input; the clean image is the
    target).
"""

from __future__ import annotations

import math

import tensorflow as tf

# ITU-R BT.601 luma weights, the ones OpenCV's RGB2GRAY uses.
_LUMA = (0.299, 0.587, 0.114)

# sRGB (D65) -> XYZ, the matrix skimage.color and OpenCV's float path use.
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)

# Gradient-direction bins of non-maximum suppression: tan(22.5) and tan(67.5) degrees.
_TAN_22_5 = math.tan(math.radians(22.5))
_TAN_67_5 = math.tan(math.radians(67.5))

# Magnitudes closer than this are treated as equal in non-maximum suppression. Symmetric
# edges (a step between two pixels) give two mathematically equal magnitudes whose float32
# values differ by round-off; without a tolerance, which one survives (or whether both do)
# would depend on summation order. Sobel magnitudes of a [0, 1] image are at most 4*sqrt(2).
_NMS_TIE_TOLERANCE = 1e-5


def rgb_to_gray(image: tf.Tensor) -> tf.Tensor:
  """Luma of an RGB image (ITU-R BT.601, as OpenCV's RGB2GRAY).

  Args:
    image: (H, W, 3) float RGB, normally in [0, 1].

  Returns:
    (H, W) float32: 0.299 R + 0.587 G + 0.114 B.
  """
  image = tf.convert_to_tensor(image, tf.float32)
  return (_LUMA[0] * image[..., 0] + _LUMA[1] * image[..., 1] + _LUMA[2] * image[..., 2])


def gaussian_kernel_1d(sigma: float) -> tf.Tensor:
  """The normalised 1-D Gaussian used by `canny_edges`.

  Args:
    sigma: standard deviation in pixels, > 0.

  Returns:
    (2r + 1,) float32 weights summing to 1, radius r = max(1, ceil(3 sigma)).
  """
  radius = max(1, int(math.ceil(3.0 * sigma)))
  weights = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-radius, radius + 1)]
  total = sum(weights)
  return tf.constant([w / total for w in weights], tf.float32)


def _gaussian_blur(gray: tf.Tensor, sigma: float) -> tf.Tensor:
  """Separable Gaussian blur of an (H, W) map with symmetric ('half-sample') reflection."""
  kernel = gaussian_kernel_1d(sigma)
  radius = (int(kernel.shape[0]) - 1) // 2
  # SYMMETRIC repeats the edge pixel (scipy.ndimage mode='reflect', OpenCV BORDER_REFLECT):
  # it works for any image at least `radius` pixels wide, unlike REFLECT (reflect-101).
  x = tf.pad(gray, [[radius, radius], [radius, radius]], mode='SYMMETRIC')[None, :, :, None]
  x = tf.nn.conv2d(x, tf.reshape(kernel, [-1, 1, 1, 1]), strides=1, padding='VALID')
  x = tf.nn.conv2d(x, tf.reshape(kernel, [1, -1, 1, 1]), strides=1, padding='VALID')
  return x[0, :, :, 0]


def sobel_gradients(gray: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Unnormalised 3x3 Sobel derivatives of an (H, W) map, symmetric border.

  Args:
    gray: (H, W) float32.

  Returns:
    (gy, gx), each (H, W) float32: gy along rows (downwards positive), gx along columns
    (rightwards positive), with the kernels [1, 2, 1] x [-1, 0, 1] (as scipy.ndimage.sobel
    and OpenCV's Sobel with ksize=3), so a ramp of slope s per pixel gives 8 s.
  """
  h, w = tf.shape(gray)[0], tf.shape(gray)[1]
  p = tf.pad(gray, [[1, 1], [1, 1]], mode='SYMMETRIC')

  def window(dy, dx):
    return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

  gx = (window(-1, 1) - window(-1, -1)) + 2.0 * (window(0, 1) - window(0, -1)) + (
      window(1, 1) - window(1, -1))
  gy = (window(1, -1) - window(-1, -1)) + 2.0 * (window(1, 0) - window(-1, 0)) + (
      window(1, 1) - window(-1, 1))
  return gy, gx


def _non_maximum_suppression(magnitude: tf.Tensor, gy: tf.Tensor, gx: tf.Tensor) -> tf.Tensor:
  """True where `magnitude` is a local maximum along the quantised gradient direction."""
  h, w = tf.shape(magnitude)[0], tf.shape(magnitude)[1]
  # Zero outside the image (as OpenCV): a border pixel only has to beat its inside neighbour.
  p = tf.pad(magnitude, [[1, 1], [1, 1]])

  def shifted(dy, dx):
    return p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

  ax, ay = tf.abs(gx), tf.abs(gy)
  horizontal = ay <= _TAN_22_5 * ax  # gradient within 22.5 deg of the x axis: vertical edge
  vertical = ay > _TAN_67_5 * ax  # within 22.5 deg of the y axis: horizontal edge
  # The remaining diagonal bins: gx*gy > 0 points down-right (45 deg, y down), else 135 deg.
  down_right = gx * gy > 0.0
  # (previous, next) neighbours along the gradient direction of each bin.
  prev = tf.where(horizontal, shifted(0, -1),
                  tf.where(vertical, shifted(-1, 0),
                           tf.where(down_right, shifted(-1, -1), shifted(-1, 1))))
  nxt = tf.where(horizontal, shifted(0, 1),
                 tf.where(vertical, shifted(1, 0),
                          tf.where(down_right, shifted(1, 1), shifted(1, -1))))
  # Strict against the previous neighbour, non-strict against the next one (OpenCV's rule for
  # the axis bins, applied to all four): a plateau of two equal pixels keeps exactly one, so
  # edges come out 1 px thin.
  return (magnitude > prev + _NMS_TIE_TOLERANCE) & (magnitude >= nxt - _NMS_TIE_TOLERANCE)


def hysteresis(strong: tf.Tensor, weak: tf.Tensor) -> tf.Tensor:
  """Keeps the weak pixels 8-connected (through weak pixels) to a strong one.

  Iterated 3x3 dilation restricted to `weak`, in a `tf.while_loop` that stops when nothing
  changes. Each iteration grows every kept component by one pixel, so the loop never needs
  more than H*W iterations (a component cannot have more pixels than the image); that is the
  cap, reached only by adversarial serpentine edges.

  Args:
    strong: (H, W) bool, pixels accepted outright (should be a subset of `weak`).
    weak: (H, W) bool, candidate pixels.

  Returns:
    (H, W) bool edge map.
  """
  weak = tf.convert_to_tensor(weak, tf.bool) | strong
  kept0 = tf.cast(strong, tf.float32)
  weak_f = tf.cast(weak, tf.float32)
  cap = tf.size(weak)

  def grow(kept):
    dilated = tf.nn.max_pool2d(kept[None, :, :, None], ksize=3, strides=1, padding='SAME')
    return dilated[0, :, :, 0] * weak_f

  def cond(step, kept, changed):
    del kept
    return changed & (step < cap)

  def body(step, kept, changed):
    del changed
    new = grow(kept)
    return step + 1, new, tf.reduce_any(new != kept)

  _, kept, _ = tf.while_loop(cond, body, (tf.constant(0), kept0, tf.constant(True)))
  return kept > 0.5


def canny_edges(image: tf.Tensor, sigma: float = 1.0, low: float = 0.1,
                high: float = 0.2) -> tf.Tensor:
  """Canny edge map of an RGB image.

  gray (BT.601) -> Gaussian blur (radius ceil(3 sigma), symmetric border; none if sigma <= 0)
  -> 3x3 Sobel (unnormalised) -> L2 magnitude -> non-maximum suppression along the gradient
  direction quantised to 0/45/90/135 degrees -> double threshold -> hysteresis.

  Thresholds are ABSOLUTE on the unnormalised Sobel magnitude of the blurred [0, 1] gray image,
  the convention (and the defaults 0.1 / 0.2) of skimage.feature.canny for float images: a
  ramp of slope s per pixel has magnitude 8 s, a sharp step of contrast c about 3.2 c after a
  sigma=1 blur. Absolute thresholds make a pixel's label depend only on its neighbourhood, not
  on the brightest edge elsewhere in the image, and leave flat or low-contrast images edge-free
  instead of amplifying noise into edges (what per-image relative thresholds would do).

  Non-maximum suppression compares with the two neighbours along the direction, strictly
  against the up/left one and non-strictly against the down/right one (ties within 1e-5), so
  a step between two pixels gives a 1-px-thin line. Borders: the blur and Sobel reflect the
  image symmetrically (edge pixel repeated), and NMS treats magnitudes outside the image as 0,
  so edges may touch the image border. Weak pixels (magnitude >= low) survive when
  8-connected through weak pixels to a strong one (magnitude >= high).

  Args:
    image: (H, W, 3) float RGB in [0, 1]; H, W >= ceil(3 sigma).
    sigma: Gaussian standard deviation in pixels (Python float).
    low: weak threshold on the Sobel magnitude (float or scalar tensor).
    high: strong threshold on the Sobel magnitude, >= low (float or scalar tensor).

  Returns:
    (H, W, 1) float32 in {0, 1}.
  """
  if isinstance(low, (int, float)) and isinstance(high, (int, float)) and high < low:
    raise ValueError(f'canny_edges: high={high} must be >= low={low}')
  gray = rgb_to_gray(image)
  if sigma > 0:
    gray = _gaussian_blur(gray, sigma)
  gy, gx = sobel_gradients(gray)
  magnitude = tf.sqrt(gx * gx + gy * gy)
  local_max = _non_maximum_suppression(magnitude, gy, gx)
  strong = local_max & (magnitude >= high)
  weak = local_max & (magnitude >= low)
  edges = hysteresis(strong, weak)
  return tf.cast(edges, tf.float32)[..., None]


def _srgb_to_linear(c: tf.Tensor) -> tf.Tensor:
  # Clamp the power branch's input so values it does not select never produce NaN. The
  # base is positive, so x^p = exp(p log x): ~6x faster than tf.pow on CPU (measured in
  # benchmarks/input_pipeline.py's stage profile, where Lab was half the pets pipeline).
  power = tf.exp(2.4 * tf.math.log((tf.maximum(c, 0.04045) + 0.055) / 1.055))
  return tf.where(c > 0.04045, power, c / 12.92)


def _lab_f(t: tf.Tensor) -> tf.Tensor:
  delta = 6.0 / 29.0
  cube_root = tf.exp(tf.math.log(tf.maximum(t, delta ** 3)) / 3.0)
  return tf.where(t > delta ** 3, cube_root, t / (3.0 * delta * delta) + 4.0 / 29.0)


def rgb_to_lab(image: tf.Tensor) -> tf.Tensor:
  """sRGB -> CIE Lab (D65 white), the formulas of skimage.color.rgb2lab.

  Inverse sRGB gamma (threshold 0.04045, exponent 2.4), the sRGB->XYZ matrix, division by the
  D65 white (0.95047, 1.0, 1.08883), f(t) = t^(1/3) above (6/29)^3 and linear below.

  Args:
    image: (H, W, 3) float sRGB in [0, 1] (also any (..., 3)).

  Returns:
    (..., 3) float32 (L, a, b): L in [0, 100], a and b roughly in [-128, 127]; white is
    (100, 0, 0), black (0, 0, 0).
  """
  image = tf.convert_to_tensor(image, tf.float32)
  linear = _srgb_to_linear(image)
  # XYZ = M @ rgb per pixel, then normalised by the white point.
  matrix = tf.constant(_XYZ_FROM_RGB, tf.float32) / tf.constant(_D65_WHITE, tf.float32)[:, None]
  xyz = tf.tensordot(linear, tf.transpose(matrix), axes=1)
  f = _lab_f(xyz)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  lightness = 116.0 * fy - 16.0
  a = 500.0 * (fx - fy)
  b = 200.0 * (fy - fz)
  return tf.stack([lightness, a, b], axis=-1)


def colorization(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Input and target of the colourisation task.

  The network sees the lightness and predicts the chroma; scaling both to about unit range
  keeps the L1 loss on ab/128 comparable to the other tasks' losses.

  Args:
    image: (H, W, 3) float sRGB in [0, 1].

  Returns:
    l_input: (H, W, 1) float32, L / 100, in [0, 1].
    ab_target: (H, W, 2) float32, (a, b) / 128, roughly in [-1, 1).
  """
  lab = rgb_to_lab(image)
  return lab[..., :1] / 100.0, lab[..., 1:] / 128.0


def add_gaussian_noise(image: tf.Tensor, sigma_255: float | tf.Tensor,
                       seed: tf.Tensor) -> tf.Tensor:
  """Adds Gaussian noise of standard deviation sigma_255 / 255 and clips to [0, 1].

  The result is clipped because it stands for an image a camera could have recorded (the
  denoising input); the noise is therefore slightly smaller than sigma near 0 and 1. The draw
  uses Philox explicitly so that the same seed gives the same noise on every device.

  Args:
    image: (H, W, 3) float in [0, 1] (any shape works).
    sigma_255: noise standard deviation in 8-bit units (e.g. 25); float or scalar tensor.
    seed: shape [2] int32/int64 tensor; the same seed gives the same noise.

  Returns:
    float32 tensor of the image's shape, in [0, 1].
  """
  image = tf.convert_to_tensor(image, tf.float32)
  noise = tf.random.stateless_normal(tf.shape(image), seed=seed, alg='philox')
  sigma = tf.cast(sigma_255, tf.float32) / 255.0
  return tf.clip_by_value(image + sigma * noise, 0.0, 1.0)
