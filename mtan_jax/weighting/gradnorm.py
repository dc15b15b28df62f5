"""GradNorm: gradient normalisation for adaptive loss balancing.

Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018, arXiv:1711.02257.

Learned task weights w (T,), initialised to ones. Each step, from the Gram diagonal:
  G_t = w_t |g_t|                        (weighted gradient norm on the shared parameters)
  r_t = (L_t / L_t(0)) / mean_k (L_k / L_k(0))   (relative inverse training rate)
  target_t = mean_k(G_k) r_t^alpha       (held constant)
  L_grad = sum_t |G_t - target_t|
then one Adam step on w along dL_grad/dw, w is floored at 1e-4 and renormalised to
sum_t w_t = T. L(0) are the first step's losses (recorded in the state on step 0).

The shared update of this step is sum_t w_t g_t with the weights *before* this step's GradNorm
update, as in LibMTL (its `backward` returns and applies the current weights; the optimiser
moves them afterwards). The weights returned for logging are those same pre-update weights.

Hyper-parameters:
  alpha (1.5): restoring-force strength; the paper's NYUv2 value, also LibMTL's default.
  lr (0.025): Adam learning rate of w. The paper does not give one; 0.025 is the learning
    rate the Nash-MTL / FAMO code uses for learned weighting parameters. Adam b1 0.9,
    b2 0.999, eps 1e-8 (optax/torch defaults).

State: w (T,), the optax Adam state, L(0) (T,), `started` (int32 0/1).

Deviations: gradients of all shared parameters rather than of the last shared layer (the
paper's cheaper choice; LibMTL also uses all shared parameters). LibMTL parametrises
w = T softmax(logits), uses equal weights in the first epoch and takes L(0) as the first
epoch's average loss; we follow the paper (direct w, renormalised; L(0) of step 0). The floor
1e-4 before renormalising keeps w positive when an Adam step overshoots.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, MethodState, task_norms

_MIN_WEIGHT = 1e-4
_EPS = 1e-8


class GradNorm(GradientMethod):
  """GradNorm with Adam on the task weights (see the module docstring)."""

  name = 'gradnorm'
  defaults = {'alpha': 1.5, 'lr': 0.025}

  def check(self) -> None:
    if not self.hp['alpha'] >= 0.0:
      raise ConfigError(f'config.weighting_params: {self.name}.alpha={self.hp["alpha"]}; '
                        'expected a number >= 0 (paper 1.5)')
    if not self.hp['lr'] > 0.0:
      raise ConfigError(f'config.weighting_params: {self.name}.lr={self.hp["lr"]}; '
                        'expected a learning rate > 0 (default 0.025)')

  def _optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.hp['lr'])

  def init_state(self, shared_params: Any) -> MethodState:
    del shared_params
    w = jnp.ones((self.num_tasks,), jnp.float32)
    return {'w': w, 'opt_state': self._optimizer().init(w),
            'initial_losses': jnp.ones((self.num_tasks,), jnp.float32),
            'started': jnp.zeros((), jnp.int32)}

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del key
    num_tasks = self.num_tasks
    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
    norms = task_norms(gram.astype(jnp.float32))
    started = state['started'] > 0
    initial = jnp.where(started, state['initial_losses'], losses)
    ratio = losses / (initial + _EPS)
    rel_rate = ratio / (ratio.mean() + _EPS)
    w = state['w']
    target = (w * norms).mean() * rel_rate ** self.hp['alpha']

    def grad_loss(weights):
      return jnp.abs(weights * norms - target).sum()

    grad = jax.grad(grad_loss)(w)
    updates, opt_state = self._optimizer().update(grad, state['opt_state'], w)
    new_w = jnp.maximum(optax.apply_updates(w, updates), _MIN_WEIGHT)
    new_w = num_tasks * new_w / new_w.sum()
    return w, {'w': new_w, 'opt_state': opt_state, 'initial_losses': initial,
               'started': jnp.ones((), jnp.int32)}
