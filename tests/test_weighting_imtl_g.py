"""IMTL-G (mtan_jax.weighting.imtl_g) against a NumPy port of LibMTL's closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.weighting.imtl_g import IMTLG
from tests import weighting_reference_solvers as ref


def _libmtl_alpha(grads):
  """LibMTL's IMTL gradient part on the flat (T, P) gradients, float64."""
  t = len(grads)
  unit = grads / np.linalg.norm(grads, axis=-1, keepdims=True)
  d = grads[0:1].repeat(t - 1, 0) - grads[1:]
  u = unit[0:1].repeat(t - 1, 0) - unit[1:]
  alpha = grads[0] @ u.T @ np.linalg.inv(d @ u.T)
  return np.concatenate([[1 - alpha.sum()], alpha])


@pytest.mark.parametrize('t', [2, 3, 4, 5])
def test_matches_libmtl(t):
  method = IMTLG(t)
  step = jax.jit(method.combine)
  for seed in range(3):
    grads = ref.random_grads(seed, t)
    j = ref.flat(grads)
    out, w, _ = step(jax.tree.map(jnp.asarray, grads), jnp.ones(t), {}, jax.random.key(0))
    w = np.asarray(w, np.float64)
    alpha = _libmtl_alpha(j)
    np.testing.assert_allclose(w, alpha, rtol=1e-4, atol=1e-5 * np.abs(alpha).max())
    d = ref.flat({k: np.asarray(v)[None] for k, v in out.items()})[0]
    np.testing.assert_allclose(d, alpha @ j, rtol=1e-4, atol=1e-4 * np.abs(d).max())
    # Properties: equal projections onto every unit task gradient; weights sum to 1.
    proj = j @ d / np.linalg.norm(j, axis=1)
    np.testing.assert_allclose(proj, proj.mean(), rtol=1e-4)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)


def test_single_task_and_degenerate_grads():
  out, w, _ = jax.jit(IMTLG(1).combine)(jax.tree.map(jnp.asarray, ref.random_grads(0, 1)),
                                        jnp.ones(1), {}, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), [1.0])
  method = IMTLG(3)
  step = jax.jit(method.combine)
  state = method.init_state(None)
  base = ref.random_grads(1, 3)
  same = {k: np.concatenate([v[:1], v[:1], v[2:]]) for k, v in base.items()}  # singular
  for grads in (base, same, jax.tree.map(np.zeros_like, base)):
    out, w, state = step(jax.tree.map(jnp.asarray, grads), jnp.ones(3), state,
                         jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(w)))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
