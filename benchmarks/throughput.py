"""Training throughput of mtan_jax against PyTorch on synthetic in-memory batches.

Measures images per second of full training steps (forward, backward and Adam update) for:

- `mtan_jax`: the project's jitted, donated train step (`mtan_jax.steps`), float32, equal
  weighting, `optax.adam(1e-4)`;
- `torch_eager`: PyTorch eager float32 with the reference's loss formulas and
  `torch.optim.Adam(lr=1e-4)`, on the project's `TorchMTAN` or, with `--torch-ref`, on the
  original lorenmt/mtan `SegNet` class;
- `torch_compile`: the same with the forward pass and losses under `torch.compile`
  (only with `--torch-compile`; compiling is slow on CPU).

Each (system, batch size) pair builds a fresh model, runs one step (compilation) and
`--warmup` more untimed steps, then `--windows` timed windows of `--iters` steps each; a
window ends when the device has finished (`jax.block_until_ready` on the step outputs,
`torch.cuda.synchronize` on GPU) and the reported rate is the median over windows. Inputs
are random arrays generated once per batch size and kept on the device, so no input
pipeline is measured.

Model FLOPs are counted, not estimated: the forward pass of the JAX model is traced at batch
size 1 on abstract arrays and the multiply-accumulates of every convolution are summed from
its operand shapes; a training image costs 2 FLOPs per MAC times 3 (forward plus backward).

Run from the repository root, e.g. `python benchmarks/throughput.py --workload tiny`; see
benchmarks/README.md. This module never imports TensorFlow, and imports torch only when it
measures, so the FLOP counter works without torch installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import flax
import jax
import jax.extend.core
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from flax import nnx

from mtan_jax import steps as mtan_steps
from mtan_jax.errors import ConfigError
from mtan_jax.models.segnet import DEFAULT_WIDTHS, check_input_size, check_widths
from mtan_jax.tasks import make_tasks

LEARNING_RATE = 1e-4
# The measured H100 bf16 dense matmul ceiling (shared/REFERENCE.md).
DEFAULT_PEAK_TFLOPS = 790.0
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Workload:
  """Model and input shape of one benchmark configuration.

  Attributes:
    name: workload name (a key of WORKLOADS).
    tasks: task names, in head order.
    num_classes: semantic classes.
    height: input height in pixels (a multiple of 32).
    width: input width in pixels (a multiple of 32).
    widths: channel widths of the five SegNet levels.
    batch_sizes: batch sizes measured when `--batch-sizes` is not given.
  """
  name: str
  tasks: tuple[str, ...]
  num_classes: int
  height: int
  width: int
  widths: tuple[int, ...]
  batch_sizes: tuple[int, ...]

  def task_channels(self) -> list[tuple[str, int]]:
    """(kind, channels) per task, the form the PyTorch models take."""
    return [(t.name, t.channels) for t in make_tasks(self.tasks, self.num_classes)]

  def is_reference_nyuv2(self) -> bool:
    """Whether the original lorenmt/mtan SegNet (NYUv2, 13 classes, full width) fits."""
    return (self.tasks == ('semantic', 'depth', 'normal') and self.num_classes == 13
            and self.widths == DEFAULT_WIDTHS)


# Batch sizes default to the paper's (8 for Cityscapes, 2 for NYUv2).
WORKLOADS = {
    'cityscapes': Workload('cityscapes', ('semantic', 'depth'), 7, 128, 256, DEFAULT_WIDTHS, (8,)),
    'nyuv2': Workload('nyuv2', ('semantic', 'depth', 'normal'), 13, 288, 384, DEFAULT_WIDTHS, (2,)),
    'tiny': Workload('tiny', ('semantic', 'depth'), 7, 64, 128, (8, 16, 16, 32, 32), (2, 8)),
}


# ----------------------------------------------------------------------------------------
# FLOP counting
# ----------------------------------------------------------------------------------------

def _conv_macs(jaxpr: jax.extend.core.Jaxpr) -> int:
  """Multiply-accumulates of every convolution in `jaxpr`, including nested sub-jaxprs."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      out_shape = eqn.outvars[0].aval.shape
      kernel_shape = eqn.invars[1].aval.shape
      out_features = kernel_shape[eqn.params['dimension_numbers'].rhs_spec[0]]
      # Each output element reads kernel_h * kernel_w * (in_channels / groups) inputs, which
      # is the kernel's size divided by its output-feature dimension.
      total += math.prod(out_shape) * (math.prod(kernel_shape) // out_features)
    # Activations such as relu are custom_jvp calls and jit regions are pjit calls; their
    # bodies live in the equation parameters.
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _conv_macs(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _conv_macs(sub)
  return total


def forward_conv_macs(workload: Workload) -> int:
  """Convolution MACs of one forward pass of the MTAN model on one image.

  The model is built with `nnx.eval_shape` and traced on abstract inputs, so counting the
  full-width models allocates no parameters.

  Args:
    workload: the model and input shape.

  Returns:
    Multiply-accumulates per image (convolutions only).
  """
  tasks = make_tasks(workload.tasks, workload.num_classes)
  model = nnx.eval_shape(lambda: mtan_steps.create_model('mtan', tasks, workload.widths, seed=0))
  # The evaluation view: tracing the training view would try to update BatchNorm statistics
  # held by Variables created outside the trace. The convolutions are the same.
  graphdef, state = nnx.split(nnx.view(model, use_running_average=True))
  image = jax.ShapeDtypeStruct((1, workload.height, workload.width, 3), jnp.float32)
  closed = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, image)
  return _conv_macs(closed.jaxpr)


def flop_summary(workload: Workload) -> dict[str, float]:
  """Forward MACs and training FLOPs per image (2 FLOPs per MAC, backward = 2x forward)."""
  macs = forward_conv_macs(workload)
  return {'forward_gmac_per_image': macs / 1e9,
          'forward_gflop_per_image': 2 * macs / 1e9,
          'train_gflop_per_image': 6 * macs / 1e9}


# ----------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------

def make_batch(workload: Workload, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A random NHWC batch with every target the workload's tasks need.

  Images are uniform in [0, 1], labels uniform in -1..C-1 (-1 is the ignore label), depth
  is positive (all pixels valid) and normals are random unit vectors.
  """
  rng = np.random.default_rng(seed)
  shape = (batch_size, workload.height, workload.width)
  batch = {'image': rng.uniform(0.0, 1.0, shape + (3,)).astype(np.float32)}
  if 'semantic' in workload.tasks:
    batch['label'] = rng.integers(-1, workload.num_classes, shape, dtype=np.int32)
  if 'depth' in workload.tasks:
    batch['depth'] = rng.uniform(0.01, 1.0, shape + (1,)).astype(np.float32)
  if 'normal' in workload.tasks:
    normal = rng.standard_normal(shape + (3,)).astype(np.float32)
    batch['normal'] = normal / np.linalg.norm(normal, axis=-1, keepdims=True)
  return batch


# ----------------------------------------------------------------------------------------
# Systems
# ----------------------------------------------------------------------------------------

class JaxTrainer:
  """The project's jitted train step on one synthetic batch.

  Args:
    workload: model and input shape.
    batch: NHWC numpy batch from `make_batch`.
    dtype: mtan_jax compute dtype ('float32').
  """

  def __init__(self, workload: Workload, batch: dict[str, np.ndarray], dtype: str):
    tasks = make_tasks(workload.tasks, workload.num_classes)
    model = mtan_steps.create_model('mtan', tasks, workload.widths, seed=0, dtype=dtype)
    steps = mtan_steps.Steps(model, optax.adam(LEARNING_RATE), 'equal')
    self._train_step = mtan_steps.jit_steps(steps)[0]
    self._state = steps.init_state()
    self._batch = jax.device_put(batch)
    self._device = jax.devices()[0]
    self.device = f'{self._device.platform}:{self._device.device_kind}'
    self.on_gpu = self._device.platform == 'gpu'
    self.model = 'mtan_jax.models.mtan.MTAN'

  def step(self) -> Any:
    """Dispatches one train step; returns what to wait on."""
    self._state, metrics = self._train_step(self._state, self._batch)
    return self._state, metrics

  def sync(self, outputs: Any) -> None:
    jax.block_until_ready(outputs)

  def peak_memory_bytes(self) -> int | None:
    """The device's peak bytes in use so far in this process, or None where not reported (CPU)."""
    stats = self._device.memory_stats()
    return stats.get('peak_bytes_in_use') if stats else None

  def release(self) -> None:
    """Drops the train state and batch so the next batch size starts from free memory."""
    self._state = self._batch = None


class TorchTrainer:
  """A PyTorch training step with the reference's losses on one synthetic batch.

  Args:
    workload: model and input shape.
    batch: NHWC numpy batch from `make_batch`.
    compile_model: put the forward pass and losses under `torch.compile`.
    torch_ref: a lorenmt/mtan checkout whose `SegNet` to train, or None for `TorchMTAN`.
  """

  def __init__(self, workload: Workload, batch: dict[str, np.ndarray], compile_model: bool,
               torch_ref: str | None):
    import torch  # pylint: disable=import-outside-toplevel
    from mtan_jax import torch_reference  # pylint: disable=import-outside-toplevel
    self._torch = torch
    self._device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    self.on_gpu = self._device.type == 'cuda'
    self.device = (f'cuda:{torch.cuda.get_device_name(self._device)}' if self.on_gpu
                   else 'cpu')
    if self.on_gpu:
      # Measure this model alone, not what earlier systems left behind.
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats(self._device)
    if torch_ref:
      model = torch_reference.load_reference_segnet(torch_ref)()
      self.model = f'lorenmt/mtan SegNet ({torch_ref})'
    else:
      model = torch_reference.TorchMTAN(workload.task_channels(), workload.widths)
      self.model = 'mtan_jax.torch_reference.TorchMTAN'
    self._model = model.to(self._device).train()
    self._optimizer = torch.optim.Adam(self._model.parameters(), lr=LEARNING_RATE)
    tasks = make_tasks(workload.tasks, workload.num_classes)
    self._kinds = tuple(t.name for t in tasks)
    self._image = self._to_device(batch['image'])
    self._targets = [self._to_device(batch[t.target_key]) for t in tasks]
    if compile_model:
      # Start from an empty compile cache: otherwise Dynamo would treat a new batch size as a
      # dynamic dimension and compile symbolic shapes, and stop compiling after its
      # recompilation limit when many batch sizes are swept.
      torch._dynamo.reset()  # pylint: disable=protected-access
      self._loss = torch.compile(self._forward_loss)
    else:
      self._loss = self._forward_loss

  def _to_device(self, array: np.ndarray):
    tensor = self._torch.from_numpy(array)
    if tensor.ndim == 4:
      tensor = tensor.permute(0, 3, 1, 2).contiguous()
    elif tensor.dtype == self._torch.int32:
      # nll_loss wants int64 class indices.
      tensor = tensor.long()
    return tensor.to(self._device)

  def _forward_loss(self, image, targets):
    """Sum of the task losses (equal weighting), as in the reference's training loop."""
    predictions, _ = self._model(image)
    total = 0.0
    for kind, pred, target in zip(self._kinds, predictions, targets):
      if kind == 'semantic':
        total = total + self._torch.nn.functional.nll_loss(pred, target, ignore_index=-1)
        continue
      mask = (target.sum(dim=1, keepdim=True) != 0).to(pred.dtype)
      # mask.sum() counts the same pixels as the reference's torch.nonzero(mask).size(0)
      # without forcing a device-to-host sync every step.
      count = mask.sum()
      if kind == 'depth':
        total = total + (self._torch.abs(pred - target) * mask).sum() / count
      else:
        total = total + 1 - (pred * target * mask).sum() / count
    return total

  def step(self) -> Any:
    """Runs one train step (asynchronously on GPU); returns the detached loss."""
    self._optimizer.zero_grad(set_to_none=True)
    loss = self._loss(self._image, self._targets)
    loss.backward()
    self._optimizer.step()
    return loss.detach()

  def sync(self, outputs: Any) -> None:
    del outputs  # CUDA streams are synchronised as a whole.
    if self.on_gpu:
      self._torch.cuda.synchronize(self._device)

  def peak_memory_bytes(self) -> int | None:
    """Peak bytes allocated since this trainer was built, or None on CPU."""
    return self._torch.cuda.max_memory_allocated(self._device) if self.on_gpu else None

  def release(self) -> None:
    """Frees the model, optimizer and batch, and hands cached GPU memory back for JAX."""
    self._model = self._optimizer = self._loss = self._image = self._targets = None
    if self.on_gpu:
      self._torch.cuda.empty_cache()


@dataclasses.dataclass(frozen=True)
class System:
  """One measured configuration: a name, a label, and how to build its trainer.

  Attributes:
    name: short key used in the JSON and the table.
    label: human-readable description.
    build: `build(workload, batch, args)` returning a trainer with `step()`, `sync(outputs)`,
      `peak_memory_bytes()`, `release()` and attributes `device`, `on_gpu`, `model`.
    flag: the boolean command-line option that enables the system, or None if always run.
  """
  name: str
  label: str
  build: Callable[[Workload, dict[str, np.ndarray], argparse.Namespace], Any]
  flag: str | None = None


# Speed ratios are relative to this system, measured in the same run.
BASELINE = 'torch_eager'
# Listed in run order: PyTorch first, so its caching allocator is emptied before JAX's
# allocator grows and each framework gets the whole device.
SYSTEMS = {
    'torch_eager': System('torch_eager', 'PyTorch eager float32',
                          lambda w, b, a: TorchTrainer(w, b, False, a.torch_ref)),
    'torch_compile': System('torch_compile', 'PyTorch torch.compile float32 (forward + losses)',
                            lambda w, b, a: TorchTrainer(w, b, True, a.torch_ref),
                            flag='torch_compile'),
    'mtan_jax': System('mtan_jax', 'mtan_jax float32 (jit, donated state)',
                       lambda w, b, a: JaxTrainer(w, b, 'float32')),
}


def selected_systems(args: argparse.Namespace) -> list[System]:
  """The systems this run measures, in run order."""
  return [s for s in SYSTEMS.values() if s.flag is None or getattr(args, s.flag)]


# ----------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------

def measure(system: System, workload: Workload, batch_size: int, args: argparse.Namespace,
            train_gflop: float) -> dict[str, Any]:
  """Builds `system` at `batch_size`, warms it up and times `args.windows` windows.

  Returns:
    One result row (see `main` for the fields).
  """
  trainer = system.build(workload, make_batch(workload, batch_size), args)
  start = time.perf_counter()
  trainer.sync(trainer.step())
  first_step_s = time.perf_counter() - start
  for _ in range(args.warmup):
    trainer.sync(trainer.step())
  rates = []
  busy, own, wall = _cpu_busy_seconds(), time.process_time(), time.perf_counter()
  for _ in range(args.windows):
    start = time.perf_counter()
    for _ in range(args.iters):
      outputs = trainer.step()
    trainer.sync(outputs)
    rates.append(args.iters * batch_size / (time.perf_counter() - start))
  other_cores = None
  if busy is not None:
    other_busy = (_cpu_busy_seconds() - busy) - (time.process_time() - own)
    other_cores = max(0.0, other_busy) / (time.perf_counter() - wall)
  peak_memory = trainer.peak_memory_bytes()
  trainer.release()
  images_per_s = statistics.median(rates)
  tflops = images_per_s * train_gflop / 1e3
  return {
      'system': system.name,
      'label': system.label,
      'model': trainer.model,
      'device': trainer.device,
      'batch_size': batch_size,
      'images_per_s': images_per_s,
      'window_images_per_s': rates,
      'first_step_s': first_step_s,
      'tflops': tflops,
      'mfu': tflops / args.peak_tflops if trainer.on_gpu else None,
      'peak_memory_bytes': peak_memory,
      'other_processes_cpu_cores': other_cores,
  }


def _cpu_busy_seconds() -> float | None:
  """CPU seconds all cores have spent busy since boot (Linux), or None elsewhere.

  With this process's own CPU time subtracted, it tells how much other processes competed
  for the CPU during a measurement, which on a shared machine moves CPU numbers a lot.
  """
  try:
    with open('/proc/stat', encoding='utf-8') as f:
      jiffies = [int(v) for v in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return None
  # user nice system idle iowait irq softirq steal: everything but idle and iowait is busy.
  return (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf('SC_CLK_TCK')


def add_ratios(results: list[dict[str, Any]]) -> None:
  """Sets each row's `ratio_to_torch_eager`: its rate over torch_eager's at the same batch."""
  base = {r['batch_size']: r['images_per_s'] for r in results if r['system'] == BASELINE}
  for row in results:
    ref = base.get(row['batch_size'])
    row['ratio_to_torch_eager'] = row['images_per_s'] / ref if ref else None


def environment(argv: Sequence[str], load_before: Sequence[float]) -> dict[str, Any]:
  """Versions, devices and machine facts that the numbers depend on.

  Args:
    argv: the command-line arguments of this run.
    load_before: `os.getloadavg()` taken before the measurements.
  """
  import torch  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  return {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': shlex.join(['python', 'benchmarks/throughput.py', *argv]),
      'git_commit': commit,
      'jax_backend': jax.default_backend(),
      'jax_device_kind': device.device_kind,
      'jax_device_count': jax.device_count(),
      'torch_device': (torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'),
      'cpu_count': _cpu_count(),
      'cpu_model': _cpu_model(),
      # Other processes on the machine slow CPU runs down; the load says how busy it was.
      'load_average_1_5_15_before': list(load_before),
      'load_average_1_5_15_after': list(os.getloadavg()),
      'torch_num_threads': torch.get_num_threads(),
      'torch_cudnn_benchmark': torch.backends.cudnn.benchmark,
      'torch_cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
      'jax_default_matmul_precision': jax.config.jax_default_matmul_precision,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'python': platform.python_version(),
      'platform': platform.platform(),
      'versions': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
                   'flax': flax.__version__, 'optax': optax.__version__,
                   'numpy': np.__version__, 'torch': torch.__version__},
  }


def _cpu_count() -> int:
  """CPUs this process may run on (the affinity mask, which containers restrict)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

def _int_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in text.split(',') if v.strip())
  except ValueError as e:
    raise argparse.ArgumentTypeError(
        f'expected a comma-separated list of integers, got {text!r}') from e
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'expected positive integers, got {text!r}')
  return values


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
  return value


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, Workload]:
  """Parses the command line and resolves the workload with its overrides."""
  parser = argparse.ArgumentParser(
      description='Training throughput (forward + backward + Adam) of mtan_jax vs PyTorch on '
                  'synthetic batches.')
  parser.add_argument('--workload', choices=sorted(WORKLOADS), default='tiny',
                      help='cityscapes: semantic 7 + depth, 128x256; nyuv2: semantic 13 + depth '
                           '+ normal, 288x384; tiny: cityscapes tasks at 64x128, widths '
                           '8,16,16,32,32 (default %(default)s)')
  parser.add_argument('--widths', type=_int_list,
                      help='override the five SegNet widths, e.g. 64,128,256,512,512')
  parser.add_argument('--height', type=int, help='override the input height (multiple of 32)')
  parser.add_argument('--width', type=int, help='override the input width (multiple of 32)')
  parser.add_argument('--batch-sizes', type=_int_list,
                      help="comma list, run in ascending order (default: the workload's: "
                           'tiny 2,8; cityscapes 8; nyuv2 2)')
  parser.add_argument('--windows', type=_positive_int, default=5,
                      help='timed windows; the median is reported (default %(default)s)')
  parser.add_argument('--iters', type=_positive_int, default=10,
                      help='train steps per timed window (default %(default)s)')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps after the first, compiling one (default %(default)s)')
  parser.add_argument('--torch-compile', action='store_true', help='also measure torch.compile')
  parser.add_argument('--torch-ref', metavar='PATH',
                      help='lorenmt/mtan checkout: train its SegNet class as the PyTorch model '
                           '(NYUv2 tasks, 13 classes, full widths only)')
  parser.add_argument('--peak-tflops', type=float, default=DEFAULT_PEAK_TFLOPS,
                      help='device peak for MFU, GPU only (default %(default)s, the measured '
                           'H100 bf16 ceiling)')
  parser.add_argument('--out', metavar='FILE', help='write the results as JSON here')
  args = parser.parse_args(argv)

  base = WORKLOADS[args.workload]
  try:
    widths = check_widths(args.widths) if args.widths else base.widths
    height = args.height or base.height
    width = args.width or base.width
    check_input_size(height, width)
  except ConfigError as e:
    parser.error(str(e))
  # Ascending, because JAX's peak-memory counter cannot be reset between batch sizes.
  batch_sizes = tuple(sorted(set(args.batch_sizes or base.batch_sizes)))
  workload = dataclasses.replace(base, widths=widths, height=height, width=width,
                                 batch_sizes=batch_sizes)
  if args.torch_ref and not workload.is_reference_nyuv2():
    parser.error('--torch-ref trains the reference SegNet, which is fixed to NYUv2 (semantic 13 + '
                 f'depth + normal) at widths {",".join(map(str, DEFAULT_WIDTHS))}; got tasks '
                 f'{" + ".join(workload.tasks)} ({workload.num_classes} classes) at widths '
                 f'{",".join(map(str, widths))}')
  if args.warmup < 0:
    parser.error(f'--warmup must be >= 0, got {args.warmup}')
  return args, workload


def _format_bytes(value: int | None) -> str:
  return 'n/a' if value is None else f'{value / 2**30:.2f} GiB'


def format_table(results: list[dict[str, Any]]) -> str:
  """The results as a Markdown table."""
  header = ('system', 'batch', 'images/s', 'vs torch eager', 'TFLOP/s', 'MFU', 'peak memory',
            'other processes (CPU cores)')
  rows = [header, ('---',) * len(header)]
  for r in results:
    ratio, other = r['ratio_to_torch_eager'], r['other_processes_cpu_cores']
    rows.append((r['system'], str(r['batch_size']), f'{r["images_per_s"]:.3g}',
                 'n/a' if ratio is None else f'{ratio:.2f}x', f'{r["tflops"]:.3g}',
                 'n/a' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%',
                 _format_bytes(r['peak_memory_bytes']),
                 'n/a' if other is None else f'{other:.2f}'))
  return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints the table and optionally writes JSON.

  Args:
    argv: command-line arguments (default: sys.argv[1:]).

  Returns:
    The report: `environment`, `workload`, `flops`, `settings` and `results`, one row per
    (system, batch size) with images_per_s (median over windows), window_images_per_s,
    ratio_to_torch_eager, tflops, mfu (GPU only, else None), peak_memory_bytes (GPU only,
    else None), first_step_s (compilation plus one step), other_processes_cpu_cores (CPU
    cores other processes kept busy during the timed windows; Linux only), device and model.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  args, workload = parse_args(argv)
  # JAX must not grab most of the GPU when its backend starts: the PyTorch systems share the
  # device in this process. Backends start lazily, so setting this before first use suffices.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(_cpu_count())
  # Lets cuDNN pick its fastest convolution algorithms for these fixed shapes: the strongest
  # fair eager baseline. XLA autotunes its own by default.
  torch.backends.cudnn.benchmark = True

  flops = flop_summary(workload)
  systems = selected_systems(args)
  torch_model = (f'lorenmt/mtan SegNet from {args.torch_ref}' if args.torch_ref
                 else 'mtan_jax.torch_reference.TorchMTAN')
  print(f'workload {workload.name}: tasks {",".join(workload.tasks)} ({workload.num_classes} '
        f'classes), {workload.height}x{workload.width}, widths {workload.widths}')
  print(f'PyTorch model: {torch_model}')
  print(f'counted FLOPs per image: forward {flops["forward_gmac_per_image"]:.2f} GMAC, '
        f'training {flops["train_gflop_per_image"]:.1f} GFLOP')

  load_before = os.getloadavg()
  results = []
  for system in systems:
    for batch_size in workload.batch_sizes:
      print(f'measuring {system.name} at batch {batch_size} ...', flush=True)
      row = measure(system, workload, batch_size, args, flops['train_gflop_per_image'])
      print(f'  {row["images_per_s"]:.2f} images/s (first step, with compilation: '
            f'{row["first_step_s"]:.1f} s)', flush=True)
      results.append(row)
  add_ratios(results)

  report = {
      'environment': environment(argv, load_before),
      'workload': dataclasses.asdict(workload),
      'torch_model': torch_model,
      'flops': flops,
      'settings': {'windows': args.windows, 'iters_per_window': args.iters, 'warmup': args.warmup,
                   'learning_rate': LEARNING_RATE, 'weighting': 'equal',
                   'peak_tflops': args.peak_tflops},
      'results': results,
  }
  print(format_table(results))
  if any(r['peak_memory_bytes'] is None for r in results):
    print('peak memory: n/a where the device does not report it (CPU)')
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
      f.write('\n')
    print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
