"""Model construction, the train state, and the jitted train / eval steps.

The NNX model is split once into a static graph definition and array state; the steps are
pure functions of arrays (the NNX performance guide's recommendation for hot loops), so one
`jax.jit` with a donated state serves the whole run. Everything that changes during training
(task weights, DWA history, learning-rate step, non-finite flag) is an array in the state:
nothing retraces after the first step. Gradient-based weighting methods get the per-task
gradients of the shared parameters from the same step: one forward pass and a backward pass
vmapped over the T one-hot cotangents (`Steps._gradient_step`). This module does not import
TensorFlow.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mtan_jax import weighting
from mtan_jax.errors import ConfigError
from mtan_jax.models import baselines
from mtan_jax.models.mtan import MTAN
from mtan_jax.models.resnet_mtan import ResNetMTAN
from mtan_jax.models.segnet import DEFAULT_HEAD_HIDDEN, SegNet
from mtan_jax.tasks import Task, safe_mean

# config.model -> what it builds (see create_model).
MODELS = ('mtan', 'segnet', 'split', 'split_wide', 'split_deep', 'dense', 'cross_stitch',
          'mtan_resnet50')
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
  # First step whose loss or gradient was NaN/Inf, or -1; checked on the host only at log
  # and save points. `nonfinite_task`: the first task whose loss broke there (T: the losses
  # were finite but the gradients were not). `nonfinite_count`: steps not applied so far.
  nonfinite_step: jax.Array
  nonfinite_task: jax.Array
  nonfinite_count: jax.Array


TASK_STACKING = ('auto', 'stacked', 'loop')
PER_TASK_GRADS = ('vmap', 'sequential')
# config.nonfinite: what a step whose loss or gradient is NaN/Inf does (it is never applied).
NONFINITE = ('stop', 'skip')


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
  """Builds `name` (one of MODELS) with the reference's init.

  'mtan': SegNet-MTAN; 'segnet': the single-task baseline (with several tasks, hard sharing);
  'split', 'split_wide', 'split_deep', 'dense', 'cross_stitch': the MTAN paper's multi-task
  baselines (`mtan_jax.models.baselines`; STAN is 'mtan' with one task); 'mtan_resnet50':
  MTAN on a dilated ResNet-50 with DeepLabv3 heads (`mtan_jax.models.resnet_mtan`; widths[0]
  is its base width, head_hidden its ASPP width).

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
  common = dict(rngs=rngs, dtype=DTYPES[dtype], image_size=image_size, head_hidden=head_hidden)
  if name == 'mtan':
    return MTAN(tasks, widths, in_channels, stack_tasks=stack_tasks_for(task_stacking), **common)
  if name == 'segnet':
    return SegNet(tasks, widths, in_channels, **common)
  if name.startswith('split'):
    variant = {'split': 'standard', 'split_wide': 'wide', 'split_deep': 'deep'}.get(name)
    if variant:
      return baselines.Split(tasks, widths, in_channels, variant=variant, **common)
  if name == 'dense':
    return baselines.Dense(tasks, widths, in_channels, **common)
  if name == 'cross_stitch':
    return baselines.CrossStitch(tasks, widths, in_channels, **common)
  if name == 'mtan_resnet50':
    return ResNetMTAN(tasks, widths, in_channels, **common)
  raise ConfigError(f'unknown config.model={name!r}; expected one of {", ".join(MODELS)}')


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (nnx.Param leaves; BatchNorm statistics excluded), as the reference
  counts them. Works on abstract models (`nnx.eval_shape`) too."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def lr_schedule(lr: float, steps_per_epoch: int, decay_every_epochs: int,
                decay_factor: float) -> optax.Schedule:
  """PyTorch's StepLR as an optax schedule: lr * decay_factor ** (epoch // decay_every_epochs).

  Training uses `adam`, which computes the same rates from optimizer state; this function is
  the host-side value for logs and tests. optax's Adam defaults (b1 0.9, b2 0.999, eps 1e-8
  added outside the square root) equal torch.optim.Adam's, as in the reference.
  """
  if decay_every_epochs > 0:
    return optax.exponential_decay(lr, transition_steps=decay_every_epochs * steps_per_epoch,
                                   decay_rate=decay_factor, staircase=True)
  return optax.constant_schedule(lr)


