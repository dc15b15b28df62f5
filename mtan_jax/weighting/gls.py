"""GLS: geometric loss strategy.

Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019, arXiv:1904.08492.

total = (prod_t L_t)^(1/T), computed as exp(mean_t log max(L_t, 1e-8)) so that a product of
small losses does not underflow in float32. Its gradient is total / (T L_t) on each loss: the
tasks are weighted inversely to their current loss (LibMTL's `GLS`).

Hyper-parameters: none.

Deviations: losses below 1e-8 are clamped (zero gradient there) instead of giving log 0; the
epoch-level `weights` are ignored (a constant loss scale only rescales the total).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtan_jax.weighting.base import Method, MethodState

_EPS = 1e-8


class GLS(Method):
  """Geometric mean of the task losses (see the module docstring)."""

  name = 'gls'
  defaults = {}

  def loss(self, losses: jax.Array, weights: jax.Array, state: MethodState, key: jax.Array,
           logsigma: jax.Array) -> tuple[jax.Array, MethodState]:
    del weights, key, logsigma
    return jnp.exp(jnp.mean(jnp.log(jnp.maximum(losses, _EPS)))), state
