"""Tests for `mtan_jax.tasks`: losses, activations and `make_tasks`.

Losses are checked on 2x2 images whose values are written out by hand, and against the MTAN
reference's formulas (`im2im_pred/utils.py::model_fit`) re-implemented in PyTorch on random
data: `F.nll_loss(ignore_index=-1)` for semantics, and the masked L1 / dot-product losses with
the mask `sum(target over channels) != 0` for depth and normals.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax import tasks as T
from mtan_jax.errors import ConfigError


def mean_loss(task, pred, batch):
  total, count = task.loss(jnp.asarray(pred), {k: jnp.asarray(v) for k, v in batch.items()})
  return float(T.safe_mean(total, count)), float(total), float(count)


# ---------------------------------------------------------------------------------------------
# Hand-computed 2x2 cases (batch of one image).


def test_semantic_loss_by_hand():
  probs = np.array([[[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]],
                    [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]], np.float32)[None]
  # -1 is ignored, and so is 3 (>= the 3 classes); valid pixels pick 0.5 and 0.7.
  labels = np.array([[0, -1], [2, 3]], np.int32)[None]
  loss, total, count = mean_loss(T.Semantic(channels=3), np.log(probs), {'label': labels})
  assert count == 2
  assert total == pytest.approx(-(math.log(0.5) + math.log(0.7)), rel=1e-6)
  assert loss == pytest.approx(0.5249110, rel=1e-6)


def test_semantic_loss_all_pixels_valid_by_hand():
  probs = np.array([[[0.5, 0.5], [0.25, 0.75]],
                    [[0.9, 0.1], [0.2, 0.8]]], np.float32)[None]
  labels = np.array([[1, 1], [0, 0]], np.int32)[None]
  loss, _, count = mean_loss(T.Semantic(channels=2), np.log(probs), {'label': labels})
  assert count == 4
  assert loss == pytest.approx(-(math.log(0.5) + math.log(0.75) + math.log(0.9) + math.log(0.2)) / 4, rel=1e-6)


def test_depth_loss_by_hand():
  pred = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)[None, ..., None]
  # Zero targets are invalid: only (0, 1) and (1, 0) count: |2 - 2.5| + |3 - 1| = 2.5.
  target = np.array([[0.0, 2.5], [1.0, 0.0]], np.float32)[None, ..., None]
  loss, total, count = mean_loss(T.Depth(), pred, {'depth': target})
  assert (total, count) == (pytest.approx(2.5), 2)
  assert loss == pytest.approx(1.25)


def test_normal_loss_by_hand():
  target = np.array([[[0, 0, 1], [0, 0, 0]],
                     [[1, 0, 0], [0, 1, 0]]], np.float32)[None]
  pred = np.array([[[0, 0, 1], [1, 0, 0]],      # dot 1; (0, 1) is invalid
                   [[0, 1, 0], [0, 0.6, 0.8]]],  # dot 0; dot 0.6
                  np.float32)[None]
  loss, total, count = mean_loss(T.Normal(), pred, {'normal': target})
  assert count == 3
  # (sum, count) with sum = count - sum of dots, so sum / count = 1 - 1.6 / 3.
  assert total == pytest.approx(3 - 1.6, rel=1e-6)
  assert loss == pytest.approx(1 - 1.6 / 3, rel=1e-6)


def test_losses_add_up_over_batches():
  rng = np.random.default_rng(0)
  task = T.Depth()
  pred = rng.normal(size=(4, 2, 2, 1)).astype(np.float32)
  target = (rng.uniform(size=(4, 2, 2, 1)) * (rng.uniform(size=(4, 2, 2, 1)) > 0.4)).astype(np.float32)
  whole = task.loss(jnp.asarray(pred), {'depth': jnp.asarray(target)})
  halves = [task.loss(jnp.asarray(pred[s]), {'depth': jnp.asarray(target[s])}) for s in (slice(0, 2), slice(2, 4))]
  np.testing.assert_allclose(float(whole[0]), sum(float(h[0]) for h in halves), rtol=1e-6)
  assert float(whole[1]) == sum(float(h[1]) for h in halves)


@pytest.mark.parametrize('task, batch', [
    (T.Semantic(channels=3), {'label': np.full((1, 2, 2), -1, np.int32)}),
    (T.Semantic(channels=3), {'label': np.full((1, 2, 2), 7, np.int32)}),
    (T.Depth(), {'depth': np.zeros((1, 2, 2, 1), np.float32)}),
    (T.Normal(), {'normal': np.zeros((1, 2, 2, 3), np.float32)}),
])
def test_no_valid_pixel_gives_zero_loss(task, batch):
  pred = np.full((1, 2, 2, task.channels), 0.3, np.float32)
  loss, total, count = mean_loss(task, pred, batch)
  assert count == 0
  assert loss == 0.0 and not math.isnan(loss)
  assert total == 0.0


def test_safe_mean():
  assert float(T.safe_mean(jnp.float32(6.0), jnp.float32(3.0))) == 2.0
  assert float(T.safe_mean(jnp.float32(0.0), jnp.float32(0.0))) == 0.0
  # The gradient stays finite with no valid pixel: d(total / max(count, 1)) / d total = 1.
  assert float(jax.grad(lambda s: T.safe_mean(s, jnp.float32(0.0)))(jnp.float32(0.0))) == 1.0


def test_valid_pixels_rule():
  target = np.array([[[0, 0, 0], [0, 0, 2]], [[1, -1, 0], [-3, 0, 0]]], np.float32)[None]
  # The reference's rule: the channel sum is non-zero (so [1, -1, 0] counts as invalid).
  np.testing.assert_array_equal(np.asarray(T.valid_pixels(jnp.asarray(target))), [[[0, 1], [0, 1]]])


def test_semantic_loss_gradient_is_zero_at_ignored_pixels():
  labels = jnp.asarray(np.array([[0, -1], [2, 5]], np.int32)[None])
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 2, 3)).astype(np.float32))
  task = T.Semantic(channels=3)
  grad = jax.grad(lambda z: T.safe_mean(*task.loss(task.activate(z), {'label': labels})))(logits)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[0, 0, 1], 0.0)
  np.testing.assert_array_equal(grad[0, 1, 1], 0.0)
  assert np.abs(grad[0, 0, 0]).sum() > 0


# ---------------------------------------------------------------------------------------------
# Activations


def test_semantic_activation_is_log_softmax():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 4, 5)).astype(np.float32) * 10)
  out = T.Semantic(channels=5).activate(logits)
  np.testing.assert_allclose(np.asarray(jax.nn.logsumexp(out, axis=-1)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out - logits), np.asarray(out - logits)[..., :1] * np.ones(5), atol=1e-4)


def test_normal_activation_gives_unit_vectors():
  logits = np.random.default_rng(3).normal(size=(2, 3, 4, 3)).astype(np.float32) * [1, 5, 0.1]
  out = np.asarray(T.Normal().activate(jnp.asarray(logits)))
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(out, logits / np.linalg.norm(logits, axis=-1, keepdims=True), rtol=1e-6, atol=1e-7)
  # An exactly zero output stays finite (the reference would produce NaN).
  assert np.all(np.isfinite(np.asarray(T.Normal().activate(jnp.zeros((1, 1, 1, 3))))))


def test_depth_activation_is_identity():
  x = jnp.asarray([[[[-1.5], [2.0]]]])
  np.testing.assert_array_equal(np.asarray(T.Depth().activate(x)), np.asarray(x))


# ---------------------------------------------------------------------------------------------
# make_tasks


def test_make_tasks_keeps_order_and_sets_channels():
  tasks = T.make_tasks(('normal', 'semantic', 'depth'), 13)
  assert [t.name for t in tasks] == ['normal', 'semantic', 'depth']
  assert [t.channels for t in tasks] == [3, 13, 1]
  assert [t.target_key for t in tasks] == ['normal', 'label', 'depth']
  assert isinstance(tasks, tuple)


def test_make_tasks_accepts_comma_string():
  tasks = T.make_tasks('semantic, depth', 7)
  assert [t.name for t in tasks] == ['semantic', 'depth']
  assert tasks == T.make_tasks(['semantic', 'depth'], 7)


def test_make_tasks_num_classes_only_matters_for_semantic():
  assert T.make_tasks(('depth', 'normal'), 0) == (T.Depth(), T.Normal())


@pytest.mark.parametrize('names, num_classes, match', [
    (('semantic', 'optical_flow'), 7, 'optical_flow'),
    (('depth', 'depth'), 7, 'depth'),
    ((), 7, 'empty'),
    ('', 7, 'empty'),
    (('semantic',), 1, 'num_classes=1'),
])
def test_make_tasks_errors(names, num_classes, match):
  with pytest.raises(ConfigError, match=match) as info:
    T.make_tasks(names, num_classes)
  assert '\n' not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Against the reference's formulas in PyTorch.


@pytest.fixture(scope='module')
def torch():
  return pytest.importorskip('torch')


def _random_batch(seed, b=2, h=6, w=8, c=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, h, w, c)).astype(np.float32) * 3
  labels = rng.integers(-1, c, size=(b, h, w)).astype(np.int64)
  depth = rng.uniform(0.01, 1, size=(b, h, w, 1)).astype(np.float32) * (rng.uniform(size=(b, h, w, 1)) > 0.3)
  normal = rng.normal(size=(b, h, w, 3)).astype(np.float32)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  normal *= rng.uniform(size=(b, h, w, 1)) > 0.3
  return logits, labels, depth.astype(np.float32), normal.astype(np.float32)


def _nchw(torch, x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


@pytest.mark.parametrize('seed', [0, 1])
def test_losses_match_reference_formulas(torch, seed):
  F = torch.nn.functional
  logits, labels, depth, normal = _random_batch(seed)
  pred_depth = np.random.default_rng(seed + 10).normal(size=depth.shape).astype(np.float32)
  pred_normal = np.asarray(T.Normal().activate(jnp.asarray(np.random.default_rng(seed + 20).normal(size=normal.shape).astype(np.float32))))

  sem = T.Semantic(channels=5)
  ours = T.safe_mean(*sem.loss(sem.activate(jnp.asarray(logits)), {'label': jnp.asarray(labels, jnp.int32)}))
  ref = F.nll_loss(F.log_softmax(_nchw(torch, logits), dim=1), torch.from_numpy(labels), ignore_index=-1)
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5)

  def masked_reference(pred, target, kind):
    p, t = _nchw(torch, pred), _nchw(torch, target)
    mask = (torch.sum(t, dim=1) != 0).float().unsqueeze(1)
    count = torch.nonzero(mask, as_tuple=False).size(0)
    if kind == 'depth':
      return (torch.sum(torch.abs(p - t) * mask) / count).item()
    return (1 - torch.sum((p * t) * mask) / count).item()

  ours = T.safe_mean(*T.Depth().loss(jnp.asarray(pred_depth), {'depth': jnp.asarray(depth)}))
  np.testing.assert_allclose(float(ours), masked_reference(pred_depth, depth, 'depth'), rtol=1e-5)
  ours = T.safe_mean(*T.Normal().loss(jnp.asarray(pred_normal), {'normal': jnp.asarray(normal)}))
  np.testing.assert_allclose(float(ours), masked_reference(pred_normal, normal, 'normal'), rtol=1e-5)


def test_semantic_loss_gradient_matches_torch(torch):
  F = torch.nn.functional
  logits, labels, _, _ = _random_batch(3)
  sem = T.Semantic(channels=5)
  grad = jax.grad(lambda z: T.safe_mean(*sem.loss(sem.activate(z), {'label': jnp.asarray(labels, jnp.int32)})))(
      jnp.asarray(logits))
  z = _nchw(torch, logits).requires_grad_(True)
  F.nll_loss(F.log_softmax(z, dim=1), torch.from_numpy(labels), ignore_index=-1).backward()
  np.testing.assert_allclose(np.asarray(grad), np.moveaxis(z.grad.numpy(), 1, -1), rtol=1e-4, atol=1e-7)
