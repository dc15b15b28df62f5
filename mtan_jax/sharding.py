"""Data parallelism across every device of every process: mesh, shardings, compiled steps.

- One 1-D mesh over all devices (`jax.make_mesh`, axis `data`, axis type given explicitly as
  `Auto`: XLA's partitioner places the few collectives a data-parallel step needs).
- Batches are split along the `data` axis; each process loads only the rows its own devices
  hold (`process_rows`) and the global batch is assembled with
  `jax.make_array_from_process_local_data`.
- The train state is replicated, or with `config.fsdp` sharded FSDP-style along the same
  axis: every large array is split on one dimension divisible by the device count; the step
  all-gathers parameters for the forward pass and reduce-scatters gradients, so parameters,
  Adam moments and updates take 1/N of the memory per device.
- The steps are `jax.jit` with explicit in/out shardings and a donated state, compiled ahead
  of the loop with `.lower(...).compile()`; the compiled executables refuse anything else,
  so there is no silent retracing, and their memory analysis is reported before training.

BatchNorm statistics inside a sharded step are means over the *global* batch: the model is
written for one big batch and XLA inserts the cross-device reductions. (The reference, with
`nn.DataParallel`, normalises each GPU's slice separately.) The result for a given global
batch is therefore the same for any number of devices, up to floating-point summation order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mtan_jax.steps import Steps, TrainState

log = logging.getLogger('mtan_jax')

DATA_AXIS = 'data'
# Arrays smaller than this stay replicated under FSDP: BatchNorm vectors, biases and scalars
# cost more in collectives than they save in memory.
DEFAULT_FSDP_MIN_SIZE = 2 ** 14


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D data-parallel mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split across the `data` axis; every other axis whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: Sequence[int], num_shards: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """The FSDP partition of one array: its largest dimension divisible by `num_shards`.

  Convolution kernels (kh, kw, in, out) split on a channel axis; arrays below `min_size`
  elements or without a divisible dimension stay replicated. Ties go to the later axis
  (output channels), which keeps a kernel's shards contiguous in memory.
  """
  if num_shards <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [i for i, d in enumerate(shape) if d % num_shards == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], i))
  spec: list[str | None] = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return P(*spec)


def state_shardings(abstract_state: TrainState, mesh: Mesh, fsdp: bool = False,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> TrainState:
  """The sharding of every array of the train state: replicated, or FSDP-sharded.

  Adam's moments have the parameters' shapes, so the same shape rule shards them alike.
  """
  def one(x):
    spec = fsdp_spec(x.shape, mesh.size, fsdp_min_size) if fsdp else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, abstract_state)


def configure_fsdp(steps: Steps, shardings: TrainState, mesh: Mesh) -> None:
  """Makes the train step gather FSDP-sharded parameters and reduce-scatter their gradients."""
  steps.params_sharding = shardings.params
  steps.gathered_params_sharding = jax.tree.map(lambda _: replicated(mesh), shardings.params)


def init_state(steps: Steps, make_model: Callable[[], Any], shardings: TrainState) -> TrainState:
  """Builds the initial train state directly in its shardings (never whole on one device)."""
  return jax.jit(lambda: steps.state_from_model(make_model()), out_shardings=shardings)()


def with_shardings(shapes: Any, shardings: Any) -> Any:
  """`shapes` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs carrying `shardings`, for
  lowering ahead of time and for restoring checkpoints straight into their layout."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes, shardings)


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------

def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """The rows [start, stop) of a global batch that this process's devices hold.

  Each process loads only these rows from its data source.
  """
  if global_batch % sharding.mesh.size:
    raise ValueError(f'batch {global_batch} is not divisible by {sharding.mesh.size} devices')
  slices = sharding.addressable_devices_indices_map((global_batch,)).values()
  bounds = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in slices})
  start, stop = bounds[0][0], bounds[-1][1]
  covered = sum(b - a for a, b in bounds)
  if covered != stop - start:
    raise ValueError(f'process {jax.process_index()} holds non-contiguous rows {bounds} of the batch; '
                     'build the mesh with each process\'s devices next to each other')
  return start, stop


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding,
                 rows: tuple[int, int], size: int) -> dict[str, jax.Array]:
  """Assembles the global batch of `size` rows from this process's rows `rows`."""
  if rows == (0, size):
    # One process holds the whole batch: a plain transfer.
    return jax.device_put(dict(local), sharding)
  return {k: jax.make_array_from_process_local_data(sharding, v, (size,) + v.shape[1:])
          for k, v in local.items()}


