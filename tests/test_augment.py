"""Tests for mtan_jax.data.augment against PyTorch and the reference's RandomScaleCrop."""

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')

from mtan_jax.data import augment as aug  # pylint: disable=g-import-not-at-top

H, W = 48, 64  # crops: 1.2 -> 40 x 53, 1.5 -> 32 x 42


def make_example(seed=0, h=H, w=W):
  rng = np.random.default_rng(seed)
  normal = rng.standard_normal((h, w, 3)).astype(np.float32)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  depth = rng.uniform(0.5, 5.0, (h, w, 1)).astype(np.float32)
  depth[rng.random((h, w)) < 0.2] = 0.0  # invalid pixels
  return {
      'image': rng.random((h, w, 3)).astype(np.float32),
      'label': rng.integers(-1, 13, (h, w)).astype(np.int32),
      'depth': depth,
      'normal': normal,
  }


def to_tf(example):
  return {k: tf.constant(v) for k, v in example.items()}


def torch_reference(example, sc, i, j, flip):
  """The reference's RandomScaleCrop + flip (im2im_pred/create_dataset.py) with fixed draws."""
  torch = pytest.importorskip('torch')
  F = torch.nn.functional  # pylint: disable=invalid-name
  img = torch.from_numpy(np.moveaxis(example['image'], -1, 0))
  label = torch.from_numpy(example['label'].astype(np.float32))  # the reference's labels are float
  depth = torch.from_numpy(np.moveaxis(example['depth'], -1, 0))
  normal = torch.from_numpy(np.moveaxis(example['normal'], -1, 0))
  height, width = img.shape[-2:]
  h, w = int(height / sc), int(width / sc)
  img_ = F.interpolate(img[None, :, i:i + h, j:j + w], size=(height, width), mode='bilinear',
                       align_corners=True).squeeze(0)
  label_ = F.interpolate(label[None, None, i:i + h, j:j + w], size=(height, width),
                         mode='nearest').squeeze(0).squeeze(0)
  depth_ = F.interpolate(depth[None, :, i:i + h, j:j + w], size=(height, width),
                         mode='nearest').squeeze(0)
  normal_ = F.interpolate(normal[None, :, i:i + h, j:j + w], size=(height, width),
                          mode='bilinear', align_corners=True).squeeze(0)
  depth_ = depth_ / sc
  if flip:
    img_ = torch.flip(img_, dims=[2])
    label_ = torch.flip(label_, dims=[1])
    depth_ = torch.flip(depth_, dims=[2])
    normal_ = torch.flip(normal_, dims=[2])
    normal_[0, :, :] = -normal_[0, :, :]
  return {
      'image': np.moveaxis(img_.numpy(), 0, -1),
      'label': label_.numpy(),
      'depth': np.moveaxis(depth_.numpy(), 0, -1),
      'normal': np.moveaxis(normal_.numpy(), 0, -1),
  }


# ---------------------------------------------------------------------------------------------
# Resize primitives.


@pytest.mark.parametrize('in_hw,out_hw', [
    ((5, 7), (11, 13)), ((40, 53), (48, 64)), ((32, 42), (48, 64)), ((13, 9), (4, 3)),
    ((1, 5), (3, 7)), ((7, 7), (1, 1)), ((48, 64), (48, 64)), ((10, 17), (23, 31)),
])
def test_resize_primitives_match_torch(in_hw, out_hw):
  torch = pytest.importorskip('torch')
  F = torch.nn.functional  # pylint: disable=invalid-name
  rng = np.random.default_rng(sum(in_hw) + sum(out_hw))
  x = rng.standard_normal(in_hw + (3,)).astype(np.float32)
  t = torch.from_numpy(x).permute(2, 0, 1)[None]
  want_bilinear = F.interpolate(t, size=out_hw, mode='bilinear', align_corners=True)
  want_nearest = F.interpolate(t, size=out_hw, mode='nearest')
  got_bilinear = aug.resize_bilinear_align_corners(x, *out_hw)
  got_nearest = aug.resize_nearest_torch(x, *out_hw)
  assert got_bilinear.shape == out_hw + (3,) and got_nearest.shape == out_hw + (3,)
  np.testing.assert_allclose(got_bilinear.numpy(), want_bilinear[0].permute(1, 2, 0).numpy(),
                             atol=1e-6)
  np.testing.assert_array_equal(got_nearest.numpy(), want_nearest[0].permute(1, 2, 0).numpy())


