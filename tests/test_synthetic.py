"""Tests for the procedural street scenes in `mtan_jax.data.synthetic`."""

import numpy as np
import pytest

from mtan_jax.data import synthetic
from mtan_jax.errors import ConfigError

SKY = synthetic.CLASS_NAMES.index('sky')
FLAT = synthetic.CLASS_NAMES.index('flat')
CONSTRUCTION = synthetic.CLASS_NAMES.index('construction')
# Classes drawn only as fronto-parallel shapes, each at one depth.
FRONTO = tuple(synthetic.CLASS_NAMES.index(n) for n in ('object', 'human', 'vehicle'))
NUM_SCENES = 20


@pytest.fixture(scope='module')
def scenes():
  return synthetic.render_scenes(range(NUM_SCENES), 64, 128)


def test_class_names():
  assert synthetic.NUM_CLASSES == 7
  assert synthetic.CLASS_NAMES == (
      'flat', 'construction', 'object', 'nature', 'sky', 'human', 'vehicle')


@pytest.mark.parametrize('height,width', [(32, 64), (64, 128), (96, 96)])
def test_shapes_dtypes_and_ranges(height, width):
  for index in range(3):
    scene = synthetic.render_scene(index, height, width)
    assert set(scene) == {'image', 'label', 'depth', 'normal'}
    assert scene['image'].shape == (height, width, 3)
    assert scene['label'].shape == (height, width)
    assert scene['depth'].shape == (height, width, 1)
    assert scene['normal'].shape == (height, width, 3)
    assert scene['image'].dtype == np.float32
    assert scene['label'].dtype == np.int32
    assert scene['depth'].dtype == np.float32
    assert scene['normal'].dtype == np.float32
    assert scene['image'].min() >= 0 and scene['image'].max() <= 1
    assert np.isin(scene['label'], np.arange(-1, synthetic.NUM_CLASSES)).all()
    assert scene['depth'].min() >= 0 and scene['depth'].max() <= 0.5
    assert all(np.isfinite(v).all() for v in scene.values())


def test_deterministic_and_index_dependent():
  a = synthetic.render_scene(5, 32, 64)
  b = synthetic.render_scene(5, 32, 64)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  c = synthetic.render_scene(6, 32, 64)
  d = synthetic.render_scene(5, 32, 64, seed=1)
  assert not np.array_equal(a['image'], c['image'])
  assert not np.array_equal(a['label'], c['label'])
  assert not np.array_equal(a['label'], d['label'])


def test_same_scene_at_two_resolutions():
  for index in range(5):
    small = synthetic.render_scene(index, 32, 64)['label']
    large = synthetic.render_scene(index, 64, 128)['label']
    # Compare each small pixel with the large pixel that covers its centre.
    assert (small == large[1::2, 1::2]).mean() > 0.85


def test_class_coverage(scenes):
  labels = scenes['label']
  assert set(np.unique(labels)) >= set(range(synthetic.NUM_CLASSES))
  for label in labels:
    present = np.unique(label)
    assert (present >= 0).sum() >= 3
  assert (labels == -1).any(), 'some scenes should have a void bonnet'


def test_void_pixels_are_a_bottom_strip(scenes):
  for label in scenes['label']:
    void = label == -1
    if void.any():
      rows = np.flatnonzero(void.any(axis=1))
      # The strip is contiguous down to the last row in every column it touches.
      assert rows.max() == label.shape[0] - 1
      first = np.argmax(void, axis=0)
      cols = void.any(axis=0)
      for col in np.flatnonzero(cols):
        assert void[first[col]:, col].all()


def test_depth_zero_exactly_on_sky_and_void(scenes):
  depth = scenes['depth'][..., 0]
  invalid = (scenes['label'] == SKY) | (scenes['label'] == -1)
  assert (depth[invalid] == 0).all()
  assert (depth[~invalid] > 0).all()


def test_normals_unit_where_valid_and_zero_elsewhere(scenes):
  valid = scenes['depth'][..., 0] > 0
  norms = np.linalg.norm(scenes['normal'], axis=-1)
  np.testing.assert_allclose(norms[valid], 1.0, atol=1e-4)
  assert (scenes['normal'][~valid] == 0).all()
  # Normals face the camera: no surface is seen from behind.
  assert (scenes['normal'][..., 2] <= 0).all()


