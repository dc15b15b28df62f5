"""The MTAN paper's weightings: equal, fixed, Dynamic Weight Average and uncertainty.

- equal: total = sum_k L_k.
- fixed: total = sum_k w_k L_k with constant weights from `config.task_weights` (the pet
  seed's 0.7 / 0.1 / 0.2 for segmentation / species / box).
- dwa (Liu, Johns, Davison, CVPR 2019): total = sum_k lambda_k L_k with lambda_k(t) set at
  each epoch end from the last two epochs' average losses (`mtan_jax.weighting.epochs`);
  hyper-parameter `config.dwa_temperature` (T = 2, the paper's).
- uncertainty (Kendall, Gal, Cipolla, CVPR 2018, as in the MTAN reference):
  total = sum_k L_k / (2 exp(s_k)) + s_k / 2 with the model's learned `logsigma` s_k
  (initialised to -0.5). The total may go negative; that is expected.

The first three are `Method.loss`'s weighted sum of the epoch-level weights (all ones for
equal, constant for fixed, DWA's lambdas); only uncertainty overrides it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtan_jax.weighting.base import Method, MethodState


class Equal(Method):
  name = 'equal'


class Fixed(Method):
  name = 'fixed'


class DWA(Method):
  name = 'dwa'


class Uncertainty(Method):
  name = 'uncertainty'

  def loss(self, losses: jax.Array, weights: jax.Array, state: MethodState, key: jax.Array,
           logsigma: jax.Array) -> tuple[jax.Array, MethodState]:
    del weights, key
    return jnp.sum(losses / (2.0 * jnp.exp(logsigma)) + logsigma / 2.0), state
