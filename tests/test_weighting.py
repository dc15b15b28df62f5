"""Tests for `mtan_jax.weighting`: equal, DWA and uncertainty task weighting.

DWA is checked by simulating epochs with known per-step losses through `accumulate` and
`end_epoch` and comparing the weights with a NumPy evaluation of
lambda_k(t) = K exp(w_k(t-1)/T) / sum_i exp(w_i(t-1)/T), w_k(t-1) = L_k(t-1) / L_k(t-2),
with lambda = 1 for the first two epochs (as the reference's `index == 0 or index == 1`).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax import weighting as W
from mtan_jax.errors import ConfigError

T = 2.0


def run_epoch(method, state, step_losses, temperature=T):
  """Feeds one epoch's per-step losses (steps, K) and closes the epoch."""
  for losses in step_losses:
    state = W.accumulate(state, jnp.asarray(losses, jnp.float32))
  return W.end_epoch(method, state, temperature)


def np_dwa(prev2, prev1, temperature=T):
  w = np.asarray(prev1, np.float64) / np.asarray(prev2, np.float64)
  e = np.exp(w / temperature)
  return len(w) * e / e.sum()


def simulated_epochs(num_tasks, num_epochs=5, steps=3, seed=0):
  """Per-step losses (epochs, steps, K) with visibly different per-task trends."""
  rng = np.random.default_rng(seed)
  decay = np.linspace(0.5, 0.95, num_tasks)
  base = np.array([[2.0 * decay[k] ** e for k in range(num_tasks)] for e in range(num_epochs)])
  return (base[:, None, :] * rng.uniform(0.8, 1.2, size=(num_epochs, steps, num_tasks))).astype(np.float32)


def test_init_state():
  state = W.init_state(3)
  np.testing.assert_array_equal(np.asarray(state['weights']), np.ones(3))
  np.testing.assert_array_equal(np.asarray(state['loss_history']), np.zeros((2, 3)))
  assert int(state['epochs_done']) == 0 and int(state['epoch_steps']) == 0


def test_accumulate_sums_steps_and_end_epoch_averages():
  state = W.init_state(2)
  state = W.accumulate(state, jnp.asarray([1.0, 2.0]))
  state = W.accumulate(state, jnp.asarray([3.0, 6.0]))
  assert int(state['epoch_steps']) == 2
  np.testing.assert_allclose(np.asarray(state['epoch_loss_sum']), [4.0, 8.0])
  state = W.end_epoch('equal', state, T)
  np.testing.assert_allclose(np.asarray(state['loss_history']), [[0.0, 0.0], [2.0, 4.0]])
  np.testing.assert_array_equal(np.asarray(state['epoch_loss_sum']), [0.0, 0.0])
  assert int(state['epoch_steps']) == 0 and int(state['epochs_done']) == 1


@pytest.mark.parametrize('num_tasks', [2, 3])
def test_dwa_matches_formula(num_tasks):
  epochs = simulated_epochs(num_tasks)
  averages = epochs.astype(np.float64).mean(axis=1)
  state = W.init_state(num_tasks)
  # Epoch 0 trains with weights 1.
  np.testing.assert_array_equal(np.asarray(state['weights']), np.ones(num_tasks))
  for e in range(len(epochs)):
    state = run_epoch('dwa', state, epochs[e])
    weights = np.asarray(state['weights'])  # used during epoch e + 1
    if e + 1 < 2:
      np.testing.assert_array_equal(weights, np.ones(num_tasks))
    else:
      expected = np_dwa(averages[e - 1], averages[e])
      np.testing.assert_allclose(weights, expected, rtol=2e-6)
      assert weights.sum() == pytest.approx(num_tasks, rel=1e-6)
      # The task whose loss fell least gets the largest weight.
      assert np.argmax(weights) == np.argmax(averages[e] / averages[e - 1])
  np.testing.assert_allclose(np.asarray(state['loss_history']), averages[-2:], rtol=1e-6)


def test_dwa_by_hand():
  state = W.init_state(2)
  state = run_epoch('dwa', state, [[1.0, 1.0]])
  state = run_epoch('dwa', state, [[0.5, 1.0]])  # ratios 0.5 and 1.0
  e = np.exp(np.array([0.5, 1.0]) / 2)
  np.testing.assert_allclose(np.asarray(state['weights']), 2 * e / e.sum(), rtol=1e-6)
  # Equal ratios give equal weights.
  state = run_epoch('dwa', state, [[0.25, 0.5]])
  np.testing.assert_allclose(np.asarray(state['weights']), [1.0, 1.0], rtol=1e-6)


def test_dwa_temperature():
  epochs = simulated_epochs(3, num_epochs=3)
  averages = epochs.astype(np.float64).mean(axis=1)
  hot, cold = W.init_state(3), W.init_state(3)
  for e in range(3):
    hot = run_epoch('dwa', hot, epochs[e], temperature=100.0)
    cold = run_epoch('dwa', cold, epochs[e], temperature=0.5)
  np.testing.assert_allclose(np.asarray(hot['weights']), np_dwa(averages[1], averages[2], 100.0), rtol=2e-6)
  np.testing.assert_allclose(np.asarray(cold['weights']), np_dwa(averages[1], averages[2], 0.5), rtol=2e-6)
  assert np.ptp(np.asarray(hot['weights'])) < np.ptp(np.asarray(cold['weights']))


@pytest.mark.parametrize('method', ['equal', 'uncertainty'])
def test_non_dwa_methods_keep_unit_weights(method):
  state = W.init_state(3)
  for epoch in simulated_epochs(3):
    state = run_epoch(method, state, epoch)
    np.testing.assert_array_equal(np.asarray(state['weights']), np.ones(3))
  assert int(state['epochs_done']) == 5


