"""Tests for `mtan_jax.weighting.db_mtl`: DB-MTL's update and buffer over several steps
against NumPy (LibMTL's schedule), equal norms of the balanced buffers, jit, T = 1 and
hyper-parameter checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.db_mtl import DBMTL
from tests.weighting_reference import (assert_close, flatten, flatten_one, random_grads,
                                       shared_shapes)


def np_db_mtl(flats, step_losses, beta, beta_sigma):
  """LibMTL's DB_MTL.backward on flat (T, P) gradients of L_t; returns updates and buffer."""
  buffer = np.zeros_like(flats[0])
  updates = []
  for step, (flat, losses) in enumerate(zip(flats, step_losses), start=1):
    log_grads = flat / (losses[:, None] + 1e-8)  # d log(L_t + 1e-8) = g_t / (L_t + 1e-8)
    buffer = log_grads + (beta / step ** beta_sigma) * (buffer - log_grads)
    norms = np.linalg.norm(buffer, axis=1)
    alpha = norms.max() / (norms + 1e-8)
    updates.append(sum(alpha[i] * buffer[i] for i in range(len(buffer))))
  return updates, buffer


@functools.lru_cache(maxsize=None)
def jitted(num_tasks, **hparams):
  return jax.jit(DBMTL(num_tasks, **hparams).combine)


def run_steps(num_tasks, steps, seed, **hparams):
  method = DBMTL(num_tasks, **hparams)
  state = method.init_state(shared_shapes(random_grads(0, num_tasks)))
  rng = np.random.default_rng(seed)
  outputs, flats, step_losses = [], [], []
  for step in range(steps):
    grads = random_grads(100 * seed + step, num_tasks)
    losses = rng.uniform(0.1, 3.0, num_tasks).astype(np.float32)
    combined, w, state = jitted(num_tasks, **hparams)(grads, jnp.asarray(losses), state,
                                                      jax.random.key(step))
    outputs.append((flatten_one(combined), np.asarray(w, np.float64)))
    flats.append(flatten(grads))
    step_losses.append(losses.astype(np.float64))
  return method, state, outputs, flats, step_losses


@pytest.mark.parametrize('num_tasks', [2, 3, 4])
def test_matches_numpy_over_steps(num_tasks):
  method, state, outputs, flats, step_losses = run_steps(num_tasks, 5, seed=num_tasks)
  updates, buffer = np_db_mtl(flats, step_losses, method.hp['beta'], method.hp['beta_sigma'])
  for (combined, _), expected in zip(outputs, updates):
    assert_close(combined, expected)
  assert_close(flatten(state['buffer']), buffer)
  assert int(state['step']) == 5


def test_init_state_shapes_and_defaults():
  grads = random_grads(0, 3)
  state = DBMTL(3).init_state(shared_shapes(grads))
  assert jax.tree.structure(state['buffer']) == jax.tree.structure(grads)
  for b, g in zip(jax.tree.leaves(state['buffer']), jax.tree.leaves(grads)):
    assert b.shape == g.shape and b.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(b), 0.0)
  assert DBMTL(2).hp == {'beta': 0.9, 'beta_sigma': 0.5}


def test_balanced_buffers_have_equal_norms():
  """alpha_t |buf_t| is the largest buffer norm for every t (the weights are the alphas)."""
  _, state, outputs, _, _ = run_steps(4, 3, seed=7)
  alpha = outputs[-1][1]
  norms = np.linalg.norm(flatten(state['buffer']), axis=1)
  np.testing.assert_allclose(alpha * norms, norms.max(), rtol=1e-5)
  assert alpha.min() == pytest.approx(1.0, rel=1e-6)


def test_single_task_and_zero_gradient():
  _, state, outputs, flats, step_losses = run_steps(1, 3, seed=1)
  np.testing.assert_allclose(outputs[-1][1], [1.0], rtol=1e-6)
  grads = {k: v.at[1].set(0.0) for k, v in random_grads(2, 2).items()}
  method = DBMTL(2)
  state = method.init_state(shared_shapes(grads))
  for step in range(3):
    combined, w, state = jitted(2)(grads, jnp.asarray([1.0, 0.0]), state, jax.random.key(step))
    assert np.isfinite(flatten_one(combined)).all() and np.isfinite(np.asarray(w)).all()


@pytest.mark.parametrize('hparams', [{'beta': 1.0}, {'beta': -0.1}, {'beta_sigma': -1.0}])
def test_bad_hyper_parameters(hparams):
  with pytest.raises(ConfigError, match='db_mtl.beta'):
    DBMTL(2, **hparams)
