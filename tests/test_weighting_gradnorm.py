"""Tests for `mtan_jax.weighting.gradnorm`: GradNorm's weights and updates over several steps
against a NumPy loop (float64, hand-written Adam), positivity and sum T of the weights, L(0)
recorded on the first step, jit, T = 1 and hyper-parameter checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.gradnorm import GradNorm
from tests.weighting_reference import (NumpyAdam, assert_close, flatten, flatten_one,
                                       random_grads)


def np_gradnorm(flats, step_losses, alpha, lr):
  """Chen et al.'s GradNorm on flat (T, P) gradients; returns the weights used at each step
  (those before that step's update) and the final weights."""
  num_tasks = len(flats[0])
  w = np.ones(num_tasks)
  adam = NumpyAdam(lr)
  initial = None
  used = []
  for flat, losses in zip(flats, step_losses):
    norms = np.linalg.norm(flat, axis=1)
    if initial is None:
      initial = losses
    ratio = losses / initial
    rel_rate = ratio / ratio.mean()
    weighted = w * norms
    target = weighted.mean() * rel_rate ** alpha  # A constant in L_grad.
    grad = np.sign(weighted - target) * norms     # d/dw_t sum_k |w_k |g_k| - target_k|
    used.append(w.copy())
    w = adam.step(w, grad)
    w = np.maximum(w, 1e-4)
    w = num_tasks * w / w.sum()
  return used, w


@functools.lru_cache(maxsize=None)
def jitted(num_tasks, **hparams):
  return jax.jit(GradNorm(num_tasks, **hparams).combine)


def run_steps(num_tasks, steps, seed, **hparams):
  method = GradNorm(num_tasks, **hparams)
  state = method.init_state(None)
  rng = np.random.default_rng(seed)
  outputs, flats, step_losses = [], [], []
  for step in range(steps):
    grads = random_grads(100 * seed + step, num_tasks)
    losses = rng.uniform(0.5, 2.0, num_tasks).astype(np.float32)
    combined, w, state = jitted(num_tasks, **hparams)(grads, jnp.asarray(losses), state,
                                                      jax.random.key(step))
    outputs.append((flatten_one(combined), np.asarray(w, np.float64)))
    flats.append(flatten(grads))
    step_losses.append(losses.astype(np.float64))
  return method, state, outputs, flats, step_losses


@pytest.mark.parametrize('num_tasks,steps', [(2, 1), (3, 5), (4, 5)])
def test_matches_numpy(num_tasks, steps):
  method, state, outputs, flats, step_losses = run_steps(num_tasks, steps, seed=num_tasks)
  used, final = np_gradnorm(flats, step_losses, method.hp['alpha'], method.hp['lr'])
  for (combined, w), w_ref, flat in zip(outputs, used, flats):
    assert_close(w, w_ref)
    assert_close(combined, w_ref @ flat)
  assert_close(np.asarray(state['w']), final)
  np.testing.assert_allclose(np.asarray(state['initial_losses']), step_losses[0], rtol=1e-6)
  assert not np.allclose(final, 1.0)


def test_first_step_uses_equal_weights_and_records_initial_losses():
  _, state, outputs, _, step_losses = run_steps(3, 2, seed=0)
  np.testing.assert_array_equal(outputs[0][1], np.ones(3))
  assert int(state['started']) == 1
  np.testing.assert_allclose(np.asarray(state['initial_losses']), step_losses[0], rtol=1e-6)


def test_weights_stay_positive_and_sum_to_num_tasks():
  # A large learning rate makes Adam overshoot; the floor and renormalisation keep w valid.
  _, state, outputs, _, _ = run_steps(3, 12, seed=1, lr=1.0)
  for _, w in outputs + [(None, np.asarray(state['w']))]:
    assert (w > 0).all()
    np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-5)


def test_defaults():
  assert GradNorm(2).hp == {'alpha': 1.5, 'lr': 0.025}


def test_single_task_and_zero_gradient():
  _, state, outputs, _, _ = run_steps(1, 3, seed=2)
  for _, w in outputs:
    np.testing.assert_allclose(w, [1.0])
  grads = {k: v.at[0].set(0.0) for k, v in random_grads(3, 2).items()}
  method = GradNorm(2)
  state = method.init_state(None)
  for step in range(3):
    combined, w, state = jitted(2)(grads, jnp.asarray([1.0, 0.0]), state, jax.random.key(step))
    assert np.isfinite(flatten_one(combined)).all() and np.isfinite(np.asarray(w)).all()
    assert np.isfinite(np.asarray(state['w'])).all()


@pytest.mark.parametrize('hparams', [{'alpha': -1.0}, {'lr': 0.0}, {'gamma': 1.0}])
def test_bad_hyper_parameters(hparams):
  with pytest.raises(ConfigError):
    GradNorm(2, **hparams)
