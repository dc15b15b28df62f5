"""Model construction, the train state, and the jitted train / eval steps.

The NNX model is split once into a static graph definition and array state; the steps are
pure functions of arrays (the NNX performance guide's recommendation for hot loops), so one
`jax.jit` with a donated state serves the whole run. Everything that changes during training
(task weights, DWA history, learning-rate step, non-finite flag) is an array in the state:
nothing retraces after the first step. This module does not import TensorFlow.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtan_jax import weighting
from mtan_jax.errors import ConfigError
from mtan_jax.models.mtan import MTAN
from mtan_jax.models.segnet import DEFAULT_HEAD_HIDDEN, SegNet
from mtan_jax.tasks import Task, safe_mean

MODELS = ('mtan', 'segnet')
# float64 is for numerical checks (device-count and multi-host equality tests, parity
# studies): it needs `jax_enable_x64`, which `train_and_evaluate` turns on for it.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and checkpoints)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  weighting: dict[str, jax.Array]
  # First step whose loss was NaN/Inf, or -1. Checked on the host only at log/save points.
  nonfinite_step: jax.Array


TASK_STACKING = ('auto', 'stacked', 'loop')


def stack_tasks_for(task_stacking: str, backend: str | None = None) -> bool:
  """Resolves `config.task_stacking` to MTAN's `stack_tasks` flag.

  'auto' stacks on GPU and TPU but not on CPU, where the stacked path measured 7-13% slower
  than the task loop (benchmarks/NOTES.md); on accelerators stacking issues a third fewer ops
  per step, a predicted gain that was not yet measured on a GPU.
  """
  if task_stacking not in TASK_STACKING:
    raise ConfigError(f'unknown config.task_stacking={task_stacking!r}; expected one of '
                      f'{", ".join(TASK_STACKING)}')
  if task_stacking == 'auto':
    return (backend or jax.default_backend()) != 'cpu'
  return task_stacking == 'stacked'


def create_model(name: str, tasks: Sequence[Task], widths: Sequence[int], seed: int,
                 dtype: str = 'float32', in_channels: int = 3,
                 task_stacking: str = 'auto', image_size: Sequence[int] | None = None,
                 head_hidden: int = DEFAULT_HEAD_HIDDEN) -> nnx.Module:
  """Builds 'mtan' (all tasks) or 'segnet' (single-task baseline, or hard-shared multi-task)
  with the reference's init.

  `task_stacking` ('auto', 'stacked', 'loop') picks how MTAN runs its attention path; the
  two give the same results up to rounding (see `stack_tasks_for`). `image_size` (H, W) and
  `head_hidden` size the heads of image-level tasks.
  """
  if dtype not in DTYPES:
    raise ConfigError(f'unknown config.dtype={dtype!r}; expected one of {", ".join(DTYPES)}')
  if dtype == 'float64' and not jax.config.jax_enable_x64:
    raise ConfigError('config.dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 or '
                      'jax.config.update("jax_enable_x64", True) before anything else')
  rngs = nnx.Rngs(seed)
  if name == 'mtan':
    return MTAN(tasks, widths, in_channels, rngs=rngs, dtype=DTYPES[dtype],
                stack_tasks=stack_tasks_for(task_stacking), image_size=image_size,
                head_hidden=head_hidden)
  if name == 'segnet':
    return SegNet(tasks, widths, in_channels, rngs=rngs, dtype=DTYPES[dtype],
                  image_size=image_size, head_hidden=head_hidden)
  raise ConfigError(f'unknown config.model={name!r}; expected one of {", ".join(MODELS)}')


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (nnx.Param leaves; BatchNorm statistics excluded), as the reference
  counts them. Works on abstract models (`nnx.eval_shape`) too."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def lr_schedule(lr: float, steps_per_epoch: int, decay_every_epochs: int,
                decay_factor: float) -> optax.Schedule:
  """PyTorch's StepLR as an optax schedule: lr * decay_factor ** (epoch // decay_every_epochs).

  Use it with `optax.adam(schedule)`: optax's Adam defaults (b1 0.9, b2 0.999, eps 1e-8 added
  outside the square root) equal torch.optim.Adam's, as in the reference.
  """
  if decay_every_epochs > 0:
    return optax.exponential_decay(lr, transition_steps=decay_every_epochs * steps_per_epoch,
                                   decay_rate=decay_factor, staircase=True)
  return optax.constant_schedule(lr)


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with the config's StepLR schedule; returns (optimizer, schedule).

  Everything that builds a train state uses this, so checkpointed optimizer states always
  have the same structure.
  """
  schedule = lr_schedule(config.lr, steps_per_epoch, config.lr_decay_every_epochs, config.lr_decay_factor)
  return optax.adam(schedule), schedule