def test_ground_plane_geometry(scenes):
  for label, depth, normal in zip(scenes['label'], scenes['depth'][..., 0], scenes['normal']):
    flat = label == FLAT
    np.testing.assert_array_equal(normal[flat], np.broadcast_to([0, -1, 0], normal[flat].shape))
    pairs = flat[1:] & flat[:-1] & (depth[1:] < 0.5)
    step = (depth[1:] - depth[:-1])[pairs]
    assert step.size > 0
    assert (step > 0).all()
    # Inverse depth of the ground ray is (v - v_horizon) / (f * h): linear in
    # the row, with one slope for the whole image.
    np.testing.assert_allclose(step, np.median(step), rtol=1e-3)


def test_walls_have_one_depth_per_column(scenes):
  found = False
  for label, depth, normal in zip(scenes['label'], scenes['depth'][..., 0], scenes['normal']):
    wall = (label == CONSTRUCTION) & (np.abs(normal[..., 0]) == 1)
    pairs = wall[1:] & wall[:-1] & (normal[1:, :, 0] == normal[:-1, :, 0])
    found |= pairs.any()
    np.testing.assert_array_equal(depth[1:][pairs], depth[:-1][pairs])
    # A left wall (normal +x) is seen left of centre, a right wall right of it.
    cols = np.arange(label.shape[1])[None, :].repeat(label.shape[0], 0)
    assert (cols[wall & (normal[..., 0] > 0)] < label.shape[1] / 2).all()
    assert (cols[wall & (normal[..., 0] < 0)] >= label.shape[1] / 2).all()
  assert found


def test_objects_are_fronto_parallel_with_one_depth(scenes):
  for label, depth, normal in zip(scenes['label'], scenes['depth'][..., 0], scenes['normal']):
    fronto = np.isin(label, FRONTO)
    np.testing.assert_array_equal(normal[fronto],
                                  np.broadcast_to([0, 0, -1], normal[fronto].shape))
    # Each object has a single depth, so the values form a few plateaus (a
    # scene holds at most a dozen such objects), and since depths are drawn
    # at random, one depth value belongs to one object and so to one class.
    values = np.unique(depth[fronto])
    assert values.size <= 16
    for value in values:
      assert np.unique(label[fronto & (depth == value)]).size == 1


def test_objects_stand_on_the_ground(scenes):
  touching = 0
  for label, depth in zip(scenes['label'], scenes['depth'][..., 0]):
    flat = label == FLAT
    ground_step = np.median((depth[1:] - depth[:-1])[flat[1:] & flat[:-1]])
    # Object pixel directly above a ground pixel: either the ground behind
    # the object shows under it (smaller inverse depth), or the object stands
    # on the ground there and its inverse depth lies within one ground row.
    above, below = depth[:-1], depth[1:]
    pair = np.isin(label[:-1], FRONTO) & flat[1:]
    front = pair & (below >= above)
    touching += front.sum()
    assert (above[front] >= below[front] - ground_step * (1 + 1e-3)).all()
  assert touching > 0


def test_colour_predicts_class(scenes):
  """A nearest-class-mean colour classifier beats chance by a wide margin."""
  test = synthetic.render_scenes(range(NUM_SCENES, NUM_SCENES + 10), 64, 128)
  x, y = scenes['image'].reshape(-1, 3), scenes['label'].reshape(-1)
  means = np.stack([x[y == c].mean(0) for c in range(synthetic.NUM_CLASSES)])
  xt, yt = test['image'].reshape(-1, 3), test['label'].reshape(-1)
  keep = yt >= 0
  xt, yt = xt[keep], yt[keep]
  pred = np.argmin(((xt[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
  recalls = [(pred[yt == c] == c).mean() for c in np.unique(yt)]
  chance = 1 / synthetic.NUM_CLASSES
  assert np.mean(recalls) > 3 * chance
  assert (pred == yt).mean() > 2.5 * chance


def test_render_scenes_stacks():
  stacked = synthetic.render_scenes([3, 1], 32, 64)
  assert stacked['image'].shape == (2, 32, 64, 3)
  assert stacked['label'].shape == (2, 32, 64)
  assert stacked['depth'].shape == (2, 32, 64, 1)
  assert stacked['normal'].shape == (2, 32, 64, 3)
  for i, index in enumerate([3, 1]):
    single = synthetic.render_scene(index, 32, 64)
    for key in single:
      np.testing.assert_array_equal(stacked[key][i], single[key])


@pytest.mark.parametrize('height,width', [(0, 64), (32, -1), (32.0, 64)])
def test_bad_sizes_raise(height, width):
  with pytest.raises(ConfigError):
    synthetic.render_scene(0, height, width)
