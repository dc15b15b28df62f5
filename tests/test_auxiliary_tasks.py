"""Self-supervised tasks (edges, colorization, denoising): losses and metrics against NumPy."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax import auxiliary_tasks
from mtan_jax.tasks import make_tasks


def _stats(task, pred, target, mask):
  stats = task.stats(jnp.asarray(pred), {task.target_key: target}, np.asarray(mask, np.float32))
  return task.finalize({k: np.asarray(v) for k, v in stats.items()})


def test_registry_builds_the_self_supervised_tasks():
  tasks = make_tasks(('semantic', 'edges', 'colorization', 'denoising'), 7)
  assert [t.target_key for t in tasks] == ['label', 'edges', 'ab', 'clean']
  assert [t.self_supervised for t in tasks] == [False, True, True, True]
  assert [t.target_spec(4, 6)[0] for t in tasks[1:]] == [(4, 6, 1), (4, 6, 2), (4, 6, 3)]


def test_edges_l1_and_f1():
  rng = np.random.default_rng(0)
  task = auxiliary_tasks.Edges()
  pred = np.asarray(task.activate(jnp.asarray(rng.normal(size=(3, 4, 5, 1)), jnp.float32)))
  target = (rng.uniform(size=(3, 4, 5, 1)) > 0.7).astype(np.float32)
  total, count = task.loss(jnp.asarray(pred), {'edges': target})
  assert float(total) / float(count) == pytest.approx(np.mean(np.abs(pred - target)), rel=1e-5)
  out = _stats(task, pred, target, [1, 1, 0])  # third image is padding
  p, t = pred[:2] >= 0.5, target[:2] >= 0.5
  assert out['l1'] == pytest.approx(np.mean(np.abs(pred[:2] - target[:2])), rel=1e-5)
  assert out['f1'] == pytest.approx(2 * np.sum(p & t) / (p.sum() + t.sum()), rel=1e-6)


def test_colorization_l1_in_lab_units():
  rng = np.random.default_rng(1)
  task = auxiliary_tasks.Colorization()
  pred, target = rng.normal(size=(2, 4, 4, 2)).astype(np.float32), rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
  out = _stats(task, pred, target, [1, 1])
  assert out['loss'] == pytest.approx(np.mean(np.abs(pred - target)), rel=1e-5)
  assert out['l1'] == pytest.approx(128 * out['loss'], rel=1e-6)


def test_denoising_mse_and_psnr():
  rng = np.random.default_rng(2)
  task = auxiliary_tasks.Denoising()
  target = rng.uniform(size=(2, 4, 4, 3)).astype(np.float32)
  pred = target + 0.1
  total, count = task.loss(jnp.asarray(pred), {'clean': target})
  assert float(total) / float(count) == pytest.approx(0.01, rel=1e-4)
  out = _stats(task, pred, target, [1, 0])
  assert out['mse'] == pytest.approx(0.01, rel=1e-4)
  assert out['psnr'] == pytest.approx(20.0, rel=1e-4)
  assert math.isinf(_stats(task, target, target, [1, 1])['psnr'])
