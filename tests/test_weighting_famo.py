"""Tests for `mtan_jax.weighting.famo`: FAMO's total, its gradient with respect to the losses
and the logits over several steps against NumPy (softmax Jacobian and torch-style Adam with L2
weight decay written out), the effective weights summing to 1, the slower task gaining
weight, jit, T = 1 and hyper-parameter checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.famo import FAMO
from tests.weighting_reference import NumpyAdam, assert_close


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def np_famo(step_losses, w_lr, gamma):
  """Per step: (total, d total / d L, logits used) of Liu et al.'s FAMO, with the logits
  updated from the previous step's losses before weighting this step's."""
  logits = np.zeros(len(step_losses[0]))
  adam = NumpyAdam(w_lr, weight_decay=gamma)
  prev = None
  out = []
  for losses in step_losses:
    if prev is not None:
      delta = np.log(prev + 1e-8) - np.log(losses + 1e-8)
      z = np_softmax(logits)
      jacobian = np.diag(z) - np.outer(z, z)  # d softmax / d logits (symmetric)
      logits = adam.step(logits, jacobian.T @ delta)
    z = np_softmax(logits)
    d = losses + 1e-8
    c = (z / d).sum()
    out.append(((z * np.log(d)).sum() / c, z / (c * d), logits.copy()))
    prev = losses
  return out


@functools.lru_cache(maxsize=None)
def jitted(num_tasks, **hparams):
  method = FAMO(num_tasks, **hparams)

  def step(losses, state):
    def total(l):
      return method.loss(l, jnp.ones_like(l), state, jax.random.key(0), jnp.zeros_like(l))
    (value, new_state), grad = jax.value_and_grad(total, has_aux=True)(losses)
    return value, grad, new_state

  return jax.jit(step)


def run_steps(step_losses, **hparams):
  num_tasks = len(step_losses[0])
  state = FAMO(num_tasks, **hparams).init_state(None)
  out = []
  for losses in step_losses:
    value, grad, state = jitted(num_tasks, **hparams)(jnp.asarray(losses, jnp.float32), state)
    out.append((float(value), np.asarray(grad, np.float64), np.asarray(state['logits'])))
  return out, state


def decreasing_losses(num_tasks, steps, seed):
  rng = np.random.default_rng(seed)
  rates = rng.uniform(0.7, 0.99, num_tasks)
  noise = rng.uniform(0.9, 1.1, (steps, num_tasks))
  return (rng.uniform(0.5, 3.0, num_tasks) * rates ** np.arange(steps)[:, None] * noise)


@pytest.mark.parametrize('num_tasks', [2, 3, 5])
@pytest.mark.parametrize('hparams', [{}, {'w_lr': 0.1, 'gamma': 0.01}])
def test_matches_numpy_over_steps(num_tasks, hparams):
  step_losses = decreasing_losses(num_tasks, 6, seed=num_tasks)
  step_losses = step_losses.astype(np.float32).astype(np.float64)
  method = FAMO(num_tasks, **hparams)
  expected = np_famo(step_losses, method.hp['w_lr'], method.hp['gamma'])
  actual, state = run_steps(step_losses, **hparams)
  for (value, grad, logits), (value_ref, grad_ref, logits_ref) in zip(actual, expected):
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    assert_close(grad, grad_ref, rtol=1e-5)
    np.testing.assert_allclose(logits, logits_ref, atol=1e-5)  # float32 Adam vs float64.
  assert np.abs(expected[-1][2]).max() > 1e-3  # The logits did move.
  np.testing.assert_allclose(np.asarray(state['prev_losses']), step_losses[-1], rtol=1e-6)


def test_effective_weights_sum_to_one_and_first_step_is_equal():
  actual, _ = run_steps(decreasing_losses(3, 4, seed=0))
  for _, grad, _ in actual:
    np.testing.assert_allclose(grad.sum(), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(actual[0][2], 0.0)  # No previous loss on step 1.


def test_slowest_task_gains_weight():
  # Task 0's loss stays, tasks 1 and 2 halve: task 0's logit must grow the most.
  losses = np.array([[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [1.0, 0.25, 0.25]])
  actual, _ = run_steps(losses)
  logits = actual[-1][2]
  assert logits[0] > logits[1] and logits[0] > logits[2]


def test_defaults_single_task_and_zero_loss():
  assert FAMO(2).hp == {'w_lr': 0.025, 'gamma': 0.001}
  actual, _ = run_steps(np.array([[1.0], [0.5], [0.2]]))
  for _, grad, _ in actual:
    np.testing.assert_allclose(grad, [1.0], rtol=1e-5)  # T = 1: total = L (weights 1).
  actual, state = run_steps(np.array([[1.0, 0.0], [0.5, 0.0], [0.2, 1e-3]]))
  for value, grad, logits in actual:
    assert np.isfinite(value) and np.isfinite(grad).all() and np.isfinite(logits).all()


@pytest.mark.parametrize('hparams', [{'w_lr': 0.0}, {'gamma': -1.0}, {'beta': 0.5}])
def test_bad_hyper_parameters(hparams):
  with pytest.raises(ConfigError):
    FAMO(2, **hparams)
