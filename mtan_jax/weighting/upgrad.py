"""UPGrad: the mean of the task gradients projected onto their dual cone.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(arXiv:2406.16232; TorchJD). Each task gradient g_i is projected onto the dual cone
{x : <g_t, x> >= 0 for all t} of the gradients, and the projections are averaged, so the
update conflicts with no task. In Gram form (the paper's Proposition 1) the projection of
J^T u is J^T v with

    v = argmin_v v^T G v  s.t.  v >= u,

and with the preference weights u_i = e_i / T (the mean) the update is J^T w,
w = sum_i v_i (TorchJD's `UPGradWeighting`, LibMTL's `UPGrad`). As TorchJD, G is first
normalised by its trace (the squared Frobenius norm of J; a trace below `norm_eps` gives
G = 0) and regularised by `reg_eps` I to make it positive definite. When the gradients do
not conflict (all pairwise inner products >= 0) every v_i = e_i / T and the update is the
mean gradient.

Hyper-parameters (defaults from TorchJD's `UPGrad` and LibMTL's `UPGrad_norm_eps`,
`UPGrad_reg_eps`):
  norm_eps (default 1e-4): below this trace of G, G is treated as zero (w = the mean).
  reg_eps (default 1e-4): ridge added to the normalised Gram matrix.

Deviations from the original: the T box-constrained QPs are solved on device, exactly,
by enumerating the active sets (`mtan_jax.weighting.simplex.box_qp`) instead of quadprog
on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, MethodState
from mtan_jax.weighting.simplex import box_qp


def upgrad_weights(gram: jax.Array, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> jax.Array:
  """TorchJD's UPGrad weights sum_i argmin_{v >= e_i/T} v^T G' v (G' normalised, regularised)."""
  t = gram.shape[0]
  trace = jnp.trace(gram)
  g = jnp.where(trace < norm_eps, 0.0, gram / jnp.where(trace < norm_eps, 1.0, trace))
  g = g + reg_eps * jnp.eye(t, dtype=jnp.float32)
  u = jnp.eye(t, dtype=jnp.float32) / t
  return jnp.sum(box_qp(g, u), axis=0)




class UPGrad(GradientMethod):
  """UPGrad (Quinton & Rey, 2024): the averaged projections onto the gradients' dual cone."""

  name = 'upgrad'
  max_tasks = 12  # each projection enumerates the 2^T active sets of its box QP
  defaults = {'norm_eps': 1e-4, 'reg_eps': 1e-4}

  def check(self) -> None:
    if not self.hp['norm_eps'] >= 0:
      raise ConfigError(f'config.weighting_params: upgrad.norm_eps={self.hp["norm_eps"]}; '
                        'expected a number >= 0')
    if not self.hp['reg_eps'] > 0:
      raise ConfigError(f'config.weighting_params: upgrad.reg_eps={self.hp["reg_eps"]}; '
                        'expected a number > 0 (the Gram matrix must be positive definite)')

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del losses, key
    return upgrad_weights(gram, self.hp['norm_eps'], self.hp['reg_eps']), state
