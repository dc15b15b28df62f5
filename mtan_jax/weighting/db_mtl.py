"""DB-MTL: dual balancing of losses (log transform) and gradients (norm balancing).

Lin, Ye, Xu, Shi, Zhang, Kwok, "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029,
2023 (as implemented in LibMTL's `DB_MTL`).

Update: the task gradients of log(L_t + 1e-8), i.e. h_t = g_t / (L_t + 1e-8) (loss-scale
balancing), are averaged in a per-task buffer with LibMTL's schedule
  buf_t <- h_t + (beta / step^beta_sigma) (buf_t - h_t),  step = 1, 2, ...
and the update gives every buffer the largest buffer norm (gradient-magnitude balancing):
  update = sum_t (max_k |buf_k| / (|buf_t| + 1e-8)) buf_t.
Norms are over all shared parameters. The weights returned for logging are the balancing
factors max_k |buf_k| / (|buf_t| + 1e-8).

Hyper-parameters (LibMTL's defaults, DB_beta and DB_beta_sigma):
  beta (0.9): EMA weight of the buffer.
  beta_sigma (0.5): decay exponent of that weight over the steps.

State: `buffer`, a pytree like the shared parameters with a leading task axis (float32,
zeros), and `step` (int32, steps done).

Deviations: none beyond the framework's: the gradients are those of the shared parameters
(LibMTL, rep_grad=False); the log-loss gradient is formed by scaling the given g_t instead of
differentiating log(L_t) (identical by the chain rule).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, MethodState

_EPS = 1e-8


class DBMTL(GradientMethod):
  """Dual-Balancing MTL with LibMTL's buffer schedule (see the module docstring)."""

  name = 'db_mtl'
  defaults = {'beta': 0.9, 'beta_sigma': 0.5}

  def check(self) -> None:
    if not 0.0 <= self.hp['beta'] < 1.0:
      raise ConfigError(f'config.weighting_params: {self.name}.beta={self.hp["beta"]}; '
                        'expected a number in [0, 1) (LibMTL 0.9)')
    if not self.hp['beta_sigma'] >= 0.0:
      raise ConfigError(f'config.weighting_params: {self.name}.beta_sigma='
                        f'{self.hp["beta_sigma"]}; expected a number >= 0 (LibMTL 0.5)')

  def init_state(self, shared_params: Any) -> MethodState:
    buffer = jax.tree.map(lambda p: jnp.zeros((self.num_tasks,) + tuple(p.shape), jnp.float32),
                          shared_params)
    return {'buffer': buffer, 'step': jnp.zeros((), jnp.int32)}

  def combine(self, grads: Any, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[Any, jax.Array, MethodState]:
    del key
    if not jax.tree.leaves(grads):
      raise ConfigError('a gradient-based weighting method needs shared parameters; '
                        'the model has none')
    step = state['step'] + 1
    rate = self.hp['beta'] / step.astype(jnp.float32) ** self.hp['beta_sigma']
    scale = 1.0 / (jax.lax.stop_gradient(losses).astype(jnp.float32) + _EPS)

    def update_buffer(g, buf):
      h = g.astype(jnp.float32) * scale.reshape((-1,) + (1,) * (g.ndim - 1))
      return h + rate * (buf - h)

    buffer = jax.tree.map(update_buffer, grads, state['buffer'])
    sq = sum(jnp.sum(b.reshape(b.shape[0], -1) ** 2, axis=1) for b in jax.tree.leaves(buffer))
    norms = jnp.sqrt(sq)
    alpha = norms.max() / (norms + _EPS)
    # An elementwise sum, not a dot: exact float32 on accelerators whose matmuls round (TF32).
    combined = jax.tree.map(
        lambda b, g: (alpha.reshape((-1,) + (1,) * (b.ndim - 1)) * b).sum(0).astype(g.dtype),
        buffer, grads)
    return combined, alpha, {'buffer': buffer, 'step': step}
