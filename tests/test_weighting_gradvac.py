"""Tests for `mtan_jax.weighting.gradvac`: GradVac in Gram form against a NumPy loop over
the flat gradients (same task orders, rho_T threaded over several steps), the target-cosine
property, its reduction to PCGrad at rho_T = 0, jit, T = 1 and hyper-parameter checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.gradvac import GradVac
from mtan_jax.weighting.pcgrad import PCGrad, surgery_orders
from tests.weighting_reference import assert_close, flatten, flatten_one, random_grads


def np_gradvac(flat, orders, rho_target, beta):
  """Algorithm 1 of Wang et al. with LibMTL's formula, float64; returns (update, rho_T)."""
  rho_target = np.array(rho_target, np.float64)
  projected = flat.copy()
  for i in range(len(flat)):
    for j in orders[i]:
      if j == i:
        continue
      norm_i, norm_j = np.linalg.norm(projected[i]), np.linalg.norm(flat[j])
      rho = projected[i] @ flat[j] / (norm_i * norm_j + 1e-8)
      target = rho_target[i, j]
      if rho < target:
        w = norm_i * (target * np.sqrt(1 - rho ** 2) - rho * np.sqrt(1 - target ** 2)) / (
            norm_j * np.sqrt(1 - target ** 2) + 1e-8)
        projected[i] = projected[i] + w * flat[j]
      rho_target[i, j] = (1 - beta) * target + beta * rho
  return projected.sum(0), rho_target


# Eager jax.random calls compile op by op; one jit is quicker.
orders_of = jax.jit(surgery_orders, static_argnums=1)


@functools.lru_cache(maxsize=None)
def jitted(num_tasks, beta=None):
  kwargs = {} if beta is None else {'beta': beta}
  return jax.jit(GradVac(num_tasks, **kwargs).combine)


@pytest.mark.parametrize('num_tasks,beta', [(2, None), (3, None), (4, 0.5)])
def test_matches_numpy_over_steps(num_tasks, beta):
  method = GradVac(num_tasks, **({} if beta is None else {'beta': beta}))
  state = method.init_state(None)
  rho_ref = np.zeros((num_tasks, num_tasks))
  for step in range(4):
    grads = random_grads(10 * num_tasks + step, num_tasks)
    key = jax.random.fold_in(jax.random.key(3), step)
    combined, _, state = jitted(num_tasks, beta)(grads, jnp.ones(num_tasks), state, key)
    expected, rho_ref = np_gradvac(flatten(grads), np.asarray(orders_of(key, num_tasks)),
                                   rho_ref, method.hp['beta'])
    assert_close(flatten_one(combined), expected, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(state['rho_target']), rho_ref, atol=1e-5)
  assert (rho_ref != 0).any()


def test_defaults():
  assert GradVac(2).hp == {'beta': 0.01}


def test_adjusted_cosine_hits_target():
  """With task 2 left alone (target -1), cos(g_1', g_2) becomes rho_T[0, 1] exactly."""
  for seed in range(3):
    grads = random_grads(seed, 2)
    flat = flatten(grads)
    state = {'rho_target': jnp.asarray([[0.0, 0.4], [-1.0, 0.0]], jnp.float32)}
    combined, _, new_state = jitted(2)(grads, jnp.ones(2), state, jax.random.key(seed))
    g1 = flatten_one(combined) - flat[1]
    cos = g1 @ flat[1] / (np.linalg.norm(g1) * np.linalg.norm(flat[1]))
    np.testing.assert_allclose(cos, 0.4, atol=1e-4)
    rho = flat[0] @ flat[1] / (np.linalg.norm(flat[0]) * np.linalg.norm(flat[1]))
    np.testing.assert_allclose(float(new_state['rho_target'][0, 1]), 0.99 * 0.4 + 0.01 * rho,
                               atol=1e-6)


@pytest.mark.parametrize('num_tasks', [3])
def test_zero_target_is_pcgrad(num_tasks):
  """From rho_T = 0 the adjustment of a conflicting pair is PCGrad's projection."""
  grads = random_grads(5, num_tasks)
  key = jax.random.key(5)
  combined, _, _ = jitted(num_tasks)(grads, jnp.ones(num_tasks),
                                     GradVac(num_tasks).init_state(None), key)
  expected, _, _ = jax.jit(PCGrad(num_tasks).combine)(grads, jnp.ones(num_tasks), {}, key)
  assert_close(flatten_one(combined), flatten_one(expected), rtol=1e-4)


def test_no_conflict_untouched_and_single_task():
  grads = random_grads(7, 3, conflict=False)
  combined, w, _ = jitted(3)(grads, jnp.ones(3), GradVac(3).init_state(None), jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), np.ones(3))
  assert_close(flatten_one(combined), flatten(grads).sum(0))
  grads = random_grads(0, 1)
  combined, w, state = jitted(1)(grads, jnp.ones(1), GradVac(1).init_state(None),
                                 jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), [1.0])
  assert state['rho_target'].shape == (1, 1)


def test_zero_gradient_finite():
  grads = {k: v.at[1].set(0.0) for k, v in random_grads(1, 3).items()}
  state = GradVac(3).init_state(None)
  for step in range(3):
    combined, w, state = jitted(3)(grads, jnp.ones(3), state, jax.random.key(step))
    assert np.isfinite(flatten_one(combined)).all() and np.isfinite(np.asarray(w)).all()
    assert np.isfinite(np.asarray(state['rho_target'])).all()


@pytest.mark.parametrize('beta', [0.0, -0.1, 1.5])
def test_bad_beta(beta):
  with pytest.raises(ConfigError, match='gradvac.beta'):
    GradVac(2, beta=beta)