class Steps:
  """The pure functions a training run jits, bound to one model structure and optimizer.

  Args:
    model: the NNX model (its arrays are only used to initialise the state).
    tx: the optax optimizer.
    method: task weighting ('equal', 'fixed', 'dwa', 'uncertainty').
    dwa_temperature: DWA temperature T.
    task_weights: the per-task weights of 'fixed'.
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, method: str,
               dwa_temperature: float = 2.0, task_weights: Sequence[float] = ()):
    self.tasks: tuple[Task, ...] = tuple(model.tasks)
    self.method = weighting.check_method(method)
    self.task_weights = weighting.check_weights(self.method, task_weights,
                                                [t.name for t in self.tasks])
    if self.method == 'uncertainty' and not hasattr(model, 'logsigma'):
      raise ConfigError('config.weighting=uncertainty needs a model with per-task log-sigma (mtan)')
    self.tx = tx
    self.dwa_temperature = float(dwa_temperature)
    self.graphdef, self._params, self._batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    eval_view = nnx.view(model, use_running_average=True)
    self.eval_graphdef = nnx.split(eval_view, nnx.Param, nnx.BatchStat)[0]
    # FSDP (mtan_jax.sharding): where parameters live sharded, the step gathers them whole
    # for the forward pass and hands gradients back in the sharded layout (a reduce-scatter).
    self.gathered_params_sharding: Any = None
    self.params_sharding: Any = None

  def init_state(self) -> TrainState:
    """A fresh train state holding the model's initial arrays (a concrete model only)."""
    return self.state_from_model(nnx.merge(self.graphdef, self._params, self._batch_stats))

  def state_from_model(self, model: nnx.Module) -> TrainState:
    """The initial train state of `model`; pure, so it can run under `jax.jit` with output
    shardings and build the state directly on the devices (see `mtan_jax.sharding`)."""
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=batch_stats, opt_state=self.tx.init(params),
                      weighting=weighting.init_state(len(self.tasks), self.task_weights),
                      nonfinite_step=jnp.full((), -1, jnp.int32))

  def model(self, params, batch_stats, train: bool) -> nnx.Module:
    """A model view over the given arrays (train mode updates BatchNorm statistics)."""
    return nnx.merge(self.graphdef if train else self.eval_graphdef, params, batch_stats)

  def task_losses(self, preds: Sequence[jax.Array], batch) -> jax.Array:
    return jnp.stack([safe_mean(*task.loss(pred, batch)) for task, pred in zip(self.tasks, preds)])

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on `batch` (a dict with 'image' and each task's target)."""

    def loss_fn(params, batch_stats):
      # Fresh Variables at this trace level: NNX refuses to mutate (BatchNorm statistics)
      # Variables that were created by an outer trace.
      batch_stats = jax.tree.map(lambda x: x, batch_stats)
      model = self.model(params, batch_stats, train=True)
      preds = model(batch['image'])
      losses = self.task_losses(preds, batch)
      logsigma = model.logsigma[...] if hasattr(model, 'logsigma') else jnp.zeros_like(losses)
      total = weighting.combine(self.method, losses, state.weighting, logsigma)
      return total, (losses, nnx.state(model, nnx.BatchStat))

    params = state.params
    if self.gathered_params_sharding is not None:
      params = jax.lax.with_sharding_constraint(params, self.gathered_params_sharding)
    (total, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state.batch_stats)
    if self.params_sharding is not None:
      grads = jax.lax.with_sharding_constraint(grads, self.params_sharding)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(total) & jnp.all(jnp.isfinite(losses))
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state,
                              weighting=weighting.accumulate(state.weighting, losses),
                              nonfinite_step=nonfinite_step)
    return new_state, {'loss': total, 'task_losses': losses}

  def end_epoch(self, state: TrainState) -> TrainState:
    """Closes an epoch: DWA's loss history and next-epoch weights."""
    return state.replace(weighting=weighting.end_epoch(self.method, state.weighting, self.dwa_temperature))

  def predict(self, params, batch_stats, images: jax.Array) -> list[jax.Array]:
    """Evaluation-mode predictions (BatchNorm running statistics)."""
    return self.model(params, batch_stats, train=False)(images)

  def eval_step(self, params, batch_stats, batch) -> dict[str, dict[str, jax.Array]]:
    """Metric sums for one (possibly padded) evaluation batch; they add up across batches."""
    preds = self.predict(params, batch_stats, batch['image'])
    mask = batch['mask']
    return {task.name: task.stats(pred, batch, mask) for task, pred in zip(self.tasks, preds)}


def jit_steps(steps: Steps) -> tuple[Callable, Callable, Callable]:
  """(train_step, end_epoch, eval_step) jitted; the state is donated so it updates in place."""
  train_step = jax.jit(steps.train_step, donate_argnums=0)
  end_epoch = jax.jit(steps.end_epoch, donate_argnums=0)
  eval_step = jax.jit(steps.eval_step)
  return train_step, end_epoch, eval_step
