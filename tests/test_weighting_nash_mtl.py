"""Nash-MTL (mtan_jax.weighting.nash_mtl) against a SciPy solution of the bargaining condition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.nash_mtl import NashMTL
from tests import weighting_reference_solvers as ref


def _scipy_alpha(gram, reg=1e-6):
  """alpha > 0 with G alpha = 1/alpha for G = raw Gram (the authors' constraint
  alpha_t n_F (G/n_F alpha)_t >= 1), ridge reg on the normalised Gram, in float64."""
  nf = np.linalg.norm(gram)
  gn = gram / nf + reg * np.eye(len(gram))
  obj = lambda x: 0.5 * np.exp(x) @ gn @ np.exp(x) - x.sum()
  jac = lambda x: np.exp(x) * (gn @ np.exp(x)) - 1
  res = minimize(obj, np.zeros(len(gram)), jac=jac, method='BFGS', options={'gtol': 1e-13})
  return np.exp(res.x) / np.sqrt(nf)


def _run(method, grads, state):
  t = method.num_tasks
  return jax.jit(method.combine)(jax.tree.map(jnp.asarray, grads), jnp.ones(t), state,
                                 jax.random.key(0))


@pytest.mark.parametrize('t', [2, 3, 4])
def test_matches_bargaining_solution(t):
  method = NashMTL(t, max_norm=0.0)
  clipped = NashMTL(t)
  step, step_clip = jax.jit(method.combine), jax.jit(clipped.combine)
  for seed in range(3):
    grads = ref.random_grads(seed, t)
    j = ref.flat(grads)
    gram = j @ j.T
    args = (jax.tree.map(jnp.asarray, grads), jnp.ones(t), method.init_state(None),
            jax.random.key(0))
    out, w, state = step(*args)
    w = np.asarray(w, np.float64)
    # The bargaining condition G alpha = 1/alpha, positive weights, ||d||^2 = T.
    assert np.all(w > 0)
    np.testing.assert_allclose(gram @ w, 1 / w, rtol=1e-3)
    np.testing.assert_allclose(w, _scipy_alpha(gram), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(state['alpha']), w, rtol=1e-6)
    d = ref.flat({k: np.asarray(v)[None] for k, v in out.items()})[0]
    np.testing.assert_allclose(d @ d, t, rtol=1e-3)
    np.testing.assert_allclose(j @ d * w, np.ones(t), rtol=1e-3)  # equal utilities
    # max_norm=1 (default): the same direction with norm 1.
    out_c, w_c, _ = step_clip(*args)
    np.testing.assert_allclose(np.asarray(w_c), w / np.sqrt(t), rtol=1e-3)
    d_c = ref.flat({k: np.asarray(v)[None] for k, v in out_c.items()})[0]
    np.testing.assert_allclose(np.linalg.norm(d_c), 1.0, rtol=1e-4)


def test_torchjd_example():
  # TorchJD's NashMTL docstring: J = [[-4, 1, 1], [6, 1, 1]] -> [0.0542, 0.7061, 0.7061].
  grads = {'a': np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], np.float32)}
  method = NashMTL(2)
  out, _, _ = _run(method, grads, method.init_state(None))
  np.testing.assert_allclose(np.asarray(out['a']), [0.0542, 0.7061, 0.7061], atol=1e-4)


def test_update_weights_every_reuses_alpha():
  method = NashMTL(3, update_weights_every=2)
  step = jax.jit(method.combine)
  state = method.init_state(None)
  g1, g2 = ref.random_grads(0, 3), ref.random_grads(1, 3)
  _, w1, state = step(jax.tree.map(jnp.asarray, g1), jnp.ones(3), state, jax.random.key(0))
  alpha1 = np.asarray(state['alpha'])
  _, w2, state = step(jax.tree.map(jnp.asarray, g2), jnp.ones(3), state, jax.random.key(1))
  np.testing.assert_allclose(np.asarray(state['alpha']), alpha1)  # reused at step 1
  j2 = ref.flat(g2)
  norm = np.sqrt(alpha1 @ j2 @ j2.T @ alpha1)
  np.testing.assert_allclose(np.asarray(w2), alpha1 * min(1, 1 / norm), rtol=1e-5)
  _, _, state = step(jax.tree.map(jnp.asarray, g2), jnp.ones(3), state, jax.random.key(2))
  np.testing.assert_allclose(np.asarray(state['alpha']), _scipy_alpha(j2 @ j2.T), rtol=1e-3)
  assert int(state['step']) == 3


def test_single_task_degenerate_and_zero_grads():
  method = NashMTL(1)
  grads = ref.random_grads(3, 1)
  out, w, _ = _run(method, grads, method.init_state(None))
  g = ref.flat(grads)[0]
  np.testing.assert_allclose(np.asarray(w), [1 / np.linalg.norm(g)], rtol=1e-5)
  method = NashMTL(3)
  # Opposite gradients (no exact solution; the ridge gives one) and all-zero gradients.
  opposite = ref.random_grads(4, 3)
  opposite = {k: np.concatenate([v[:1], -v[:1], v[2:]]) for k, v in opposite.items()}
  for grads in (opposite, jax.tree.map(np.zeros_like, opposite)):
    out, w, state = _run(method, grads, method.init_state(None))
    assert np.all(np.isfinite(np.asarray(w))) and np.all(np.asarray(w) > 0)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
    d = ref.flat({k: np.asarray(v)[None] for k, v in out.items()})[0]
    assert np.linalg.norm(d) <= 1 + 1e-5


def test_bad_hyperparameters():
  with pytest.raises(ConfigError, match='nash_mtl.max_norm'):
    NashMTL(2, max_norm=-1)
  with pytest.raises(ConfigError, match='nash_mtl.update_weights_every'):
    NashMTL(2, update_weights_every=0)
  with pytest.raises(ConfigError, match='nash_mtl.newton_iters'):
    NashMTL(2, newton_iters=1.5)
  with pytest.raises(ConfigError, match='nash_mtl.reg'):
    NashMTL(2, reg=0)
