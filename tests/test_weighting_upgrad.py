"""UPGrad (mtan_jax.weighting.upgrad) against TorchJD's formulation solved by NumPy/SciPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.simplex import box_qp
from mtan_jax.weighting.upgrad import UPGrad
from tests import weighting_reference_solvers as ref


def _torchjd_weights(gram, norm_eps=1e-4, reg_eps=1e-4, solver=ref.box_qp_exact):
  """TorchJD's UPGradWeighting: U = diag(1/T), G normalised by its trace and regularised,
  each row projected (min v^T G v s.t. v >= u), the projections summed."""
  t = len(gram)
  tr = np.trace(gram)
  g = np.zeros_like(gram) if tr < norm_eps else gram / tr
  g = g + reg_eps * np.eye(t)
  return sum(solver(g, u) for u in np.eye(t) / t)


@pytest.mark.parametrize('t', [2, 3, 4])
def test_matches_torchjd(t):
  method = UPGrad(t)
  step = jax.jit(method.combine)
  for seed in range(3):
    grads = ref.random_grads(seed, t)
    j = ref.flat(grads)
    gram = j @ j.T
    out, w, _ = step(jax.tree.map(jnp.asarray, grads), jnp.ones(t), {}, jax.random.key(0))
    w = np.asarray(w, np.float64)
    np.testing.assert_allclose(w, _torchjd_weights(gram), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w, _torchjd_weights(gram, solver=ref.box_qp_slsqp),
                               rtol=1e-3, atol=1e-5)
    d = ref.flat({k: np.asarray(v)[None] for k, v in out.items()})[0]
    np.testing.assert_allclose(d, w @ j, rtol=1e-4, atol=1e-5 * np.abs(d).max())
    # Non-conflicting with every task (up to the reg_eps ridge).
    assert np.all(j @ d >= -1e-4 * np.trace(gram) * np.abs(w).max())
    assert np.all(w >= 1.0 / t - 1e-6)  # each v_i >= e_i / T


def test_non_conflicting_gradients_give_the_mean():
  t = 3
  rng = np.random.default_rng(0)
  grads = {'a': np.abs(rng.normal(size=(t, 6))).astype(np.float32)}  # all dots > 0
  out, w, _ = jax.jit(UPGrad(t).combine)(jax.tree.map(jnp.asarray, grads), jnp.ones(t), {},
                                         jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), np.ones(t) / t, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out['a']), grads['a'].mean(0), rtol=1e-5)


def test_box_qp_random():
  rng = np.random.default_rng(1)
  solve = jax.jit(box_qp)
  for i in range(6):
    t = 2 + i % 4
    j = rng.normal(size=(t, 3 if i % 2 else 10))
    g = j @ j.T / np.trace(j @ j.T) + 1e-4 * np.eye(t)
    u = rng.normal(size=(2, t))
    v = np.asarray(solve(jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32)), np.float64)
    for r in range(2):
      np.testing.assert_allclose(v[r], ref.box_qp_exact(g, u[r]), rtol=2e-3, atol=2e-4)


def test_jit_state_single_task_and_small_grads():
  out, w, _ = jax.jit(UPGrad(1).combine)(jax.tree.map(jnp.asarray, ref.random_grads(0, 1)),
                                         jnp.ones(1), {}, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), [1.0], rtol=1e-6)
  method = UPGrad(3)
  step = jax.jit(method.combine)
  state = method.init_state(None)
  tiny = jax.tree.map(lambda x: 1e-4 * x, ref.random_grads(2, 3))  # trace < norm_eps
  for grads in (ref.random_grads(2, 3), tiny, jax.tree.map(np.zeros_like, tiny)):
    out, w, state = step(jax.tree.map(jnp.asarray, grads), jnp.ones(3), state,
                         jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(w)))
  np.testing.assert_allclose(np.asarray(w), np.ones(3) / 3, rtol=1e-5)  # G treated as zero


def test_bad_hyperparameters():
  with pytest.raises(ConfigError, match='upgrad.reg_eps'):
    UPGrad(2, reg_eps=0)
  with pytest.raises(ConfigError, match='upgrad.norm_eps'):
    UPGrad(2, norm_eps=-1)
