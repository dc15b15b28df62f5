"""Aligned-MTL (mtan_jax.weighting.aligned_mtl) against a NumPy port of LibMTL's code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.weighting.aligned_mtl import AlignedMTL, balance_transform
from tests import weighting_reference_solvers as ref


def _libmtl_alpha(m):
  """LibMTL's Aligned_MTL.backward in float64: eigh, rank by tolerance, B.sum(0)."""
  lmbda, v = np.linalg.eigh(m)
  tol = lmbda.max() * max(m.shape) * np.finfo(np.float32).eps
  rank = int(np.sum(lmbda > tol))
  order = np.argsort(-lmbda)
  lmbda, v = lmbda[order][:rank], v[:, order][:, :rank]
  sigma = np.diag(1 / np.sqrt(lmbda))
  b = np.sqrt(lmbda[-1]) * ((v @ sigma) @ v.T)
  return b.sum(0), b


@pytest.mark.parametrize('t', [2, 3, 4])
def test_matches_libmtl(t):
  method = AlignedMTL(t)
  step = jax.jit(method.combine)
  for seed in range(3):
    grads = ref.random_grads(seed, t)
    j = ref.flat(grads)
    gram = j @ j.T
    out, w, _ = step(jax.tree.map(jnp.asarray, grads), jnp.ones(t), {}, jax.random.key(0))
    alpha, b = _libmtl_alpha(gram)
    np.testing.assert_allclose(np.asarray(w), alpha, rtol=1e-4, atol=1e-5 * np.abs(alpha).max())
    d = ref.flat({k: np.asarray(v)[None] for k, v in out.items()})[0]
    np.testing.assert_allclose(d, alpha @ j, rtol=1e-4, atol=1e-4 * np.abs(d).max())
    # The aligned gradients B J are orthogonal with equal squared norms lambda_min.
    bb = np.asarray(balance_transform(jnp.asarray(gram, jnp.float32)), np.float64)
    aligned_gram = bb @ gram @ bb
    lam_min = np.linalg.eigvalsh(gram).min()
    np.testing.assert_allclose(aligned_gram, lam_min * np.eye(t), atol=1e-3 * lam_min)


def test_rank_deficient_masks_degenerate_directions():
  # 4 gradients in a 2-D space: rank 2; B G B is lambda_R times the projection on the span.
  rng = np.random.default_rng(0)
  j = rng.normal(size=(4, 2)) @ rng.normal(size=(2, 9))
  gram = j @ j.T
  alpha, b_ref = _libmtl_alpha(gram)
  b = np.asarray(balance_transform(jnp.asarray(gram, jnp.float32)), np.float64)
  lam = np.sort(np.linalg.eigvalsh(gram))[::-1]
  vecs = np.linalg.eigh(gram)[1][:, -2:]
  np.testing.assert_allclose(b @ gram @ b, lam[1] * vecs @ vecs.T, atol=1e-3 * lam[1])
  np.testing.assert_allclose(b @ np.ones(4) @ j, alpha @ j, rtol=1e-3, atol=1e-3)


def test_single_task_and_zero_grads():
  out, w, _ = jax.jit(AlignedMTL(1).combine)(jax.tree.map(jnp.asarray, ref.random_grads(0, 1)),
                                             jnp.ones(1), {}, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(w), [1.0], rtol=1e-5)
  method = AlignedMTL(3)
  step = jax.jit(method.combine)
  state = method.init_state(None)
  for grads in (ref.random_grads(1, 3), jax.tree.map(np.zeros_like, ref.random_grads(1, 3))):
    out, w, state = step(jax.tree.map(jnp.asarray, grads), jnp.ones(3), state,
                         jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(w)))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  np.testing.assert_allclose(np.asarray(w), np.ones(3))  # all zero: B = I (TorchJD)
