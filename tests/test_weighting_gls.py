"""Tests for `mtan_jax.weighting.gls`: the geometric mean of the losses and its gradient
against NumPy, scale behaviour, the eps guard, T = 1 and hyper-parameter checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.gls import GLS


def total_and_grad(num_tasks, losses):
  method = GLS(num_tasks)

  def total(l):
    return method.loss(l, jnp.ones_like(l), {}, jax.random.key(0), jnp.zeros_like(l))[0]

  value, grad = jax.jit(jax.value_and_grad(total))(jnp.asarray(losses, jnp.float32))
  return float(value), np.asarray(grad, np.float64)


@pytest.mark.parametrize('num_tasks', [1, 2, 3, 5])
def test_matches_numpy(num_tasks):
  rng = np.random.default_rng(num_tasks)
  losses = rng.uniform(0.05, 4.0, num_tasks).astype(np.float32).astype(np.float64)
  value, grad = total_and_grad(num_tasks, losses)
  expected = np.prod(losses) ** (1.0 / num_tasks)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # d/dL_t (prod L)^(1/T) = (prod L)^(1/T) / (T L_t)
  np.testing.assert_allclose(grad, expected / (num_tasks * losses), rtol=1e-5)


def test_scale_and_small_losses():
  value, _ = total_and_grad(3, [1.0, 2.0, 4.0])
  scaled, _ = total_and_grad(3, [10.0, 20.0, 40.0])
  np.testing.assert_allclose(scaled, 10 * value, rtol=1e-5)
  # The product 1e-48 underflows float32; the log form keeps the geometric mean 1e-6.
  value, grad = total_and_grad(8, [1e-6] * 8)
  np.testing.assert_allclose(value, 1e-6, rtol=1e-4)
  np.testing.assert_allclose(grad, 1.0 / 8, rtol=1e-4)
  value, grad = total_and_grad(2, [0.0, 1.0])
  assert np.isfinite(value) and np.isfinite(grad).all()


def test_no_hyper_parameters():
  assert GLS(2).hp == {}
  with pytest.raises(ConfigError):
    GLS(2, eps=1e-8)