def test_nearest_on_2d_int_keeps_values():
  x = np.random.default_rng(1).integers(-1, 5, (9, 11)).astype(np.int32)
  out = aug.resize_nearest_torch(x, 20, 13).numpy()
  assert out.dtype == np.int32 and out.shape == (20, 13)
  assert set(np.unique(out)) <= set(np.unique(x))


def test_nearest_index_matches_torch_float32_arithmetic_many_sizes():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional  # pylint: disable=invalid-name
  # Sweep the sizes where float32 in/out rounding could disagree with exact integer floor.
  for n_in in range(1, 60, 3):
    for n_out in (n_in + 1, 2 * n_in, 3 * n_in - 1, 97, 288, 384):
      src = torch.arange(n_in, dtype=torch.float32)[None, None, None]
      want = F.interpolate(src, size=(1, n_out), mode='nearest')[0, 0, 0].numpy()
      got = aug._nearest_axis(tf.constant(n_in), n_out).numpy()  # pylint: disable=protected-access
      np.testing.assert_array_equal(got, want.astype(np.int32), err_msg=f'{n_in}->{n_out}')


# ---------------------------------------------------------------------------------------------
# Fixed crops against the reference.


@pytest.mark.parametrize('sc,i,j,flip', [
    (1.0, 0, 0, False), (1.0, 0, 0, True), (1.2, 3, 7, True), (1.2, 8, 11, False),
    (1.5, 16, 22, False), (1.5, 0, 0, True), (1.5, 5, 13, True),
])
def test_fixed_crop_matches_torch_reference(sc, i, j, flip):
  example = make_example(int(sc * 10) + i + j)
  want = torch_reference(example, sc, i, j, flip)
  got = aug.augment_with_params(to_tf(example), sc, i, j, flip)
  np.testing.assert_allclose(got['image'].numpy(), want['image'], atol=1e-6)
  np.testing.assert_allclose(got['normal'].numpy(), want['normal'], atol=1e-6)
  np.testing.assert_allclose(got['depth'].numpy(), want['depth'], rtol=1e-6)
  np.testing.assert_array_equal(got['label'].numpy(), want['label'].astype(np.int32))
  for key, value in example.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape


def test_fixed_crop_with_tensor_params_matches_python_params():
  example = to_tf(make_example(3))
  a = aug.augment_with_params(example, 1.2, 5, 9, True)
  b = aug.augment_with_params(example, tf.constant(1.2, tf.float64), tf.constant(5),
                              tf.constant(9), tf.constant(True))
  for key in a:
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())


def test_crop_size_follows_reference_integer_arithmetic():
  assert aug.crop_size(288, 384, 1.2) == (int(288 / 1.2), int(384 / 1.2)) == (240, 320)
  assert aug.crop_size(288, 384, 1.5) == (192, 256)
  assert aug.crop_size(128, 256, 1.2) == (106, 213)
  # The in-graph crop size agrees with Python's int(H / sc) for awkward sizes too.
  for size in (7, 47, 48, 100, 128, 255, 288, 383):
    for sc in (1.0, 1.1, 1.2, 1.3, 1.5, 1.7):
      got = aug._crop_size_tensor(  # pylint: disable=protected-access
          size, tf.constant(sc, tf.float64))
      assert int(got) == int(size / sc), (size, sc)


# ---------------------------------------------------------------------------------------------
# Properties.


def test_depth_divided_by_scale_and_zero_stays_zero():
  depth = np.full((H, W, 1), 2.0, np.float32)
  depth[::3] = 0.0
  out = aug.augment_with_params({'depth': tf.constant(depth)}, 1.5, 4, 6, False)['depth'].numpy()
  assert set(np.unique(out)) == {0.0, np.float32(2.0) / np.float32(1.5)}


def test_normal_x_negated_on_flip_and_not_renormalised():
  example = to_tf(make_example(4))
  plain = aug.augment_with_params(example, 1.5, 7, 9, False)['normal'].numpy()
  flipped = aug.augment_with_params(example, 1.5, 7, 9, True)['normal'].numpy()
  np.testing.assert_array_equal(flipped[..., 0], -plain[:, ::-1, 0])
  np.testing.assert_array_equal(flipped[..., 1:], plain[:, ::-1, 1:])
  norms = np.linalg.norm(plain, axis=-1)
  assert norms.min() < 0.99  # bilinear mixing shortens unit vectors; the reference keeps that


