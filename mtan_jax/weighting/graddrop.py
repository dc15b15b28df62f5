"""GradDrop: gradient sign dropout.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai, Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020, arXiv:2010.06808.

Update, per coordinate of the shared gradient (leak 0):
  P = 1/2 (1 + sum_i g_i / (sum_i |g_i| + 1e-7))      (positive sign purity, in [0, 1])
  U ~ Uniform[0, 1)
  M_i = 1[P > U] 1[g_i > 0] + 1[P < U] 1[g_i < 0]
  update = sum_i M_i g_i
so every coordinate keeps the contributions of one sign only: positive with probability P.
The eps 1e-7 is LibMTL's (`GradDrop`).

Not a linear combination of the task gradients, so `combine` works leaf by leaf on the
pytree; leaf number n (in `jax.tree.leaves` order) draws its U from
`jax.random.uniform(fold_in(key, n), leaf.shape[1:])` (see `sign_uniforms`). The returned
weights are ones (logging only).

Hyper-parameters: none (leak 0, as LibMTL).

Deviation: the paper (and LibMTL, which requires rep_grad=True) applies GradDrop to the
gradients with respect to a shared *activation* layer, per batch element, then backpropagates
the masked activation gradient into the shared layers below; here it masks the shared
*parameters'* per-task gradients directly, because this framework hands methods the
parameter gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, MethodState

_EPS = 1e-7


def sign_uniforms(key: jax.Array, grads: Any) -> list[jax.Array]:
  """The U draws, one per leaf of `grads` (leading task axis dropped), in leaf order."""
  return [jax.random.uniform(jax.random.fold_in(key, n), g.shape[1:], jnp.float32)
          for n, g in enumerate(jax.tree.leaves(grads))]


class GradDrop(GradientMethod):
  """Gradient sign dropout on the shared parameters' gradients (see the module docstring)."""

  name = 'graddrop'
  defaults = {}

  def combine(self, grads: Any, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[Any, jax.Array, MethodState]:
    del losses
    leaves, treedef = jax.tree.flatten(grads)
    if not leaves:
      raise ConfigError('a gradient-based weighting method needs shared parameters; '
                        'the model has none')
    out = []
    for g, u in zip(leaves, sign_uniforms(key, grads)):
      g32 = g.astype(jnp.float32)
      purity = 0.5 * (1.0 + g32.sum(0) / (jnp.abs(g32).sum(0) + _EPS))
      keep = ((purity > u) & (g32 > 0)) | ((purity < u) & (g32 < 0))
      out.append(jnp.where(keep, g32, 0.0).sum(0).astype(g.dtype))
    return treedef.unflatten(out), jnp.ones((self.num_tasks,), jnp.float32), state
