"""Image-level tasks (species, bbox): losses and metrics against NumPy, padding and missing boxes."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax import image_tasks
from mtan_jax.tasks import make_tasks


def _finalize(task, pred, batch, mask):
  return task.finalize({k: np.asarray(v) for k, v in task.stats(pred, batch, mask).items()})


def test_species_loss_and_accuracy():
  task = image_tasks.Species()
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [0.5, 0.2]], np.float32)
  labels = np.array([0, 0, 1, -1], np.int32)  # -1 ignored
  pred = task.activate(jnp.asarray(logits))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  total, count = task.loss(pred, {'species': labels})
  expected = -(logp[0, 0] + logp[1, 0] + logp[2, 1])
  assert float(count) == 3 and float(total) == pytest.approx(expected, rel=1e-6)
  # The fourth row is padding in evaluation: ignored even with a real label.
  out = _finalize(task, pred, {'species': np.array([0, 0, 1, 1], np.int32)}, np.array([1, 1, 1, 0]))
  assert out['acc'] == pytest.approx(1 / 3) and out['loss'] == pytest.approx(expected / 3, rel=1e-6)
  assert task.target_spec(8, 8) == ((), np.int32)


def test_bbox_predictions_loss_and_metrics_in_pixels():
  (task,) = make_tasks(('bbox',), 2, image_size=(100, 200))
  sides = np.array([100, 200, 100, 200], np.float32)
  logits = np.array([[0.0, 0.0, 1.0, 1.0], [-1.0, 0.5, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
  pred = np.asarray(task.activate(jnp.asarray(logits)))
  np.testing.assert_allclose(pred, sides / (1 + np.exp(-logits)), rtol=1e-6)
  target = np.array([[40, 80, 70, 150], [10, 100, 90, 190], [0, 0, 0, 0]], np.float32)  # last: no box
  total, count = task.loss(jnp.asarray(pred), {'bbox': target})
  err = (pred[:2] - target[:2]) / sides
  assert float(count) == 2
  assert float(total) == pytest.approx(np.sum(np.mean(err ** 2, axis=1)), rel=1e-5)

  out = _finalize(task, jnp.asarray(pred), {'bbox': target}, np.array([1, 1, 1]))
  d = pred[:2] - target[:2]
  assert out['mse_px'] == pytest.approx(np.mean(d ** 2), rel=1e-5)
  assert out['l2_px'] == pytest.approx(np.mean(np.linalg.norm(d, axis=1)), rel=1e-5)

  def iou(a, b):
    ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union
  assert out['iou'] == pytest.approx(np.mean([iou(pred[i], target[i]) for i in range(2)]), rel=1e-5)


def test_box_iou_edge_cases():
  a = jnp.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
  b = jnp.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(image_tasks.box_iou(a, b), [1.0, 0.0, 0.0])


def test_no_valid_box_gives_nan_metrics_not_errors():
  (task,) = make_tasks(('bbox',), 2, image_size=(32, 32))
  out = _finalize(task, jnp.ones((2, 4)), {'bbox': np.zeros((2, 4), np.float32)}, np.ones(2))
  assert all(np.isnan(out[k]) for k in task.metric_names)
