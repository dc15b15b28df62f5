"""RLW: random loss weighting.

Lin, Ye, Zhang, Tsang, Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", TMLR 2022, arXiv:2111.10603.

Each step draws lambda ~ N(0, I_T) from the step's key and weights the losses with
w = softmax(lambda): total = sum_t w_t L_t (LibMTL's `RLW`, its default normal distribution).
The epoch-level `weights` (ones unless the framework scales the losses) multiply the losses
first, as in the default weighted sum.

Hyper-parameters: none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtan_jax.weighting.base import Method, MethodState


def random_weights(key: jax.Array, num_tasks: int) -> jax.Array:
  """softmax of a standard normal draw (T,), the step's loss weights."""
  return jax.nn.softmax(jax.random.normal(key, (num_tasks,), jnp.float32))


class RLW(Method):
  """Random loss weighting (see the module docstring)."""

  name = 'rlw'
  defaults = {}

  def loss(self, losses: jax.Array, weights: jax.Array, state: MethodState, key: jax.Array,
           logsigma: jax.Array) -> tuple[jax.Array, MethodState]:
    del logsigma
    w = random_weights(key, self.num_tasks)
    return jnp.sum(w * jax.lax.stop_gradient(weights) * losses), state
