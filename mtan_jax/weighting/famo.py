"""FAMO: Fast Adaptive Multitask Optimization (loss-based).

Liu, Liu, Stone, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023,
arXiv:2306.03792.

Task logits xi (T,), initialised to 0, z = softmax(xi). With D_t = L_t - min_L_t + 1e-8
(min_L = 0), the differentiated total is
  total = sum_t z_t log D_t / c,   c = sum_t z_t / D_t (held constant),
so the model moves along sum_t (z_t / (c D_t)) grad L_t. The logits learn from the decrease of
the log losses between consecutive steps,
  delta = log D(previous step) - log D(this step),   d xi = J_softmax(xi)^T delta,
with Adam(w_lr) on xi and torch-style (L2, added to the gradient) weight decay gamma, i.e.
`optax.chain(optax.add_decayed_weights(gamma), optax.adam(w_lr))`. Each call first updates
xi from the previous step's losses (when there is one), then weights this step's losses.

Hyper-parameters:
  w_lr (0.025): learning rate of xi; the authors' default (`famo.py`, `--method-params-lr`)
    and LibMTL's FAMO_w_lr.
  gamma (0.001): weight decay of xi; LibMTL's FAMO_w_gamma and the authors' QM9 script. The
    authors' `famo.py` / argparse default and their CelebA script use 0.01.

State: xi (T,), the optax state, the previous step's losses (T,), `has_prev` (int32 0/1).

Deviations: the authors (and LibMTL's trainer) recompute the losses on the same batch after
the model update (an extra forward pass) and update xi right away; we use the next step's
losses (a new batch) instead, so xi lags one step and no extra forward is needed. The
authors' `max_norm=1` gradient clipping of the shared parameters is not part of this method
(use the optimiser's clipping). Negative losses are clamped to 0 before the log (FAMO assumes
L >= min_L). The epoch-level `weights` are ignored: FAMO sets its own weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import Method, MethodState

_EPS = 1e-8


class FAMO(Method):
  """Fast Adaptive Multitask Optimization (see the module docstring)."""

  name = 'famo'
  defaults = {'w_lr': 0.025, 'gamma': 0.001}

  def check(self) -> None:
    if not self.hp['w_lr'] > 0.0:
      raise ConfigError(f'config.weighting_params: {self.name}.w_lr={self.hp["w_lr"]}; '
                        'expected a learning rate > 0 (authors 0.025)')
    if not self.hp['gamma'] >= 0.0:
      raise ConfigError(f'config.weighting_params: {self.name}.gamma={self.hp["gamma"]}; '
                        'expected a weight decay >= 0 (LibMTL 0.001)')

  def _optimizer(self) -> optax.GradientTransformation:
    return optax.chain(optax.add_decayed_weights(self.hp['gamma']), optax.adam(self.hp['w_lr']))

  def init_state(self, shared_params: Any) -> MethodState:
    del shared_params
    logits = jnp.zeros((self.num_tasks,), jnp.float32)
    return {'logits': logits, 'opt_state': self._optimizer().init(logits),
            'prev_losses': jnp.zeros((self.num_tasks,), jnp.float32),
            'has_prev': jnp.zeros((), jnp.int32)}

  def loss(self, losses: jax.Array, weights: jax.Array, state: MethodState, key: jax.Array,
           logsigma: jax.Array) -> tuple[jax.Array, MethodState]:
    del weights, key, logsigma
    current = jax.lax.stop_gradient(losses).astype(jnp.float32)
    logits = state['logits']
    delta = (jnp.log(jnp.maximum(state['prev_losses'], 0.0) + _EPS)
             - jnp.log(jnp.maximum(current, 0.0) + _EPS))
    _, softmax_vjp = jax.vjp(jax.nn.softmax, logits)
    (grad,) = softmax_vjp(delta)
    updates, opt_state = self._optimizer().update(grad, state['opt_state'], logits)
    has_prev = state['has_prev'] > 0
    # On the first step there is no previous loss: leave xi and Adam's moments/count alone.
    logits = jnp.where(has_prev, optax.apply_updates(logits, updates), logits)
    opt_state = jax.tree.map(lambda new, old: jnp.where(has_prev, new, old),
                             opt_state, state['opt_state'])

    z = jax.nn.softmax(logits)
    d = jnp.maximum(losses.astype(jnp.float32), 0.0) + _EPS
    c = jax.lax.stop_gradient((z / d).sum())
    total = (z * jnp.log(d)).sum() / c
    return total, {'logits': logits, 'opt_state': opt_state, 'prev_losses': current,
                   'has_prev': jnp.ones((), jnp.int32)}
