"""Tests for mtan_jax.data.aux_targets against independent NumPy / SciPy references."""

import collections
import math

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
ndimage = pytest.importorskip('scipy.ndimage')

from mtan_jax.data import aux_targets  # pylint: disable=g-import-not-at-top

# ---------------------------------------------------------------------------------------------
# NumPy references: written from the textbook description, per pixel where that is clearer.


def np_gray(image):
  return image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114


def np_canny(image, sigma=1.0, low=0.1, high=0.2, tol=1e-5):
  """Canny in float64: scipy blur and Sobel, per-pixel NMS loop, BFS hysteresis."""
  gray = np_gray(image.astype(np.float64))
  if sigma > 0:
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-x ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    # scipy's 'reflect' repeats the edge pixel, the documented border of aux_targets.
    gray = ndimage.correlate1d(gray, kernel, axis=0, mode='reflect')
    gray = ndimage.correlate1d(gray, kernel, axis=1, mode='reflect')
  gx = ndimage.sobel(gray, axis=1, mode='reflect')
  gy = ndimage.sobel(gray, axis=0, mode='reflect')
  mag = np.hypot(gx, gy)
  h, w = mag.shape

  def at(r, c):
    return mag[r, c] if 0 <= r < h and 0 <= c < w else 0.0

  nms = np.zeros((h, w), bool)
  for r in range(h):
    for c in range(w):
      angle = math.degrees(math.atan2(gy[r, c], gx[r, c])) % 180.0
      if angle < 22.5 or angle >= 157.5:
        (pr, pc), (nr, nc) = (r, c - 1), (r, c + 1)
      elif angle < 67.5:  # gradient pointing down-right (rows grow downwards)
        (pr, pc), (nr, nc) = (r - 1, c - 1), (r + 1, c + 1)
      elif angle < 112.5:
        (pr, pc), (nr, nc) = (r - 1, c), (r + 1, c)
      else:
        (pr, pc), (nr, nc) = (r - 1, c + 1), (r + 1, c - 1)
      nms[r, c] = mag[r, c] > at(pr, pc) + tol and mag[r, c] >= at(nr, nc) - tol
  weak = nms & (mag >= low)
  strong = nms & (mag >= high)
  edges = np.zeros_like(strong)
  queue = collections.deque(zip(*np.nonzero(strong)))
  for r, c in queue:
    edges[r, c] = True
  while queue:
    r, c = queue.popleft()
    for dr in (-1, 0, 1):
      for dc in (-1, 0, 1):
        rr, cc = r + dr, c + dc
        if 0 <= rr < h and 0 <= cc < w and weak[rr, cc] and not edges[rr, cc]:
          edges[rr, cc] = True
          queue.append((rr, cc))
  return edges, mag


