"""The interface every task-weighting method implements, and the Gram-matrix helpers.

A method is a small class. Loss-based methods turn the per-task losses (T,) into the total
that is differentiated (`Method.loss`). Gradient-based methods (`gradient = True`) receive the
per-task gradients of the *shared* parameters, computed in the same compiled step by one
forward pass and a backward pass vmapped over the T one-hot cotangents (`mtan_jax.steps`),
and return the update for the shared parameters (`GradientMethod.combine`). Task-specific
parameters (heads, per-task attention, log-sigma) always receive the sum of their tasks'
gradients, as in LibMTL.

Most gradient methods only need the T x T Gram matrix G_ij = <g_i, g_j> of the task
gradients: their update is a linear combination sum_t w_t g_t whose weights follow from G
(PCGrad's and GradVac's projections stay in the span of the g_t, and norms are sqrt(w^T G w)).
They implement `GradientMethod.weights(gram, ...)` on small arrays; the T x T solve runs on
device inside the jit with a fixed iteration count. The one reduction over the parameters
(the Gram matrix) and the one weighted sum are shared code here, and under data parallelism
the gradients are already the global-batch gradients (XLA reduces them across devices) when
the method sees them.

Every method's state is a dict of arrays (possibly empty) kept in the train state, so it is
checkpointed and nothing retraces. Randomness comes from `key`, derived from the run's seed
and the step, so a resumed run draws the same numbers.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from mtan_jax.errors import ConfigError

MethodState = dict[str, Any]


class Method:
  """A loss-based method; subclasses set `name`, `defaults` and override `loss` / `init_state`.

  Args:
    num_tasks: T.
    **hparams: overrides of `defaults` (unknown names raise ConfigError).
  """

  name: ClassVar[str] = ''
  gradient: ClassVar[bool] = False
  # Hyper-parameters and their defaults (from the method's paper or its public code).
  defaults: ClassVar[Mapping[str, float]] = {}
  # Most tasks the method supports (exact solvers that enumerate 2^T cases), or None.
  max_tasks: ClassVar[int | None] = None

  def __init__(self, num_tasks: int, **hparams: float):
    unknown = sorted(set(hparams) - set(self.defaults))
    if unknown:
      known = ', '.join(sorted(self.defaults)) or 'none'
      raise ConfigError(f'config.weighting_params: {self.name} has no hyper-parameter '
                        f'{", ".join(map(repr, unknown))}; it takes: {known}')
    if num_tasks < 1:
      raise ConfigError(f'{self.name} needs at least one task, got {num_tasks}')
    if self.max_tasks is not None and num_tasks > self.max_tasks:
      raise ConfigError(f'{self.name}\'s exact solver enumerates 2^T cases; {num_tasks} tasks is '
                        f'more than the {self.max_tasks} it supports')
    self.num_tasks = int(num_tasks)
    self.hp: dict[str, float] = dict(self.defaults)
    for k, v in hparams.items():
      try:
        self.hp[k] = float(v)
      except (TypeError, ValueError):
        raise ConfigError(f'config.weighting_params: {self.name}.{k}={v!r} is not a number') from None
    self.check()

  def check(self) -> None:
    """Validates `self.hp` (ConfigError naming the hyper-parameter); override as needed."""

  def init_state(self, shared_params: Any) -> MethodState:
    """The method's own state; `shared_params` (shapes of the shared parameters) sizes
    per-parameter buffers."""
    del shared_params
    return {}

  def loss(self, losses: jax.Array, weights: jax.Array, state: MethodState, key: jax.Array,
           logsigma: jax.Array) -> tuple[jax.Array, MethodState]:
    """Total loss to differentiate from the per-task losses (T,).

    `weights` are the epoch-level weights of the shared bookkeeping (ones, the fixed weights
    or DWA's lambdas); the default is their weighted sum.
    """
    del key, logsigma
    return jnp.sum(jax.lax.stop_gradient(weights) * losses), state


class GradientMethod(Method):
  """A method acting on the per-task gradients of the shared parameters."""

  gradient: ClassVar[bool] = True

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    """Combination weights w (T,) of the task gradients from their Gram matrix (T, T)."""
    raise NotImplementedError

  def combine(self, grads: Any, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[Any, jax.Array, MethodState]:
    """The shared parameters' update from their per-task gradients.

    Args:
      grads: pytree of the shared parameters' gradients, each leaf with a leading task axis T.
      losses: the per-task losses (T,) of this step.
      state: the method's state.
      key: a PRNG key for this step.

    Returns:
      (combined gradient pytree without the task axis, the effective per-task weights (T,)
      for logging, the new state).
    """
    w, state = self.weights(gram(grads), losses, state, key)
    return weighted_sum(w, grads), w, state


def _compute_dtype(dtype) -> Any:
  """float32, or float64 where the gradients are (numerical checks with 64-bit JAX)."""
  return jnp.promote_types(dtype, jnp.float32)


def gram(grads: Any) -> jax.Array:
  """G_ij = <g_i, g_j> summed over every leaf (leading axis T), in float32 or wider, at full
  matmul precision (a GPU's default TF32 would be too coarse for the methods' solves)."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ConfigError('a gradient-based weighting method needs shared parameters; the model has none')
  total = 0.0
  for g in leaves:
    flat = g.reshape(g.shape[0], -1).astype(_compute_dtype(g.dtype))
    total = total + jnp.einsum('tp,sp->ts', flat, flat, precision=jax.lax.Precision.HIGHEST)
  return total


def weighted_sum(w: jax.Array, grads: Any) -> Any:
  """sum_t w_t g_t for each leaf (leading axis T), elementwise (no reduced-precision matmul)."""
  def one(g):
    dtype = _compute_dtype(g.dtype)
    scale = w.astype(dtype).reshape((-1,) + (1,) * (g.ndim - 1))
    return jnp.sum(scale * g.astype(dtype), axis=0).astype(g.dtype)
  return jax.tree.map(one, grads)


def task_norms(gram_matrix: jax.Array) -> jax.Array:
  """||g_t|| from the Gram matrix."""
  return jnp.sqrt(jnp.maximum(jnp.diagonal(gram_matrix), 0.0))
