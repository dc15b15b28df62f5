"""CAGrad (mtan_jax.weighting.cagrad) against the authors' formula with SciPy's SLSQP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.cagrad import CAGrad, cagrad_dual_weights
from tests import weighting_reference_solvers as ref


def _authors_objective(gg, calpha):
  """The authors' (Cranial-XIX/CAGrad, LibMTL) dual objective and its SLSQP solution."""
  t = gg.shape[0]
  x_start = np.ones(t) / t
  b = x_start.copy()
  c = calpha * np.sqrt(gg.mean() + 1e-8) + 1e-8

  def objfn(x):
    return x @ gg @ b + c * np.sqrt(x @ gg @ x + 1e-8)

  res = minimize(objfn, x_start, bounds=[(0, 1)] * t,
                 constraints={'type': 'eq', 'fun': lambda x: 1 - sum(x)})
  tight = minimize(objfn, res.x, bounds=[(0, 1)] * t, method='SLSQP',
                   constraints={'type': 'eq', 'fun': lambda x: 1 - sum(x)},
                   options={'ftol': 1e-15, 'maxiter': 1000})
  return objfn, res.x, tight.x


def _authors_update(j, w, calpha, rescale):
  """g = mean + c/|g_w| g_w, rescaled, as the authors' code, in float64."""
  gg = j @ j.T
  g0_norm = np.sqrt(gg.mean() + 1e-8)
  c = calpha * g0_norm + 1e-8
  gw = (j * w[:, None]).sum(0)
  g = j.mean(0) + c / (np.linalg.norm(gw) + 1e-8) * gw
  return {0: g, 1: g / (1 + calpha ** 2), 2: g / (1 + calpha)}[rescale]


@pytest.mark.parametrize('t', [2, 3, 4])
def test_matches_authors(t):
  configs = ((0.4, 1), (0.9, 0), (0.5, 2)) if t == 3 else ((0.4, 1),)
  for calpha, rescale in configs:
    method = CAGrad(t, calpha=calpha, rescale=rescale)
    step = jax.jit(method.combine)
    for seed in range(3):
      grads = ref.random_grads(seed, t)
      j = ref.flat(grads)
      gg = j @ j.T
      out, w, _ = step(jax.tree.map(jnp.asarray, grads), jnp.ones(t), {}, jax.random.key(0))
      # The dual solution: the objective is as low as the authors' SLSQP's (relative to tr G).
      objfn, x_authors, x_tight = _authors_objective(gg, calpha)
      # The dual weights, recovered from the combination weights (1/T + lambda w*) / r.
      r = {0: 1.0, 1: 1 + calpha ** 2, 2: 1 + calpha}[rescale]
      w_dual = np.asarray(w, np.float64) * r - 1.0 / t
      w_dual = np.clip(w_dual / w_dual.sum(), 0, None)
      scale = np.trace(gg) / t
      assert objfn(w_dual) <= objfn(x_authors) + 1e-6 * scale
      assert objfn(w_dual) <= objfn(x_tight) + 1e-6 * scale
            # Given the same dual weights, the update equals the authors' formula.
      expect = ref.unflat(_authors_update(j, w_dual, calpha, rescale), grads)
      for k in grads:
        np.testing.assert_allclose(np.asarray(out[k]), expect[k], rtol=1e-4,
                                   atol=1e-5 * np.sqrt(scale))


def test_dual_solver_on_random_grams():
  solve = jax.jit(cagrad_dual_weights, static_argnums=(1,))
  rng = np.random.default_rng(0)
  for i in range(8):
    t = (3, 5)[i % 2]
    j = rng.normal(size=(t, 4 if i % 4 == 1 else 20)) * rng.uniform(0.2, 3, size=(t, 1))
    if i % 3 == 0:
      j[0] = -2 * j[1:].mean(0) + 0.1 * j[0]  # strong conflict
    gg = j @ j.T
    w = np.asarray(solve(jnp.asarray(gg, jnp.float32), 0.4), np.float64)
    objfn, x_authors, x_tight = _authors_objective(gg, 0.4)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-5
    assert objfn(w) <= objfn(x_tight) + 1e-6 * np.trace(gg) / t


def test_zero_alpha_gives_average_gradient():
  t = 3
  grads = ref.random_grads(1, t)
  out, w, _ = jax.jit(CAGrad(t, calpha=0.0).combine)(
      jax.tree.map(jnp.asarray, grads), jnp.ones(t), {}, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), np.ones(t) / t, rtol=1e-6)
  for k in grads:
    np.testing.assert_allclose(np.asarray(out[k]), grads[k].mean(0), rtol=1e-5, atol=1e-6)


def test_conflict_aversion():
  # The worst task's inner product with the update is at least that with the mean gradient.
  t = 3
  grads = ref.random_grads(2, t)
  j = ref.flat(grads)
  out, _, _ = jax.jit(CAGrad(t, rescale=0).combine)(
      jax.tree.map(jnp.asarray, grads), jnp.ones(t), {}, jax.random.key(0))
  d = ref.flat({k: np.asarray(v)[None] for k, v in out.items()})[0]
  assert np.min(j @ d) >= np.min(j @ j.mean(0))


def test_jit_state_single_task_and_zero_grads():
  method = CAGrad(1)
  one = jax.tree.map(jnp.asarray, ref.random_grads(5, 1))
  out, w, _ = jax.jit(method.combine)(one, jnp.ones(1), {}, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), [(1 + 0.4) / (1 + 0.4 ** 2)], rtol=1e-5)
  method = CAGrad(3)
  step = jax.jit(method.combine)
  state = method.init_state(None)
  for grads in (ref.random_grads(4, 3), jax.tree.map(np.zeros_like, ref.random_grads(4, 3))):
    for i in range(2):
      out, w, state = step(jax.tree.map(jnp.asarray, grads), jnp.ones(3), state,
                           jax.random.key(i))
      assert np.all(np.isfinite(w))
      assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


def test_bad_hyperparameters():
  with pytest.raises(ConfigError, match='cagrad.calpha'):
    CAGrad(2, calpha=-1)
  with pytest.raises(ConfigError, match='cagrad.rescale'):
    CAGrad(2, rescale=3)
  with pytest.raises(ConfigError, match='cagrad.solver_iters'):
    CAGrad(2, solver_iters=0)