def test_flip_mirrors_every_dense_key():
  example = to_tf(make_example(5))
  plain = aug.augment_with_params(example, 1.2, 2, 3, False)
  flipped = aug.augment_with_params(example, 1.2, 2, 3, True)
  for key in ('image', 'label', 'depth'):
    np.testing.assert_array_equal(flipped[key].numpy(), plain[key].numpy()[:, ::-1], err_msg=key)


def test_label_values_stay_in_original_set():
  example = to_tf(make_example(6))
  values = set(np.unique(example['label'].numpy()))
  for s in range(6):
    out = aug.augment(example, tf.constant([s, 1]))['label'].numpy()
    assert set(np.unique(out)) <= values


def _blob_box(label):
  rows, cols = np.nonzero(label)
  if rows.size == 0:
    return np.zeros(4, np.float32)
  return np.array([rows.min(), cols.min(), rows.max() + 1, cols.max() + 1], np.float32)


@pytest.mark.parametrize('blob', [(10, 20, 20, 35), (0, 0, 12, 9), (30, 50, 48, 64),
                                  (5, 40, 9, 44)])
def test_bbox_follows_the_object(blob):
  label = np.zeros((H, W), np.int32)
  label[blob[0]:blob[2], blob[1]:blob[3]] = 1
  box = _blob_box(label)
  np.testing.assert_array_equal(box, blob)
  example = {'label': tf.constant(label), 'bbox': tf.constant(box),
             'image': tf.zeros((H, W, 3))}
  for s in range(12):
    seed = tf.constant([s, 99])
    out = aug.augment(example, seed)
    moved = _blob_box(out['label'].numpy())
    got = out['bbox'].numpy()
    if not moved.any():
      np.testing.assert_array_equal(got, 0.0)  # the object left the crop: "no box"
      continue
    assert np.all(got >= 0) and got[2] <= H and got[3] <= W
    # The box encloses the moved blob to within a pixel on every side.
    assert np.all(np.abs(got - moved) <= 1.0), (s, aug.sample_params(seed, H, W), got, moved)


def test_bbox_leaving_the_crop_becomes_zero():
  box = tf.constant([0.0, 0.0, 3.0, 3.0])
  out = aug.transform_bbox(box, H, W, 1.5, 10, 12, False).numpy()
  np.testing.assert_array_equal(out, 0.0)
  out = aug.transform_bbox(box, H, W, 1.5, 0, 0, True).numpy()
  np.testing.assert_allclose(out, [0.0, W - 3 * W / 42, 3 * H / 32, W], rtol=1e-6)


def test_all_zero_bbox_stays_zero():
  example = {'image': tf.zeros((H, W, 3)), 'bbox': tf.zeros(4)}
  for s in range(6):
    np.testing.assert_array_equal(aug.augment(example, tf.constant([s, 0]))['bbox'].numpy(), 0.0)
  out = aug.augment_with_params(example, 1.5, 0, 0, True)['bbox'].numpy()
  np.testing.assert_array_equal(out, 0.0)


def test_same_seed_same_output_different_seeds_different_crops():
  example = to_tf(make_example(7))
  seed = tf.constant([3, 4], tf.int64)
  a = aug.augment(example, seed)
  b = aug.augment(example, tf.constant([3, 4], tf.int32))
  for key in a:
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
  params = set()
  images = []
  for s in range(10):
    p = aug.sample_params(tf.constant([s, 5]), H, W)
    params.add(tuple(float(v) for v in p))
    images.append(aug.augment(example, tf.constant([s, 5]))['image'].numpy())
  assert len(params) >= 7
  distinct = {img.tobytes() for img in images}
  assert len(distinct) >= 7