def np_lab(image):
  """rgb2lab per pixel with Python floats."""
  m = [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
       [0.019334, 0.119193, 0.950227]]
  white = [0.95047, 1.0, 1.08883]
  out = np.zeros(image.shape, np.float64)
  for idx in np.ndindex(image.shape[:-1]):
    lin = [((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92 for c in image[idx]]
    xyz = [sum(m[k][n] * lin[n] for n in range(3)) / white[k] for k in range(3)]
    f = [t ** (1 / 3) if t > (6 / 29) ** 3 else t / (3 * (6 / 29) ** 2) + 4 / 29 for t in xyz]
    out[idx] = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
  return out


def smooth_random_image(seed, h=48, w=48):
  """Blobs with texture: edges of many directions and contrasts, plus flat-ish areas."""
  rng = np.random.default_rng(seed)
  coarse = rng.random((h // 8 + 1, w // 8 + 1, 3))
  image = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w]
  image = ndimage.gaussian_filter(image, (1.5, 1.5, 0)) + 0.03 * rng.standard_normal((h, w, 3))
  return np.clip(image, 0, 1).astype(np.float32)


def square_image(h=40, w=48, top=10, left=12, bottom=30, right=36, fg=0.9, bg=0.1):
  image = np.full((h, w, 3), bg, np.float32)
  image[top:bottom, left:right] = fg
  return image


def as_edges(x):
  x = np.asarray(x)
  assert x.dtype == np.float32 and x.shape[-1] == 1
  assert set(np.unique(x)) <= {0.0, 1.0}
  return x[..., 0] > 0.5


# ---------------------------------------------------------------------------------------------


def test_rgb_to_gray_matches_bt601():
  image = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
  np.testing.assert_allclose(aux_targets.rgb_to_gray(image).numpy(), np_gray(image), atol=1e-6)


def test_gaussian_kernel_radius_and_sum():
  kernel = aux_targets.gaussian_kernel_1d(1.0).numpy()
  assert kernel.shape == (7,)
  np.testing.assert_allclose(kernel.sum(), 1.0, atol=1e-6)
  np.testing.assert_allclose(kernel, kernel[::-1])
  assert aux_targets.gaussian_kernel_1d(1.4).shape == (11,)  # ceil(4.2) = 5


def test_sobel_of_ramp_is_eight_times_slope():
  ramp = np.tile(np.arange(10, dtype=np.float32) * 0.05, (6, 1))
  gy, gx = aux_targets.sobel_gradients(ramp)
  np.testing.assert_allclose(gx.numpy()[:, 1:-1], 0.4, atol=1e-6)
  np.testing.assert_allclose(gy.numpy(), 0.0, atol=1e-6)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_canny_matches_numpy_reference_on_random_images(seed):
  image = smooth_random_image(seed)
  expected, _ = np_canny(image)
  got = as_edges(aux_targets.canny_edges(image))
  assert expected.sum() > 50  # the images do have edges
  # float32 vs float64 can flip a pixel sitting exactly on a threshold or a tie; allow a few.
  assert np.mean(got != expected) < 0.005, (np.sum(got != expected), expected.sum())


def test_canny_matches_numpy_reference_on_square_exactly():
  image = square_image()
  expected, _ = np_canny(image)
  got = as_edges(aux_targets.canny_edges(image))
  np.testing.assert_array_equal(got, expected)


def test_canny_square_outline_is_one_pixel_thin():
  top, left, bottom, right = 10, 12, 30, 36
  edges = as_edges(aux_targets.canny_edges(square_image(top=top, left=left, bottom=bottom,
                                                         right=right)))
  # Every edge pixel touches the outline: within one pixel of the step between inside/outside.
  inside = np.zeros(edges.shape, bool)
  inside[top:bottom, left:right] = True
  ring = np.ones((3, 3), bool)
  band = ndimage.binary_dilation(inside, ring) & ~ndimage.binary_erosion(inside, ring)
  assert edges.sum() > 0
  assert not np.any(edges & ~band), 'edge pixel off the outline'
  # Away from the corners each side is exactly one pixel thick and unbroken.
  for r in range(top + 4, bottom - 4):
    assert edges[r, left - 1:left + 1].sum() == 1, r
    assert edges[r, right - 1:right + 1].sum() == 1, r
    assert edges[r].sum() == 2, r
  for c in range(left + 4, right - 4):
    assert edges[top - 1:top + 1, c].sum() == 1, c
    assert edges[bottom - 1:bottom + 1, c].sum() == 1, c
    assert edges[:, c].sum() == 2, c
  # The outline is closed (one 8-connected component, no interior or exterior edges).
  _, count = ndimage.label(edges, structure=np.ones((3, 3)))
  assert count == 1


def test_canny_ramp_below_high_threshold_has_no_edges():
  # Slope 1/63 per pixel -> Sobel magnitude 8/63 ~= 0.127: weak (>= 0.1) but never strong.
  ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32)[None, :, None], (32, 1, 3))
  assert not as_edges(aux_targets.canny_edges(ramp)).any()
  assert not as_edges(aux_targets.canny_edges(ramp, low=0.15, high=0.3)).any()
  # Absolute thresholds: the same ramp is an edge region once `high` is below its gradient.
  assert as_edges(aux_targets.canny_edges(ramp, low=0.05, high=0.1)).any()


def test_canny_flat_image_has_no_edges():
  assert not as_edges(aux_targets.canny_edges(np.full((16, 16, 3), 0.4, np.float32))).any()


def _step_image(contrast_top, contrast_bottom):
  """A vertical step edge down the middle whose contrast goes linearly from top to bottom."""
  image = np.full((48, 48, 3), 0.3, np.float32)
  contrast = np.linspace(contrast_top, contrast_bottom, 48, dtype=np.float32)
  image[:, 24:] += contrast[:, None, None]
  return image


def test_canny_hysteresis_keeps_connected_weak_and_drops_isolated_weak():
  # Contrast 0.05 gives a Sobel peak ~0.13 after the blur: weak (>= 0.1) but not strong (0.2).
  isolated = _step_image(0.05, 0.05)
  _, mag = np_canny(isolated)
  assert 0.1 <= mag[:, 20:28].max(axis=1).min() and mag[:, 20:28].max() < 0.2
  assert not as_edges(aux_targets.canny_edges(isolated)).any()
  # The same weak stretch at the bottom of an edge that is strong further up is kept.
  connected = _step_image(0.2, 0.05)
  expected, mag = np_canny(connected)
  weak_rows = np.nonzero(mag[:, 20:28].max(axis=1) < 0.2)[0]
  assert len(weak_rows) >= 5  # precondition: the bottom rows are weak only
  edges = as_edges(aux_targets.canny_edges(connected))
  np.testing.assert_array_equal(edges, expected)
  assert edges[:, 23:25].any(axis=1).all()  # one unbroken line from top to bottom
  assert edges[:, 23:25].sum() == 48 and edges.sum() == 48


def test_hysteresis_on_masks():
  weak = np.zeros((9, 12), bool)
  strong = np.zeros((9, 12), bool)
  weak[1, 1:6] = True  # a weak segment ...
  strong[2, 6] = True  # ... touching a strong pixel diagonally
  weak[6, 2:9] = True  # an isolated weak segment
  weak[3:8, 10] = True  # a vertical weak segment touching a strong one end-on
  strong[8, 10] = True
  out = aux_targets.hysteresis(tf.constant(strong), tf.constant(weak)).numpy()
  expected = strong.copy()
  expected[1, 1:6] = True
  expected[3:8, 10] = True
  np.testing.assert_array_equal(out, expected)


def test_hysteresis_long_serpentine_converges():
  # A snake through the whole image needs many iterations; the loop must still finish.
  weak = np.zeros((15, 15), bool)
  weak[::2, :] = True
  for k, r in enumerate(range(1, 15, 2)):
    weak[r, -1 if k % 2 == 0 else 0] = True
  strong = np.zeros_like(weak)
  strong[0, 0] = True
  out = aux_targets.hysteresis(tf.constant(strong), tf.constant(weak)).numpy()
  np.testing.assert_array_equal(out, weak)


def test_rgb_to_lab_known_values():
  colors = np.array([[[1, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]], np.float32)
  lab = aux_targets.rgb_to_lab(colors).numpy()[0]
  np.testing.assert_allclose(lab[0], [100, 0, 0], atol=0.01)
  np.testing.assert_allclose(lab[1], [0, 0, 0], atol=1e-4)
  np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.02)
  np.testing.assert_allclose(lab[3], [87.73, -86.18, 83.18], atol=0.02)
  np.testing.assert_allclose(lab[4], [32.30, 79.19, -107.86], atol=0.02)


def test_rgb_to_lab_matches_numpy_reference():
  rng = np.random.default_rng(3)
  image = rng.random((6, 8, 3)).astype(np.float32)
  image[0, :3] = [[0.01, 0.02, 0.03], [0.04045, 0.0, 0.005], [0.0, 0.001, 0.0]]  # linear parts
  np.testing.assert_allclose(aux_targets.rgb_to_lab(image).numpy(), np_lab(image), atol=2e-3)


def test_colorization_scaling():
  image = np.random.default_rng(4).random((8, 8, 3)).astype(np.float32)
  l_input, ab = aux_targets.colorization(image)
  assert l_input.shape == (8, 8, 1) and ab.shape == (8, 8, 2)
  assert l_input.dtype == tf.float32 and ab.dtype == tf.float32
  lab = np_lab(image)
  np.testing.assert_allclose(l_input.numpy()[..., 0], lab[..., 0] / 100, atol=2e-5)
  np.testing.assert_allclose(ab.numpy(), lab[..., 1:] / 128, atol=2e-5)
  assert 0 <= l_input.numpy().min() and l_input.numpy().max() <= 1
  assert np.abs(ab.numpy()).max() <= 1


def test_gaussian_noise_statistics_and_seeding():
  grey = np.full((64, 64, 3), 0.5, np.float32)
  seed = tf.constant([1, 2], tf.int32)
  noisy = aux_targets.add_gaussian_noise(grey, 25.0, seed).numpy()
  diff = noisy - grey
  assert abs(diff.mean()) < 0.003
  np.testing.assert_allclose(diff.std(), 25 / 255, rtol=0.03)
  np.testing.assert_array_equal(noisy, aux_targets.add_gaussian_noise(grey, 25.0, seed).numpy())
  np.testing.assert_array_equal(
      noisy, aux_targets.add_gaussian_noise(grey, 25.0, tf.constant([1, 2], tf.int64)).numpy())
  other = aux_targets.add_gaussian_noise(grey, 25.0, tf.constant([1, 3])).numpy()
  assert np.mean(other != noisy) > 0.99


def test_gaussian_noise_is_clipped():
  image = np.random.default_rng(5).random((32, 32, 3)).astype(np.float32)
  noisy = aux_targets.add_gaussian_noise(image, 80.0, tf.constant([7, 7])).numpy()
  assert noisy.min() >= 0.0 and noisy.max() <= 1.0
  assert (noisy == 0.0).any() and (noisy == 1.0).any()
  assert noisy.dtype == np.float32 and noisy.shape == image.shape


def _all_targets(image, seed):
  l_input, ab = aux_targets.colorization(image)
  return {
      'edges': aux_targets.canny_edges(image),
      'gray': aux_targets.rgb_to_gray(image),
      'lab': aux_targets.rgb_to_lab(image),
      'l': l_input,
      'ab': ab,
      'noisy': aux_targets.add_gaussian_noise(image, 15.0, seed),
  }


def test_graph_mode_and_tf_data_match_eager():
  images = np.stack([smooth_random_image(s, 32, 32) for s in range(4)])
  seeds = np.arange(8, dtype=np.int64).reshape(4, 2)
  eager = [_all_targets(tf.constant(images[k]), tf.constant(seeds[k])) for k in range(4)]

  graph_fn = tf.function(_all_targets)
  for k in range(4):
    graph = graph_fn(tf.constant(images[k]), tf.constant(seeds[k]))
    for key, value in eager[k].items():
      # Graph mode may fuse Lab's power functions differently: a few float32 ulps, amplified
      # by the a = 500 (fx - fy) difference; everything else agrees to round-off.
      atol = 1e-4 if key == 'lab' else 1e-6
      np.testing.assert_allclose(graph[key].numpy(), value.numpy(), atol=atol, err_msg=key)

  ds = tf.data.Dataset.from_tensor_slices((images, seeds))
  ds = ds.map(_all_targets, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for k, out in enumerate(ds):
    assert out['edges'].shape == (32, 32, 1)
    for key, value in eager[k].items():
      atol = 1e-4 if key == 'lab' else 1e-6
      np.testing.assert_allclose(out[key].numpy(), value.numpy(), atol=atol, err_msg=key)
