"""Tests for `mtan_jax.weighting.rlw`: random loss weighting's weights are softmax of a
standard normal draw from the step key (reproducible, summing to 1, different per step) and
the total is their weighted sum of the losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.rlw import RLW, random_weights


def total_and_grad(method, losses, key, weights=None):
  weights = jnp.ones_like(losses) if weights is None else weights

  def total(l):
    return method.loss(l, weights, {}, key, jnp.zeros_like(l))[0]

  return jax.jit(jax.value_and_grad(total))(losses)


@pytest.mark.parametrize('num_tasks', [1, 2, 3, 5])
def test_total_is_softmax_normal_weighted_sum(num_tasks):
  key = jax.random.key(num_tasks)
  losses = jnp.asarray(np.linspace(0.5, 2.0, num_tasks), jnp.float32)
  value, grad = total_and_grad(RLW(num_tasks), losses, key)
  normal = np.asarray(jax.random.normal(key, (num_tasks,)), np.float64)
  expected_w = np.exp(normal) / np.exp(normal).sum()
  np.testing.assert_allclose(np.asarray(grad), expected_w, rtol=1e-6)
  np.testing.assert_allclose(float(value), expected_w @ np.asarray(losses, np.float64),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad).sum(), 1.0, rtol=1e-6)


def test_weights_reproducible_and_differ_between_steps():
  base = jax.random.key(0)
  steps = [np.asarray(random_weights(jax.random.fold_in(base, s), 4)) for s in range(5)]
  np.testing.assert_array_equal(steps[0], np.asarray(random_weights(jax.random.fold_in(base, 0),
                                                                    4)))
  for s in range(1, 5):
    assert not np.allclose(steps[0], steps[s])
  for w in steps:
    assert (w > 0).all()
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)


def test_epoch_weights_scale_losses_and_no_hyper_parameters():
  key = jax.random.key(3)
  losses = jnp.asarray([1.0, 2.0, 3.0])
  _, grad = total_and_grad(RLW(3), losses, key, jnp.asarray([1.0, 2.0, 0.5]))
  w = np.asarray(random_weights(key, 3))
  np.testing.assert_allclose(np.asarray(grad), w * [1.0, 2.0, 0.5], rtol=1e-6)
  with pytest.raises(ConfigError):
    RLW(2, temperature=1.0)
