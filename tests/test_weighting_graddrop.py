"""Tests for `mtan_jax.weighting.graddrop`: GradDrop's masked sum against NumPy with the same
uniform draws, one sign per coordinate, the plain sum when all tasks agree, jit and T = 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.graddrop import GradDrop, sign_uniforms
from tests.weighting_reference import assert_close, flatten, flatten_one, random_grads


def np_graddrop(flat, uniform):
  """Chen et al.'s sign dropout (leak 0) on (T, P) float64 gradients, given U (P,)."""
  purity = 0.5 * (1 + flat.sum(0) / (np.abs(flat).sum(0) + 1e-7))
  out = np.zeros(flat.shape[1])
  for i in range(len(flat)):
    mask = (purity > uniform) * (flat[i] > 0) + (purity < uniform) * (flat[i] < 0)
    out += mask * flat[i]
  return out


@functools.lru_cache(maxsize=None)
def jitted(num_tasks):
  return jax.jit(GradDrop(num_tasks).combine)


def uniforms_flat(key, grads):
  return np.concatenate([np.asarray(u, np.float64).ravel() for u in sign_uniforms(key, grads)])


@pytest.mark.parametrize('num_tasks', [2, 3, 4])
def test_matches_numpy(num_tasks):
  for seed in range(3):
    grads = random_grads(seed, num_tasks)
    key = jax.random.key(seed)
    combined, w, _ = jitted(num_tasks)(grads, jnp.ones(num_tasks), {}, key)
    expected = np_graddrop(flatten(grads), uniforms_flat(key, grads))
    assert_close(flatten_one(combined), expected)
    np.testing.assert_array_equal(np.asarray(w), np.ones(num_tasks))


def test_one_sign_per_coordinate():
  """The update at each coordinate is the sum of all positive or of all negative entries."""
  for seed in range(4):
    grads = random_grads(seed, 4)
    combined = flatten_one(jitted(4)(grads, jnp.ones(4), {}, jax.random.key(seed))[0])
    flat = flatten(grads)
    positive, negative = np.where(flat > 0, flat, 0).sum(0), np.where(flat < 0, flat, 0).sum(0)
    is_pos = np.isclose(combined, positive, rtol=1e-6, atol=1e-7)
    is_neg = np.isclose(combined, negative, rtol=1e-6, atol=1e-7)
    assert (is_pos | is_neg).all()


def test_leaves_draw_different_uniforms_and_key_changes_them():
  grads = {'a': jnp.ones((2, 50)), 'b': jnp.ones((2, 50))}
  u = sign_uniforms(jax.random.key(0), grads)
  assert not np.allclose(np.asarray(u[0]), np.asarray(u[1]))
  assert not np.allclose(np.asarray(u[0]), np.asarray(sign_uniforms(jax.random.key(1), grads)[0]))


def test_agreeing_signs_give_sum():
  rng = np.random.default_rng(0)
  magnitude = rng.uniform(0.5, 2.0, size=(3, 10)).astype(np.float32)
  sign = np.where(rng.uniform(size=(1, 10)) > 0.5, 1.0, -1.0).astype(np.float32)
  flat = magnitude * sign  # Every coordinate has one sign across the three tasks.
  grads = {'w': jnp.asarray(flat[:, :6].reshape(3, 2, 3)), 'b': jnp.asarray(flat[:, 6:])}
  for seed in range(3):
    combined, _, _ = jitted(3)(grads, jnp.ones(3), {}, jax.random.key(seed))
    assert_close(flatten_one(combined), flatten(grads).sum(0))


def test_single_task_zero_gradient_and_hyper_parameters():
  grads = random_grads(0, 1)
  combined, w, _ = jitted(1)(grads, jnp.ones(1), {}, jax.random.key(0))
  assert_close(flatten_one(combined), flatten(grads)[0])  # One task always agrees with itself.
  np.testing.assert_array_equal(np.asarray(w), [1.0])
  zero = jax.tree.map(jnp.zeros_like, random_grads(1, 3))
  combined, _, _ = jitted(3)(zero, jnp.ones(3), {}, jax.random.key(1))
  np.testing.assert_array_equal(flatten_one(combined), 0.0)
  with pytest.raises(ConfigError):
    GradDrop(2, leak=0.5)