def batch_spec(shapes: Mapping[str, tuple[tuple[int, ...], Any]], size: int,
               sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract global batch: `shapes` maps key -> (per-example shape, dtype)."""
  return {k: jax.ShapeDtypeStruct((size,) + tuple(shape), dtype, sharding=sharding)
          for k, (shape, dtype) in shapes.items()}


def to_host(tree: Any) -> Any:
  """Fetches arrays to numpy on every process (replicated ones from the local copy)."""
  def one(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


# ------------------------------------------------------------------------------------------
# Ahead-of-time compiled steps
# ------------------------------------------------------------------------------------------

def memory_summary(compiled: Any) -> dict[str, int] | None:
  """Bytes XLA plans per device for one executable (None where the backend does not say).

  `peak_estimate` = arguments + outputs - aliased (donated buffers reused for outputs)
  + temporaries: what the step needs on each device at its busiest.
  """
  try:
    stats = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if stats is None:
    return None
  out = {name: int(getattr(stats, f'{name}_size_in_bytes', 0))
         for name in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['peak_estimate'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def _gib(n: int) -> str:
  return f'{n / 2**30:.3f} GiB'


@dataclasses.dataclass
class CompiledSteps:
  """The run's executables, compiled once before the loop, and what compiling them cost."""
  train_step: Any
  end_epoch: Any
  eval_step: Any
  compile_seconds: dict[str, float]
  memory: dict[str, dict[str, int] | None]
  # (params, batch_stats, batch) -> (T,) per-task gradient norms, for the log; None if not asked.
  grad_norms: Any = None

  def describe(self) -> str:
    """One line per executable: compile time and planned memory per device."""
    lines = []
    for name, seconds in self.compile_seconds.items():
      mem = self.memory.get(name)
      detail = ('memory per device: n/a' if mem is None else
                f'memory per device: arguments {_gib(mem["argument"])}, outputs {_gib(mem["output"])} '
                f'({_gib(mem["alias"])} reusing donated inputs), temporaries {_gib(mem["temp"])}, '
                f'peak about {_gib(mem["peak_estimate"])}')
      lines.append(f'{name}: compiled in {seconds:.1f} s; {detail}')
    return '\n'.join(lines)


def compile_steps(steps: Steps, state: TrainState, shardings: TrainState, train_batch: Mapping[str, Any],
                  eval_batch: Mapping[str, Any], mesh: Mesh, grad_norms: bool = False) -> CompiledSteps:
  """Lowers and compiles the train step, epoch end and eval step for these exact shapes.

  Args:
    steps: the step functions.
    state: the train state or its abstract form (shapes, dtypes).
    shardings: the state's shardings (`state_shardings`).
    train_batch: an abstract global training batch (`batch_spec`).
    eval_batch: an abstract global evaluation batch, with 'mask'.
    mesh: the device mesh.
    grad_norms: also compile `steps.task_grad_norms` (loss-based methods' per-task gradient
      norms, called at log points only).
  """
  rep = replicated(mesh)
  abstract = with_shardings(state, shardings)
  jobs = {
      'train_step': (jax.jit(steps.train_step, in_shardings=(shardings, _shardings_of(train_batch)),
                             out_shardings=(shardings, rep), donate_argnums=0),
                     (abstract, train_batch)),
      'end_epoch': (jax.jit(steps.end_epoch, in_shardings=(shardings,), out_shardings=shardings,
                            donate_argnums=0), (abstract,)),
      'eval_step': (jax.jit(steps.eval_step,
                            in_shardings=(shardings.params, shardings.batch_stats, _shardings_of(eval_batch)),
                            out_shardings=rep),
                    (abstract.params, abstract.batch_stats, eval_batch)),
  }
  if grad_norms:
    jobs['grad_norms'] = (jax.jit(steps.task_grad_norms,
                                  in_shardings=(shardings.params, shardings.batch_stats,
                                                _shardings_of(train_batch)), out_shardings=rep),
                          (abstract.params, abstract.batch_stats, train_batch))
  compiled, seconds, memory = {}, {}, {}
  for name, (fn, args) in jobs.items():
    start = time.perf_counter()
    compiled[name] = fn.lower(*args).compile()
    seconds[name] = time.perf_counter() - start
    memory[name] = memory_summary(compiled[name])
  return CompiledSteps(compiled['train_step'], compiled['end_epoch'], compiled['eval_step'], seconds, memory,
                       compiled.get('grad_norms'))


def _shardings_of(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v.sharding for k, v in tree.items()}

