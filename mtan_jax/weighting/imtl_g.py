"""IMTL-G: impartial gradient weighting (equal projections onto every task's direction).

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
ICLR 2021 (openreview IMPnRXEWpvr). The gradient part (IMTL-G): find weights alpha with
sum alpha = 1 such that the combined gradient g = sum_t alpha_t g_t has the same projection
onto every unit task gradient u_t = g_t / ||g_t||. With D = g_1 - g_{2..T} and
U = u_1 - u_{2..T} (rows), the closed form is

    alpha_{2..T} = g_1 U^T (D U^T)^-1,    alpha_1 = 1 - sum_{t>=2} alpha_t,

computed here from the Gram matrix: (g_1 U^T)_j = ||g_1|| - G_1j / ||g_j|| and
(D U^T)_ij = G_11/||g_1|| - G_1j/||g_j|| - G_i1/||g_1|| + G_ij/||g_j||.

No hyper-parameters.

Deviations from the original: the gradient part only (the loss-scale part IMTL-L, which
LibMTL's `IMTL` also applies, is not included: combine it with a loss-based method);
applied to the shared parameters' gradients instead of the shared representation's
(MTAN has no single shared representation); the linear system is solved with a
pseudo-inverse, so a singular D U^T (e.g. two identical task gradients) gives the
minimum-norm solution instead of LibMTL's `torch.inverse` failure; a zero task gradient
gets a zero unit vector instead of NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtan_jax.weighting.base import GradientMethod, MethodState, task_norms

_HIGHEST = jax.lax.Precision.HIGHEST


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  """The IMTL-G weights (T,) from the Gram matrix."""
  t = gram.shape[0]
  if t == 1:
    return jnp.ones((1,), jnp.float32)
  norms = task_norms(gram)
  inv = jnp.where(norms > 1e-20, 1.0 / jnp.where(norms > 1e-20, norms, 1.0), 0.0)
  gu = gram * inv[None, :]  # gu[i, j] = <g_i, u_j>
  g1u = gu[0, 0] - gu[0, 1:]  # (T-1,) g_1 . (u_1 - u_j)
  # (D U^T)_ij = (g_1 - g_i) . (u_1 - u_j), i, j >= 2.
  du = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]
  alpha = jnp.einsum('j,ji->i', g1u, jnp.linalg.pinv(du), precision=_HIGHEST)
  return jnp.concatenate([1.0 - jnp.sum(alpha, keepdims=True), alpha])


class IMTLG(GradientMethod):
  """IMTL-G (Liu et al., 2021): weights summing to one with equal projections on all tasks."""

  name = 'imtl_g'
  defaults = {}

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del losses, key
    return imtl_g_weights(gram), state