def test_combine_equal_and_dwa_are_weighted_sums():
  losses = jnp.asarray([0.5, 2.0, 1.5])
  state = W.init_state(3)
  logsigma = jnp.asarray([0.3, -0.2, 0.1])
  assert float(W.combine('equal', losses, state, logsigma)) == pytest.approx(4.0)
  state = {**state, 'weights': jnp.asarray([0.5, 1.5, 1.0])}
  assert float(W.combine('dwa', losses, state, logsigma)) == pytest.approx(0.25 + 3.0 + 1.5)


def test_combine_uncertainty_formula():
  losses = np.array([0.5, 2.0, 1.5], np.float32)
  logsigma = np.array([0.3, -0.2, -0.5], np.float32)
  got = float(W.combine('uncertainty', jnp.asarray(losses), W.init_state(3), jnp.asarray(logsigma)))
  expected = np.sum(losses / (2 * np.exp(logsigma.astype(np.float64))) + logsigma / 2)
  assert got == pytest.approx(expected, rel=1e-6)


def test_combine_uncertainty_can_be_negative():
  losses = jnp.asarray([0.01, 0.02])
  logsigma = jnp.full((2,), -0.5)
  total = float(W.combine('uncertainty', losses, W.init_state(2), logsigma))
  assert total < 0
  assert total == pytest.approx(0.03 / (2 * np.exp(-0.5)) - 0.5, rel=1e-6)


def test_combine_uncertainty_gradients():
  losses = jnp.asarray([0.5, 2.0])
  logsigma = jnp.asarray([0.3, -0.2])
  g_loss, g_sigma = jax.grad(lambda l, s: W.combine('uncertainty', l, W.init_state(2), s), argnums=(0, 1))(
      losses, logsigma)
  s = np.asarray(logsigma, np.float64)
  np.testing.assert_allclose(np.asarray(g_loss), 1 / (2 * np.exp(s)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g_sigma), -np.asarray(losses) / (2 * np.exp(s)) + 0.5, rtol=1e-6)


@pytest.mark.parametrize('method', ['equal', 'dwa'])
def test_combine_gives_no_gradient_to_weights_or_logsigma(method):
  losses = jnp.asarray([0.5, 2.0, 1.5])
  state = {**W.init_state(3), 'weights': jnp.asarray([0.5, 1.5, 1.0])}
  logsigma = jnp.zeros(3)

  def total(weights, losses, logsigma):
    return W.combine(method, losses, {**state, 'weights': weights}, logsigma)

  g_w, g_l, g_s = jax.grad(total, argnums=(0, 1, 2))(state['weights'], losses, logsigma)
  np.testing.assert_array_equal(np.asarray(g_w), np.zeros(3))
  np.testing.assert_array_equal(np.asarray(g_s), np.zeros(3))
  np.testing.assert_allclose(np.asarray(g_l), [0.5, 1.5, 1.0])


def test_check_method():
  for method in W.METHODS:
    assert W.check_method(method) == method
  with pytest.raises(ConfigError, match='gradnorm2') as info:
    W.check_method('gradnorm2')
  assert '\n' not in str(info.value)


def test_end_epoch_jits_without_retracing():
  epochs = simulated_epochs(2, num_epochs=4)
  averages = epochs.astype(np.float64).mean(axis=1)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def close(state):
    return W.end_epoch('dwa', state, T)

  accumulate = jax.jit(W.accumulate)
  state = W.init_state(2)
  seen = []
  for epoch in epochs:
    for losses in epoch:
      state = accumulate(state, jnp.asarray(losses))
    state = close(state)
    seen.append(np.asarray(state['weights']))
  assert close._cache_size() == 1
  assert accumulate._cache_size() == 1
  # Weights changed between epochs without a new trace, and equal the eager results.
  assert not np.allclose(seen[2], seen[3])
  np.testing.assert_allclose(seen[3], np_dwa(averages[2], averages[3]), rtol=2e-6)


def test_end_epoch_under_jit_with_static_method():
  close = jax.jit(functools.partial(W.end_epoch, 'dwa', temperature=T))
  state = W.init_state(3)
  eager = W.init_state(3)
  for epoch in simulated_epochs(3, num_epochs=3):
    for losses in epoch:
      state = W.accumulate(state, jnp.asarray(losses))
      eager = W.accumulate(eager, jnp.asarray(losses))
    state, eager = close(state), W.end_epoch('dwa', eager, T)
  chex.assert_trees_all_close(state, eager, rtol=1e-6)
  assert close._cache_size() == 1


def test_fixed_weights_are_constant_and_checked():
  w = W.check_weights('fixed', (0.7, 0.1, 0.2), ('semantic', 'species', 'bbox'))
  state = W.init_state(3, w)
  losses = jnp.array([1.0, 2.0, 3.0])
  assert float(W.combine('fixed', losses, state, jnp.zeros(3))) == pytest.approx(0.7 + 0.2 + 0.6)
  for _ in range(3):
    state = W.end_epoch('fixed', W.accumulate(state, losses), 2.0)
  np.testing.assert_allclose(state['weights'], [0.7, 0.1, 0.2], rtol=1e-6)
  assert W.check_weights('dwa', (), ('a', 'b')) is None
  for method, weights, match in [('fixed', (1.0,), 'one weight per task'),
                                 ('fixed', (1.0, -1.0), 'non-negative'),
                                 ('fixed', (0.0, 0.0), 'not all 0'),
                                 ('dwa', (1.0, 2.0), 'only used with config.weighting=fixed')]:
    with pytest.raises(ConfigError, match=match):
      W.check_weights(method, weights, ('a', 'b'))
