"""Aligned-MTL: align the task gradients' principal components (condition number one).

Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023 (arXiv:2305.19000). With the eigendecomposition G = V diag(lambda) V^T
of the Gram matrix, restricted to the R eigenvalues above the tolerance
max(lambda) * T * eps_float32 (as the authors, LibMTL and TorchJD), the balance transform is

    B = sqrt(lambda_R) V_R diag(lambda_R^-1/2) V_R^T    (lambda_R: the smallest kept one),

and the update is sum_t w_t g_t with w = B 1 (LibMTL's `B.sum(0)`; B is symmetric). The
aligned gradients B J have Gram B G B = lambda_R P (P the projection onto the kept
eigenvectors): orthogonal, of equal norm sqrt(lambda_R) on the non-degenerate subspace.
If no eigenvalue is above the tolerance (all gradients zero), B = I (TorchJD).

No hyper-parameters (the authors' 'min' scale mode, the one LibMTL and TorchJD implement).

Deviations from the original: the rank is handled by masking the eigenvalues (static
shapes) instead of slicing; TorchJD's AlignedMTL uses the mean preference vector
(w = B 1 / T), LibMTL B 1, used here (it differs by the factor T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtan_jax.weighting.base import GradientMethod, MethodState


def balance_transform(gram: jax.Array) -> jax.Array:
  """The Aligned-MTL balance matrix B (T, T) from the Gram matrix."""
  t = gram.shape[0]
  lam, v = jnp.linalg.eigh(gram)
  tol = jnp.max(lam) * t * jnp.finfo(jnp.float32).eps
  keep = lam > tol
  lam_min = jnp.min(jnp.where(keep, lam, jnp.inf))
  inv_sqrt = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
  b = jnp.sqrt(jnp.where(jnp.isfinite(lam_min), lam_min, 0.0)) * jnp.einsum(
      'ik,k,jk->ij', v, inv_sqrt, v, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(jnp.any(keep), b, jnp.eye(t, dtype=jnp.float32))


class AlignedMTL(GradientMethod):
  """Aligned-MTL (Senushkin et al., 2023): weights B 1 from the Gram eigendecomposition."""

  name = 'aligned_mtl'
  defaults = {}

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del losses, key
    return jnp.sum(balance_transform(gram), axis=0), state
