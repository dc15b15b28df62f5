"""GradVac: Gradient Vaccine, adaptive gradient similarity targets.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021, arXiv:2010.05874.

Update (Algorithm 1, with LibMTL's `GradVac` formula and eps): for each task i, g_i' = g_i;
for each other task j in a random order, with rho = g_i'.g_j / (|g_i'| |g_j| + 1e-8) and the
EMA target rho_T[i, j]:
  if rho < rho_T[i, j]:
    g_i' <- g_i' + |g_i'| (rho_T sqrt(1 - rho^2) - rho sqrt(1 - rho_T^2))
                   / (|g_j| sqrt(1 - rho_T^2) + 1e-8) g_j
  rho_T[i, j] <- (1 - beta) rho_T[i, j] + beta rho
The update is sum_i g_i'. The adjustment sets cos(g_i', g_j) to rho_T exactly (without eps).

As PCGrad, every g_i' is a linear combination of the original gradients, so the loop runs on
the Gram matrix (|g_i'| = sqrt(c_i^T G c_i), g_i'.g_j = (c_i^T G)_j) and returns w = C.sum(0).

Hyper-parameters:
  beta (1e-2): EMA rate of the similarity targets; the paper's value (Section 3 / appendix).
    LibMTL's default is GradVac_beta=0.5.

State: rho_T (T, T) float32, initialised to 0 (as LibMTL).

Randomness: task i's order comes from `pcgrad.surgery_orders(key, T)` (j = i skipped).

Deviations: one whole-model group (LibMTL's group_type 0; the paper also groups by layer or
matrix). Parameter gradients of the shared parameters. The EMA update of rho_T runs for every
visited pair, as the paper's Algorithm 1 writes it; LibMTL updates rho_T only for pairs that
were adjusted (its EMA line sits inside the `if`), which keeps its targets <= 0. Square roots
are clamped at 0 against rounding (|rho| slightly above 1 in float32).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, MethodState
from mtan_jax.weighting.pcgrad import surgery_orders

_EPS = 1e-8


class GradVac(GradientMethod):
  """Gradient Vaccine with one whole-model group, in Gram form (see the module docstring)."""

  name = 'gradvac'
  defaults = {'beta': 1e-2}

  def check(self) -> None:
    beta = self.hp['beta']
    if not 0.0 < beta <= 1.0:
      raise ConfigError(f'config.weighting_params: {self.name}.beta={beta}; expected a number '
                        'in (0, 1] (EMA rate of the target similarities, paper 1e-2)')

  def init_state(self, shared_params: Any) -> MethodState:
    del shared_params
    return {'rho_target': jnp.zeros((self.num_tasks, self.num_tasks), jnp.float32)}

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del losses
    num_tasks = self.num_tasks
    beta = self.hp['beta']
    gram = gram.astype(jnp.float32)
    norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
    orders = surgery_orders(key, num_tasks)
    eye = jnp.eye(num_tasks, dtype=jnp.float32)

    def one_task(i, order, rho_row):
      # rho_T[i, :] is only touched by task i's own loop, so rows run independently (vmap).
      def visit(k, carry):
        c, rho_row = carry
        j = order[k]
        cg = c @ gram
        norm_i = jnp.sqrt(jnp.maximum(cg @ c, 0.0))
        rho = cg[j] / (norm_i * norms[j] + _EPS)
        target = rho_row[j]
        sin_t = jnp.sqrt(jnp.maximum(1.0 - target ** 2, 0.0))
        sin = jnp.sqrt(jnp.maximum(1.0 - rho ** 2, 0.0))
        coef = norm_i * (target * sin - rho * sin_t) / (norms[j] * sin_t + _EPS)
        other = j != i
        c = c + jnp.where(other & (rho < target), coef, 0.0) * eye[j]
        rho_row = rho_row.at[j].set(jnp.where(other, (1.0 - beta) * target + beta * rho, target))
        return c, rho_row

      return jax.lax.fori_loop(0, num_tasks, visit, (eye[i], rho_row))

    coeffs, rho_target = jax.vmap(one_task)(jnp.arange(num_tasks), orders, state['rho_target'])
    return coeffs.sum(0), {'rho_target': rho_target}