def test_sample_params_distribution():
  scales = (1.0, 1.2, 1.5)
  seeds = tf.data.Dataset.range(600).map(lambda s: tf.stack([s, s * 7 + 1]))
  ds = seeds.map(lambda s: aug.sample_params(s, H, W, scales), num_parallel_calls=2)
  draws = list(ds.batch(600).as_numpy_iterator())[0]
  sc, i, j, flip = (np.asarray(d) for d in draws)
  for s in scales:
    assert 0.25 < np.mean(sc == s) < 0.42, s
    h, w = aug.crop_size(H, W, s)
    sel = sc == s
    assert i[sel].min() == 0 and i[sel].max() == H - h
    assert j[sel].min() == 0 and j[sel].max() == W - w
  assert 0.43 < flip.mean() < 0.57
  _, _, _, no_flip = aug.sample_params(tf.constant([1, 2]), H, W, scales, flip=False)
  assert not bool(no_flip)


def test_identity_without_scale_or_flip():
  example = to_tf(make_example(8))
  example['bbox'] = tf.constant([3.0, 4.5, 20.0, 33.0])
  example['species'] = tf.constant(7)
  example['mask'] = tf.constant(1.0)
  for s in range(3):
    out = aug.augment(example, tf.constant([s, s]), scales=(1.0,), flip=False)
    for key, value in example.items():
      np.testing.assert_array_equal(out[key].numpy(), value.numpy(), err_msg=key)


def test_kinds_defaults_and_overrides():
  example = to_tf(make_example(9))
  example['feat'] = tf.constant(np.random.default_rng(0).random((H, W, 5)).astype(np.float32))
  example['instance'] = tf.constant(np.arange(H * W, dtype=np.int32).reshape(H, W))
  example['species'] = tf.constant(3)
  example['mask'] = tf.constant(1.0)
  example['inv_depth'] = example['depth']
  kinds = aug.resolve_kinds(example, {'inv_depth': 'depth'})
  assert kinds == {'image': 'image', 'label': 'label', 'depth': 'depth', 'normal': 'normal',
                   'feat': 'dense', 'instance': 'label', 'species': 'none', 'mask': 'none',
                   'inv_depth': 'depth'}
  out = aug.augment_with_params(example, 1.5, 3, 4, True, kinds={'inv_depth': 'depth'})
  np.testing.assert_array_equal(out['inv_depth'].numpy(), out['depth'].numpy())
  want_feat = aug.resize_bilinear_align_corners(example['feat'][3:3 + 32, 4:4 + 42], H, W)
  np.testing.assert_allclose(out['feat'].numpy(), want_feat.numpy()[:, ::-1], atol=1e-6)
  want_instance = aug.resize_nearest_torch(example['instance'][3:3 + 32, 4:4 + 42], H, W)
  np.testing.assert_array_equal(out['instance'].numpy(), want_instance.numpy()[:, ::-1])
  assert out['species'] is example['species'] and out['mask'] is example['mask']
  with pytest.raises(ValueError, match='kind'):
    aug.augment(example, tf.constant([0, 0]), kinds={'feat': 'bicubic'})
  with pytest.raises(ValueError, match='scales'):
    aug.augment(example, tf.constant([0, 0]), scales=(0.8, 1.0))


def test_runs_in_tf_data_map_and_tf_function():
  examples = [make_example(10 + k) for k in range(4)]
  stacked = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
  stacked['bbox'] = np.tile(np.array([[4.0, 6.0, 30.0, 40.0]], np.float32), (4, 1))
  stacked['species'] = np.arange(4, dtype=np.int32)
  seeds = np.arange(8, dtype=np.int64).reshape(4, 2) + 100

  ds = tf.data.Dataset.from_tensor_slices((stacked, seeds))
  ds = ds.map(aug.augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  assert ds.element_spec['image'].shape == (H, W, 3)
  assert ds.element_spec['label'].shape == (H, W) and ds.element_spec['label'].dtype == tf.int32
  graph_fn = tf.function(aug.augment)
  for k, out in enumerate(ds):
    example = {key: tf.constant(v[k]) for key, v in stacked.items()}
    eager = aug.augment(example, tf.constant(seeds[k]))
    graph = graph_fn(example, tf.constant(seeds[k]))
    # Bit-identical in every mode: the index arithmetic is immune to Grappler's rewrites.
    for key in eager:
      np.testing.assert_array_equal(out[key].numpy(), eager[key].numpy(), err_msg=key)
      np.testing.assert_array_equal(graph[key].numpy(), eager[key].numpy(), err_msg=key)
