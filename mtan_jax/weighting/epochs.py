"""The epoch-level bookkeeping every weighting shares: per-epoch loss averages and DWA.

All state lives in a small pytree of arrays inside the train state, so switching weights
between epochs never recompiles the train step and the state is checkpointed with the rest.
Every method accumulates its unweighted per-step losses here (the per-epoch training-loss
curves come from it); DWA sets next epoch's weights from them, 'fixed' holds its constant
weights in `weights`, and every other method leaves `weights` at ones.

DWA (Liu et al. 2019): lambda_k(t) = K exp(w_k(t-1)/T) / sum_i exp(w_i(t-1)/T) with
w_k(t-1) = L_k(t-1) / L_k(t-2), L_k(t) the unweighted average training loss of epoch t (the
mean of the per-step losses, as the reference computes it); lambda = 1 for the first two epochs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtan_jax.errors import ConfigError

WeightingState = dict[str, Any]


def check_weights(method: str, task_weights, task_names) -> tuple[float, ...] | None:
  """Validates `config.task_weights` for `method`; returns them for 'fixed', else None."""
  weights = tuple(float(w) for w in (task_weights or ()))
  if method != 'fixed':
    if weights:
      raise ConfigError(f'config.task_weights={weights} is only used with config.weighting=fixed '
                        f'(weighting is {method!r}); leave it empty')
    return None
  if len(weights) != len(task_names):
    raise ConfigError(f'config.task_weights={weights} has {len(weights)} weights but config.tasks '
                      f'has {len(task_names)} tasks {tuple(task_names)}; give one weight per task')
  if any(not w >= 0 for w in weights) or not any(weights):
    raise ConfigError(f'config.task_weights={weights}; expected non-negative weights, not all 0')
  return weights


def init_state(num_tasks: int, weights=None) -> WeightingState:
  """Fresh weighting state for `num_tasks` tasks (`weights`: the fixed weights, or ones)."""
  initial = jnp.ones((num_tasks,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  return {
      'weights': initial,
      # Running sums of this epoch's unweighted per-step losses.
      'epoch_loss_sum': jnp.zeros((num_tasks,), jnp.float32),
      'epoch_steps': jnp.zeros((), jnp.int32),
      # Average losses of the last two finished epochs: row 0 = t-2, row 1 = t-1.
      'loss_history': jnp.zeros((2, num_tasks), jnp.float32),
      'epochs_done': jnp.zeros((), jnp.int32),
  }


def accumulate(state: WeightingState, losses: jax.Array) -> WeightingState:
  """Adds one step's unweighted losses to the epoch averages."""
  return {**state,
          'epoch_loss_sum': state['epoch_loss_sum'] + jax.lax.stop_gradient(losses).astype(jnp.float32),
          'epoch_steps': state['epoch_steps'] + 1}


def dwa_weights(history: jax.Array, temperature: float) -> jax.Array:
  """DWA weights from the last two epoch-average losses (rows t-2, t-1)."""
  ratio = history[1] / history[0]
  k = history.shape[1]
  return k * jax.nn.softmax(ratio / temperature)


def end_epoch(method: str, state: WeightingState, temperature: float) -> WeightingState:
  """Closes an epoch: records its average losses and sets the next epoch's weights."""
  avg = state['epoch_loss_sum'] / jnp.maximum(state['epoch_steps'], 1).astype(jnp.float32)
  history = jnp.stack([state['loss_history'][1], avg])
  epochs_done = state['epochs_done'] + 1
  weights = state['weights']
  if method == 'dwa':
    weights = jnp.where(epochs_done >= 2, dwa_weights(history, temperature), jnp.ones_like(weights))
  return {
      **state,  # Keeps the method's own state ('method').
      'weights': weights,
      'epoch_loss_sum': jnp.zeros_like(state['epoch_loss_sum']),
      'epoch_steps': jnp.zeros_like(state['epoch_steps']),
      'loss_history': history,
      'epochs_done': epochs_done,
  }
