"""Tests for `mtan_jax.weighting.pcgrad`: PCGrad in Gram form against a plain NumPy loop
over the flat gradients (same task orders), its projection properties, jit and T = 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.pcgrad import PCGrad, surgery_coefficients, surgery_orders
from tests.weighting_reference import assert_close, flatten, flatten_one, random_grads


def np_pcgrad(flat, orders):
  """Yu et al.'s surgery on (T, P) float64 gradients; returns the projected g_i' (T, P)."""
  projected = flat.copy()
  for i in range(len(flat)):
    for j in orders[i]:
      if j == i:
        continue
      dot = projected[i] @ flat[j]
      if dot < 0:
        projected[i] -= dot / (flat[j] @ flat[j]) * flat[j]
  return projected


# Eager jax.random calls compile op by op; one jit is quicker.
orders_of = jax.jit(surgery_orders, static_argnums=1)


@functools.lru_cache(maxsize=None)
def jitted_combine(num_tasks):
  return jax.jit(PCGrad(num_tasks).combine)


def run(num_tasks, seed, conflict=True):
  grads = random_grads(seed, num_tasks, conflict)
  key = jax.random.key(seed)
  combined, w, _ = jitted_combine(num_tasks)(grads, jnp.ones(num_tasks), {}, key)
  orders = np.asarray(orders_of(key, num_tasks))
  return grads, combined, w, orders


@pytest.mark.parametrize('num_tasks', [2, 3, 4])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_matches_numpy(num_tasks, seed):
  grads, combined, _, orders = run(num_tasks, seed)
  flat = flatten(grads)
  assert (flat @ flat.T < 0).any(), 'the test case should contain a conflict'
  assert_close(flatten_one(combined), np_pcgrad(flat, orders).sum(0))


def test_orders_are_permutations_and_depend_on_key():
  a = np.asarray(orders_of(jax.random.key(0), 4))
  b = np.asarray(orders_of(jax.random.key(1), 4))
  for row in a:
    assert sorted(row) == [0, 1, 2, 3]
  assert not np.array_equal(a, b)


@pytest.mark.parametrize('seed', range(3))
def test_two_tasks_conflict_removed(seed):
  grads, combined, w, _ = run(2, seed)
  flat = flatten(grads)
  assert flat[0] @ flat[1] < 0
  projected = np_pcgrad(flat, [[0, 1], [1, 0]])
  # For T = 2 each g_i' ends exactly orthogonal to the other gradient (no conflict left) ...
  np.testing.assert_allclose(projected[0] @ flat[1], 0.0, atol=1e-9)
  np.testing.assert_allclose(projected[1] @ flat[0], 0.0, atol=1e-9)
  # ... and the Gram-form weights reproduce g_1' + g_2' = (1 - d/|g_1|^2) g_1 + (1 - d/|g_2|^2) g_2.
  dot = flat[0] @ flat[1]
  expected_w = [1 - dot / (flat[0] @ flat[0]), 1 - dot / (flat[1] @ flat[1])]
  assert_close(np.asarray(w), expected_w)
  assert_close(flatten_one(combined), projected.sum(0))


@pytest.mark.parametrize('num_tasks', [2, 3, 4])
def test_coefficients_give_projected_gradients(num_tasks):
  """C from the Gram matrix reproduces each g_i' (C_i . g), and each g_i' has no conflict
  with the last task it was projected against (for T = 2: g_1'.g_2 = 0 exactly when the
  pair conflicted)."""
  coefficients = jax.jit(surgery_coefficients)
  for seed in range(3):
    flat = flatten(random_grads(seed, num_tasks))
    orders = np.asarray(orders_of(jax.random.key(seed), num_tasks))
    c = np.asarray(coefficients(jnp.asarray(flat @ flat.T, jnp.float32), jnp.asarray(orders)))
    projected = c @ flat
    assert_close(projected, np_pcgrad(flat, orders), rtol=1e-5)
    for i in range(num_tasks):
      last = [j for j in orders[i] if j != i][-1]
      assert projected[i] @ flat[last] >= -1e-5 * np.linalg.norm(flat[last]) ** 2


@pytest.mark.parametrize('num_tasks', [2, 3, 4])
def test_no_conflict_is_plain_sum(num_tasks):
  grads, combined, w, _ = run(num_tasks, 7, conflict=False)
  flat = flatten(grads)
  assert (flat @ flat.T > 0).all()
  np.testing.assert_allclose(np.asarray(w), np.ones(num_tasks))
  assert_close(flatten_one(combined), flat.sum(0))


def test_single_task_and_zero_gradient():
  grads = random_grads(0, 1)
  combined, w, _ = jitted_combine(1)(grads, jnp.ones(1), {}, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), [1.0])
  assert_close(flatten_one(combined), flatten(grads)[0])
  zero = {k: v.at[1].set(0.0) for k, v in random_grads(1, 3).items()}
  _, w, _ = jitted_combine(3)(zero, jnp.ones(3), {}, jax.random.key(1))
  assert np.isfinite(np.asarray(w)).all()


def test_jit_steps_and_bad_hyper_parameter():
  state = PCGrad(3).init_state(None)
  step = jitted_combine(3)
  for s in range(3):
    combined, w, state = step(random_grads(s, 3), jnp.ones(3), state, jax.random.key(s))
    assert np.isfinite(flatten_one(combined)).all() and np.isfinite(np.asarray(w)).all()
  with pytest.raises(ConfigError):
    PCGrad(3, beta=0.5)