def _adam_step_lr(learning_rate, decay_factor, decay_steps) -> optax.GradientTransformation:
  """Adam with PyTorch's StepLR: learning_rate * decay_factor ** (step // decay_steps)."""
  return optax.chain(optax.scale_by_adam(),
                     optax.scale_by_schedule(lambda count: -learning_rate * decay_factor ** (count // decay_steps)))


def adam(lr: float, decay_every_steps: int = 0, decay_factor: float = 1.0) -> optax.GradientTransformation:
  """Adam (torch.optim.Adam's defaults) with a StepLR schedule whose numbers are optimizer state.

  `optax.inject_hyperparams` keeps the learning rate, decay factor and decay interval as
  arrays in the optimizer state instead of constants in the compiled step, so runs that
  differ only in them share one executable (and the persistent compilation cache).
  `decay_every_steps=0` is a constant rate. `set_hyperparams` writes new values into a state.
  """
  if decay_every_steps <= 0:
    decay_every_steps, decay_factor = 1, 1.0
  return optax.inject_hyperparams(_adam_step_lr)(learning_rate=float(lr), decay_factor=float(decay_factor),
                                                 decay_steps=int(decay_every_steps))


def set_hyperparams(opt_state, lr: float, decay_every_steps: int = 0, decay_factor: float = 1.0):
  """`opt_state` (of `adam`) with these hyper-parameters; each array keeps its dtype and
  its placement (a replicated scalar on every device of a run)."""
  if decay_every_steps <= 0:
    decay_every_steps, decay_factor = 1, 1.0
  values = {'learning_rate': lr, 'decay_factor': decay_factor, 'decay_steps': decay_every_steps}

  def place(value, like):
    value = np.asarray(value, like.dtype)
    # From a callback: any sharding, also one spanning several processes.
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])

  hyperparams = {k: place(values[k], v) if k in values else v for k, v in opt_state.hyperparams.items()}
  return opt_state._replace(hyperparams=hyperparams)


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam with the config's StepLR schedule (`adam`); returns (optimizer, schedule), the
  schedule for logging the rate on the host.

  Everything that builds a train state uses this, so checkpointed optimizer states always
  have the same structure.
  """
  decay_steps = int(config.lr_decay_every_epochs) * steps_per_epoch
  schedule = lr_schedule(config.lr, steps_per_epoch, config.lr_decay_every_epochs, config.lr_decay_factor)
  return adam(config.lr, decay_steps, config.lr_decay_factor), schedule


def _first_key(path) -> str:
  key = path[0]
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def shared_mask(params: Any, task_specific: Sequence[str]) -> list[bool]:
  """Per leaf of `params` (flatten order): True where the parameter is shared by the tasks.

  A parameter is task-specific when its top-level attribute starts with one of the model's
  `TASK_SPECIFIC` prefixes (heads, per-task attention, log-sigma): only one task's loss
  reaches it. Gradient-based weighting methods act on the shared ones.
  """
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return [not _first_key(path).startswith(tuple(task_specific)) for path in paths]


class Steps:
  """The pure functions a training run jits, bound to one model structure and optimizer.

  Args:
    model: the NNX model (its arrays are only used to initialise the state).
    tx: the optax optimizer.
    method: task weighting (`mtan_jax.weighting.METHODS`).
    dwa_temperature: DWA temperature T.
    task_weights: the per-task weights of 'fixed'.
    weighting_params: the method's hyper-parameter overrides (`config.weighting_params`).
    seed: seeds the methods that draw random numbers (RLW, PCGrad's task order...), folded
      with the step so a resumed run draws the same numbers.
    per_task_grads: how gradient-based methods get the T per-task gradients from the one
      forward pass: 'vmap' (the T backward passes batched; fastest) or 'sequential' (one
      after another inside the step; less memory, as only one task's activation cotangents
      live at a time).
    nonfinite: a step whose loss or gradients hold a NaN or Inf is never applied (parameters,
      BatchNorm statistics, optimizer and weighting state stay as they were). 'stop': every
      later step is a no-op too, and the host stops the run at its next log or save point,
      naming the step and the task; 'skip': later steps go on and the skipped steps are
      counted (`nonfinite_count`, logged).
  """

  def __init__(self, model: nnx.Module, tx: optax.GradientTransformation, method: str,
               dwa_temperature: float = 2.0, task_weights: Sequence[float] = (),
               weighting_params: Any = None, seed: int = 0, per_task_grads: str = 'vmap',
               nonfinite: str = 'stop'):
    self.tasks: tuple[Task, ...] = tuple(model.tasks)
    self.method = weighting.check_method(method)
    self.task_weights = weighting.check_weights(self.method, task_weights,
                                                [t.name for t in self.tasks])
    if self.method == 'uncertainty' and not hasattr(model, 'logsigma'):
      raise ConfigError(f'config.weighting=uncertainty needs a model with per-task log-sigma; '
                        f'{type(model).__name__} has none (mtan, split*, dense, cross_stitch and '
                        f'mtan_resnet50 have it)')
    self.weighter = weighting.make(self.method, len(self.tasks), weighting_params)
    if per_task_grads not in PER_TASK_GRADS:
      raise ConfigError(f'unknown config.per_task_grads={per_task_grads!r}; expected one of '
                        f'{", ".join(PER_TASK_GRADS)}')
    self.per_task_grads = per_task_grads
    if nonfinite not in NONFINITE:
      raise ConfigError(f'unknown config.nonfinite={nonfinite!r}; expected one of {", ".join(NONFINITE)}')
    self.nonfinite = nonfinite
    self.seed = int(seed)
    self.tx = tx
    self.dwa_temperature = float(dwa_temperature)
    self.graphdef, self._params, self._batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    self.shared = shared_mask(self._params, getattr(model, 'TASK_SPECIFIC', ('pred_task', 'logsigma')))
    if self.weighter.gradient and not any(self.shared):
      raise ConfigError(f'config.weighting={self.method} acts on the parameters the tasks share, '
                        f'and this model has none')
    eval_view = nnx.view(model, use_running_average=True)
    self.eval_graphdef = nnx.split(eval_view, nnx.Param, nnx.BatchStat)[0]
    # FSDP (mtan_jax.sharding): where parameters live sharded, the step gathers them whole
    # for the forward pass and hands gradients back in the sharded layout (a reduce-scatter).
    self.gathered_params_sharding: Any = None
    self.params_sharding: Any = None

  def init_state(self) -> TrainState:
    """A fresh train state holding the model's initial arrays (a concrete model only)."""
    return self.state_from_model(nnx.merge(self.graphdef, self._params, self._batch_stats))

  def shared_params(self, params) -> list[Any]:
    """The shared parameters' leaves (flatten order), as the methods see them."""
    return [leaf for leaf, shared in zip(jax.tree.leaves(params), self.shared) if shared]

  def state_from_model(self, model: nnx.Module) -> TrainState:
    """The initial train state of `model`; pure, so it can run under `jax.jit` with output
    shardings and build the state directly on the devices (see `mtan_jax.sharding`)."""
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    shared = [jax.ShapeDtypeStruct(p.shape, p.dtype) for p in self.shared_params(params)]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=batch_stats, opt_state=self.tx.init(params),
                      weighting={**weighting.init_state(len(self.tasks), self.task_weights),
                                 'method': self.weighter.init_state(shared)},
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      nonfinite_task=jnp.full((), -1, jnp.int32),
                      nonfinite_count=jnp.zeros((), jnp.int32))

  def model(self, params, batch_stats, train: bool) -> nnx.Module:
    """A model view over the given arrays (train mode updates BatchNorm statistics)."""
    return nnx.merge(self.graphdef if train else self.eval_graphdef, params, batch_stats)

  def task_losses(self, preds: Sequence[jax.Array], batch) -> jax.Array:
    return jnp.stack([safe_mean(*task.loss(pred, batch)) for task, pred in zip(self.tasks, preds)])

  def _forward(self, params, batch_stats, batch):
    """Per-task losses (T,) of `batch`, the updated BatchNorm statistics and log-sigma."""
    # Fresh Variables at this trace level: NNX refuses to mutate (BatchNorm statistics)
    # Variables that were created by an outer trace.
    batch_stats = jax.tree.map(lambda x: x, batch_stats)
    model = self.model(params, batch_stats, train=True)
    losses = self.task_losses(model(batch['image']), batch)
    logsigma = model.logsigma[...] if hasattr(model, 'logsigma') else jnp.zeros_like(losses)
    return losses, nnx.state(model, nnx.BatchStat), logsigma

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimisation step on `batch` (a dict with 'image' and each task's target)."""
    key = jax.random.fold_in(jax.random.key(self.seed), state.step)
    params = state.params
    if self.gathered_params_sharding is not None:
      params = jax.lax.with_sharding_constraint(params, self.gathered_params_sharding)
    if self.weighter.gradient:
      grads, losses, total, batch_stats, method_state, extra = self._gradient_step(
          params, state, batch, key)
    else:
      grads, losses, total, batch_stats, method_state, extra = self._loss_step(
          params, state, batch, key)
    if self.params_sharding is not None:
      grads = jax.lax.with_sharding_constraint(grads, self.params_sharding)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    weighting_state = {**weighting.accumulate(state.weighting, losses), 'method': method_state}
    new_state = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                              weighting=weighting_state)
    # NaN/Inf: the step is not applied. One reduction per gradient leaf; `isfinite` rather
    # than a norm, which could overflow for large but finite gradients.
    losses_ok = jnp.isfinite(losses)
    grads_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    finite = jnp.all(losses_ok) & jnp.isfinite(total) & grads_ok
    apply = finite & (state.nonfinite_step < 0) if self.nonfinite == 'stop' else finite
    # A conditional, not an element-wise select over the whole state: the select's
    # dependence on every gradient makes XLA:CPU's compile time explode (minutes, not seconds).
    new_state = jax.lax.cond(apply, lambda: new_state, lambda: state)
    first = (state.nonfinite_step < 0) & ~finite
    bad_task = jnp.where(jnp.all(losses_ok), len(self.tasks), jnp.argmin(losses_ok)).astype(jnp.int32)
    new_state = new_state.replace(
        step=state.step + 1,
        nonfinite_step=jnp.where(first, state.step, state.nonfinite_step),
        nonfinite_task=jnp.where(first, bad_task, state.nonfinite_task),
        nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32))
    return new_state, {'loss': total, 'task_losses': losses, 'nonfinite_count': new_state.nonfinite_count,
                       **extra}

  def _loss_step(self, params, state: TrainState, batch, key):
    """Loss-based methods: one backward pass of the method's total."""
    weights = state.weighting['weights']

    def loss_fn(params, batch_stats):
      losses, batch_stats, logsigma = self._forward(params, batch_stats, batch)
      total, method_state = self.weighter.loss(losses, weights, state.weighting['method'], key, logsigma)
      return total, (losses, batch_stats, logsigma, jax.lax.stop_gradient(method_state))

    (total, (losses, batch_stats, logsigma, method_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, state.batch_stats)
    # The effective task weights d total / d L_t, for the logs (a T-sized side computation).
    effective = jax.grad(lambda l: self.weighter.loss(l, weights, state.weighting['method'], key,
                                                      jax.lax.stop_gradient(logsigma))[0])(
                                                          jax.lax.stop_gradient(losses))
    return grads, losses, total, batch_stats, method_state, {'task_weights': effective}

  def _gradient_step(self, params, state: TrainState, batch, key):
    """Gradient-based methods: per-task gradients from one forward pass and a backward pass
    vmapped over the T one-hot cotangents; the method combines the shared parameters' ones,
    the task-specific parameters get the sum (each only has its own task's gradient)."""
    losses, per_task, batch_stats = self._per_task_grads(params, state.batch_stats, batch)
    num_tasks = len(self.tasks)
    leaves, treedef = jax.tree.flatten(per_task)
    shared = [g for g, is_shared in zip(leaves, self.shared) if is_shared]
    combined, w, method_state = self.weighter.combine(shared, jax.lax.stop_gradient(losses),
                                                      state.weighting['method'], key)
    norms = _task_norms(shared, num_tasks)
    combined = iter(combined)
    grads = jax.tree.unflatten(treedef, [next(combined) if is_shared else g.sum(axis=0)
                                         for g, is_shared in zip(leaves, self.shared)])
    # What the log calls the loss for these methods: the unweighted sum (they weight gradients).
    total = jnp.sum(losses)
    return grads, losses, total, batch_stats, method_state, {'task_weights': w, 'grad_norms': norms}

  def _per_task_grads(self, params, batch_stats, batch):
    """(losses, per-task gradients with a leading task axis, updated BatchNorm statistics):
    one forward pass, then the backward pass vmapped over the T one-hot cotangents."""

    def losses_fn(params):
      losses, new_stats, _ = self._forward(params, batch_stats, batch)
      return losses, new_stats

    losses, vjp_fn, new_stats = jax.vjp(losses_fn, params, has_aux=True)
    cotangents = jnp.eye(len(self.tasks), dtype=losses.dtype)
    if self.per_task_grads == 'vmap':
      (per_task,) = jax.vmap(vjp_fn)(cotangents)
    else:
      # One backward pass after another (still one compiled step): the activations'
      # cotangents of one task at a time instead of T at once.
      (per_task,) = jax.lax.map(vjp_fn, cotangents)
    if self.params_sharding is not None:
      # FSDP: keep the T per-task gradients sharded like their parameters (task axis whole),
      # so that no device holds T whole copies; the Gram sums reduce across devices.
      per_task = jax.tree.map(
          lambda g, sh: jax.lax.with_sharding_constraint(
              g, NamedSharding(sh.mesh, PartitionSpec(None, *sh.spec))),
          per_task, self.params_sharding)
    return losses, per_task, new_stats

  def task_grad_norms(self, params, batch_stats, batch) -> jax.Array:
    """(T,) norms of each task's loss gradient over the shared parameters.

    Gradient-based methods log these from their step; for loss-based methods the loop calls
    this at log points only (`config.log_grad_norms`), since it costs T backward passes.
    """
    if self.gathered_params_sharding is not None:
      params = jax.lax.with_sharding_constraint(params, self.gathered_params_sharding)
    _, per_task, _ = self._per_task_grads(params, batch_stats, batch)
    shared = [g for g, is_shared in zip(jax.tree.leaves(per_task), self.shared) if is_shared]
    return _task_norms(shared, len(self.tasks))

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


def _task_norms(shared: Sequence[jax.Array], num_tasks: int) -> jax.Array:
  """Per-task gradient norms over the shared parameters (what a gradient method sees)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(num_tasks, -1).astype(jnp.float32)), axis=1)
                      for g in shared))


def jit_steps(steps: Steps) -> tuple[Callable, Callable, Callable]:
  """(train_step, end_epoch, eval_step) jitted; the state is donated so it updates in place."""
  train_step = jax.jit(steps.train_step, donate_argnums=0)
  end_epoch = jax.jit(steps.end_epoch, donate_argnums=0)
  eval_step = jax.jit(steps.eval_step)
  return train_step, end_epoch, eval_step
