"""Training throughput and peak memory of mtan_jax against PyTorch on synthetic batches.

Measures images per second of full training steps (forward, backward and Adam update with
`lr=1e-4`, equal task weighting) and the peak device memory of each step, for:

- `mtan_jax`: the project's train step (`mtan_jax.steps.Steps.train_step`), compiled ahead
  of time with a donated train state, float32;
- `mtan_jax_bf16`: the same with `create_model(..., dtype='bfloat16')`: bfloat16
  activations and convolutions; parameters, optimizer state, BatchNorm statistics and
  losses stay float32;
- `torch_eager`: PyTorch eager float32 with the reference's loss formulas and
  `torch.optim.Adam`, on the project's parity-tested `TorchMTAN` or, with `--torch-ref`, on
  the original lorenmt/mtan `SegNet` class wherever that class fits the workload;
- `torch_compile`: as `torch_eager`, with the forward pass and losses under `torch.compile`;
- `torch_autocast_bf16`: as `torch_eager`, with the forward pass and losses under
  `torch.autocast(device_type, dtype=torch.bfloat16)` (float32 parameters, eager Adam);
- `mtan_jax+<method>` (with `--methods`): `mtan_jax` with another task weighting method of
  `mtan_jax.weighting`, its `step_time_ratio_to_equal` the step time over `mtan_jax`'s.

Every (workload, system, batch size) builds a fresh model on one random batch that stays on
the device, runs one untimed step and `--warmup` more, then `--windows` timed windows of
`--iters` steps; a window ends when the device has finished, and the reported rate is the
median over windows. Compilation is never timed. Batch size `max` keeps doubling the
largest listed size that fit until the device runs out of memory; out-of-memory errors
become rows with status 'oom'.

At the start, the device's bfloat16 matmul rate is measured with JAX; MFU is model FLOP/s
over that rate. Model FLOPs are counted, not estimated: the JAX model's forward pass is
traced at batch size 1 on abstract arrays and the multiply-accumulates of every
convolution are summed from operand shapes; a training image costs 2 FLOPs per MAC times 3
(forward plus backward).

After the table, the run's numbers are checked against the project's speed, MFU and memory
goals (defined for one H100). Run from the repository root, e.g.
`python benchmarks/throughput.py --workload tiny`; see benchmarks/README.md. This module
never imports TensorFlow or ml_collections, and imports torch only when a PyTorch system
runs, so the FLOP counter and the JAX systems work without torch installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measure this checkout's mtan_jax, also when the script runs as `python benchmarks/...`
# (which puts benchmarks/, not the repository, on the path) or another copy is installed.
sys.path.insert(0, REPO_ROOT)

# pylint: disable=wrong-import-position
from mtan_jax import steps as mtan_steps
from mtan_jax import weighting as mtan_weighting
from mtan_jax.errors import ConfigError
from mtan_jax.models.segnet import DEFAULT_WIDTHS, check_input_size, check_widths
from mtan_jax.tasks import make_tasks
# pylint: enable=wrong-import-position

LEARNING_RATE = 1e-4
DEFAULT_BATCH_SIZES = '2,8,32,max'
# Square bf16 matmul size for the MFU denominator: large enough to saturate an H100's tensor
# cores; on CPU a smaller one keeps the measurement to about a second.
DEFAULT_MATMUL_SIZE = {'gpu': 8192, 'cpu': 1024}
# Where the reference script sits in a lorenmt/mtan checkout (torch_reference loads it).
REFERENCE_SCRIPT = os.path.join('im2im_pred', 'model_segnet_mtan.py')


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
  """
  name: str
  tasks: tuple[str, ...]
  num_classes: int
  height: int
  width: int
  widths: tuple[int, ...]

  def task_channels(self) -> list[tuple[str, int]]:
    """(kind, channels) per task, the form the PyTorch models take."""
    return [(t.name, t.channels) for t in make_tasks(self.tasks, self.num_classes)]

  def is_reference_nyuv2(self) -> bool:
    """Whether the original lorenmt/mtan SegNet (NYUv2, 13 classes, full width) fits."""
    return (self.tasks == ('semantic', 'depth', 'normal') and self.num_classes == 13
            and self.widths == DEFAULT_WIDTHS)


WORKLOADS = {
    'cityscapes': Workload('cityscapes', ('semantic', 'depth'), 7, 128, 256, DEFAULT_WIDTHS),
    'nyuv2': Workload('nyuv2', ('semantic', 'depth', 'normal'), 13, 288, 384, DEFAULT_WIDTHS),
    'tiny': Workload('tiny', ('semantic', 'depth'), 7, 64, 128, (8, 16, 16, 32, 32)),
}


# ----------------------------------------------------------------------------------------
# FLOP counting
# ----------------------------------------------------------------------------------------

def _conv_macs(jaxpr: jax.extend.core.Jaxpr,
               constant_inputs: Sequence[bool] | None = None) -> int:
  """Multiply-accumulates of the layers in `jaxpr`, including nested sub-jaxprs.

  Counts every convolution, and every matmul (`dot_general`) whose two operands are both
  computed from the jaxpr's inputs: a 1x1 convolution written as an einsum over stacked
  kernels counts, while the bilinear upsampling's einsums against constant interpolation
  matrices do not, just as PyTorch's flop counter counts `conv2d` but not `F.interpolate`.

  Args:
    jaxpr: the jaxpr to count.
    constant_inputs: per input variable, whether it is a compile-time constant (as seen by
      the enclosing jaxpr); None if none is.
  """
  constant = set(jaxpr.constvars)
  constant.update(v for v, c in zip(jaxpr.invars, constant_inputs or ()) if c)

  def is_constant(atom) -> bool:
    return isinstance(atom, jax.extend.core.Literal) or atom in constant

  total = 0
  for eqn in jaxpr.eqns:
    in_constant = [is_constant(v) for v in eqn.invars]
    out_shape = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if eqn.primitive.name == 'conv_general_dilated':
      kernel_shape = eqn.invars[1].aval.shape
      out_features = kernel_shape[eqn.params['dimension_numbers'].rhs_spec[0]]
      # Each output element reads kernel_h * kernel_w * (in_channels / groups) inputs, which
      # is the kernel's size divided by its output-feature dimension.
      total += math.prod(out_shape) * (math.prod(kernel_shape) // out_features)
    elif eqn.primitive.name == 'dot_general' and not any(in_constant):
      (lhs_contracting, _), _ = eqn.params['dimension_numbers']
      lhs_shape = eqn.invars[0].aval.shape
      total += math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contracting)
    # Activations such as relu are custom_jvp calls and jit regions (einsum among them) are
    # pjit calls; their bodies live in the equation parameters. A body that takes the
    # equation's operands one to one inherits which of them are constants.
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          sub = sub.jaxpr
        if isinstance(sub, jax.extend.core.Jaxpr):
          one_to_one = len(sub.invars) == len(eqn.invars)
          total += _conv_macs(sub, in_constant if one_to_one else None)
    if all(in_constant):
      constant.update(eqn.outvars)
  return total


def forward_conv_macs(workload: Workload) -> int:
  """Convolution MACs of one forward pass of the MTAN model on one image.

  The model is built with `nnx.eval_shape` and traced on abstract inputs, so counting the
  full-width models allocates no parameters.

  Args:
    workload: the model and input shape.

  Returns:
    Multiply-accumulates per image (convolutions, including those written as matmuls).
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
# The MFU denominator: the device's measured bf16 matmul rate
# ----------------------------------------------------------------------------------------

# Each timed repetition dispatches enough matmuls to last about this long, so that the
# dispatch and synchronisation overhead of one window is negligible.
_MATMUL_REPEAT_S = 0.05
_MATMUL_MAX_CALLS = 100


def measure_matmul_tflops(size: int, repeats: int = 5) -> dict[str, Any]:
  """Measures the default JAX device's bfloat16 matmul throughput.

  Times a jitted `a @ b` on square bfloat16 inputs (XLA's default precision, which
  accumulates in float32 on GPUs) after a compiling call and a warm-up call; each of
  `repeats` repetitions dispatches back-to-back calls and waits for the last.

  Args:
    size: the side n of the square matrices; one matmul is 2 n^3 FLOPs.
    repeats: timed repetitions; the median is reported.

  Returns:
    A dict with `tflops` (median), `repeat_tflops`, `size`, `dtype`, `calls_per_repeat`,
    `repeats` and `device`.
  """
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (size, size), jnp.bfloat16)
  b = jax.random.normal(key_b, (size, size), jnp.bfloat16)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  start = time.perf_counter()
  jax.block_until_ready(matmul(a, b))
  single_s = time.perf_counter() - start
  calls = min(_MATMUL_MAX_CALLS, max(1, math.ceil(_MATMUL_REPEAT_S / max(single_s, 1e-9))))
  flop = 2 * size**3
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = matmul(a, b)
    jax.block_until_ready(out)
    rates.append(calls * flop / (time.perf_counter() - start) / 1e12)
  device = jax.devices()[0]
  return {'tflops': statistics.median(rates), 'repeat_tflops': rates, 'size': size,
          'dtype': 'bfloat16', 'calls_per_repeat': calls, 'repeats': repeats,
          'device': f'{device.platform}:{device.device_kind}'}


# ----------------------------------------------------------------------------------------
# Systems
# ----------------------------------------------------------------------------------------

class JaxTrainer:
  """The project's train step, compiled ahead of time, on one synthetic batch.

  Args:
    workload: model and input shape.
    batch: NHWC numpy batch from `make_batch`.
    dtype: mtan_jax compute dtype ('float32' or 'bfloat16').
    method: task weighting method (`mtan_jax.weighting.METHODS`, except 'fixed', which
      needs task weights).
  """

  model = 'mtan_jax.models.mtan.MTAN'

  def __init__(self, workload: Workload, batch: dict[str, np.ndarray], dtype: str,
               method: str = 'equal'):
    tasks = make_tasks(workload.tasks, workload.num_classes)
    model = mtan_steps.create_model('mtan', tasks, workload.widths, seed=0, dtype=dtype)
    steps = mtan_steps.Steps(model, optax.adam(LEARNING_RATE), method)
    self._state = steps.init_state()
    self._batch = jax.device_put(batch)
    # Compiled ahead of time, as the trainer's jit would on its first call: the executable's
    # memory analysis is then this step's own, exact and independent of earlier systems,
    # unlike the process-wide peak of the device allocator, which cannot be reset.
    self._step = jax.jit(steps.train_step, donate_argnums=0).lower(
        self._state, self._batch).compile()
    self._device = jax.devices()[0]
    self.device = f'{self._device.platform}:{self._device.device_kind}'

  def step(self) -> Any:
    """Dispatches one train step; returns what to wait on."""
    self._state, metrics = self._step(self._state, self._batch)
    return self._state, metrics

  def sync(self, outputs: Any) -> None:
    jax.block_until_ready(outputs)

  def memory(self) -> dict[str, Any]:
    """Peak bytes of the compiled step (XLA's memory analysis) and the allocator's peak.

    XLA's peak is arguments + outputs + temporaries - the outputs aliased to donated
    arguments: what the executable holds at once, for this batch size alone. The allocator's
    `peak_bytes_in_use` is the process-wide peak so far (None where not reported, e.g. CPU).
    """
    analysis = self._step.memory_analysis()
    fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
              'alias_size_in_bytes', 'generated_code_size_in_bytes')
    stats = self._device.memory_stats()
    result = {'device_peak_bytes_in_use': stats.get('peak_bytes_in_use') if stats else None,
              'memory_analysis': None, 'peak_memory_bytes': None, 'memory_source': None}
    if analysis is not None:
      sizes = {f: int(getattr(analysis, f)) for f in fields}
      result['memory_analysis'] = sizes
      result['peak_memory_bytes'] = (
          sizes['argument_size_in_bytes'] + sizes['output_size_in_bytes']
          + sizes['temp_size_in_bytes'] - sizes['alias_size_in_bytes'])
      result['memory_source'] = 'xla memory_analysis (argument + output + temp - alias)'
    return result

  def release(self) -> None:
    """Drops the executable, train state and batch so the next build starts from free memory."""
    self._state = self._batch = self._step = None


# PyTorch trainer modes: the system each one measures.
TORCH_MODES = ('eager', 'compile', 'autocast_bf16')


class TorchTrainer:
  """A PyTorch training step with the reference's losses on one synthetic batch.

  Args:
    workload: model and input shape.
    batch: NHWC numpy batch from `make_batch`.
    mode: 'eager' (float32), 'compile' (forward pass and losses under `torch.compile`) or
      'autocast_bf16' (forward pass and losses under bfloat16 autocast).
    torch_ref: a lorenmt/mtan checkout whose `SegNet` to train, or None for `TorchMTAN`.
  """

  def __init__(self, workload: Workload, batch: dict[str, np.ndarray], mode: str = 'eager',
               torch_ref: str | None = None):
    import torch  # pylint: disable=import-outside-toplevel
    from mtan_jax import torch_reference  # pylint: disable=import-outside-toplevel
    if mode not in TORCH_MODES:
      raise ValueError(f'unknown mode {mode!r}; expected one of {TORCH_MODES}')
    self._torch = torch
    self._device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    self.on_gpu = self._device.type == 'cuda'
    self.device = (f'cuda:{torch.cuda.get_device_name(self._device)}' if self.on_gpu
                   else 'cpu')
    if mode == 'compile':
      # Start from an empty compile cache: otherwise Dynamo would treat a new batch size as a
      # dynamic dimension and compile symbolic shapes, and stop compiling after its
      # recompilation limit when many batch sizes are swept. Done before the memory reset
      # below, as old graphs keep their models alive.
      torch._dynamo.reset()  # pylint: disable=protected-access
    if self.on_gpu:
      # Measure this model alone, not what earlier systems left behind.
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats(self._device)
    # Fixed initial weights, as the JAX systems' seed=0: runs are reproducible, and a tiny
    # test model cannot draw, by chance, a normal head that outputs an all-zero vector (0/0).
    torch.manual_seed(0)
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
    if mode == 'compile':
      self._loss = torch.compile(self._forward_loss)
    elif mode == 'autocast_bf16':
      self._loss = self._autocast_forward_loss
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

  def _autocast_forward_loss(self, image, targets):
    """The forward pass and losses under bfloat16 autocast, the standard PyTorch recipe.

    Autocast runs convolutions in bfloat16 and keeps reductions such as log-softmax and NLL
    in float32; the float32 targets promote the depth and normal losses back to float32.
    """
    with self._torch.autocast(self._device.type, dtype=self._torch.bfloat16):
      return self._forward_loss(image, targets)

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

  def memory(self) -> dict[str, Any]:
    """Peak bytes allocated since this trainer was built (GPU); None on CPU."""
    if not self.on_gpu:
      return {'peak_memory_bytes': None, 'memory_source': None}
    return {'peak_memory_bytes': self._torch.cuda.max_memory_allocated(self._device),
            'memory_source': 'torch.cuda.max_memory_allocated'}

  def release(self) -> None:
    """Frees the model, optimizer and batch (free_device_memory returns the cached blocks)."""
    self._model = self._optimizer = self._loss = self._image = self._targets = None


@dataclasses.dataclass(frozen=True)
class System:
  """One measured configuration: a name, a label, and how to build its trainer.

  Attributes:
    name: short key used in `--systems`, the JSON and the table.
    label: human-readable description.
    framework: 'jax' or 'torch': which device it runs on and how it runs out of memory.
    dtype: the compute dtype ('float32' or 'bfloat16'; parameters are float32 in all).
    build: `build(workload, batch, torch_ref)` returning a trainer with `step()`,
      `sync(outputs)`, `memory()`, `release()` and attributes `device` and `model`.
    weighting: the task weighting method ('equal': the sum of the task losses).
  """
  name: str
  label: str
  framework: str
  dtype: str
  build: Callable[[Workload, dict[str, np.ndarray], str | None], Any]
  weighting: str = 'equal'


# Speed ratios are relative to this system, measured in the same run.
BASELINE = 'torch_eager'
# In run and display order. PyTorch runs first, over every workload, and hands its cached
# blocks back after each model: JAX's allocator keeps what it has grown to, so PyTorch would
# find the device full if it ran after JAX.
SYSTEMS = {
    'torch_eager': System('torch_eager', 'PyTorch eager float32', 'torch', 'float32',
                          lambda w, b, ref: TorchTrainer(w, b, 'eager', ref)),
    'torch_compile': System('torch_compile', 'PyTorch torch.compile float32 (forward + losses)',
                            'torch', 'float32',
                            lambda w, b, ref: TorchTrainer(w, b, 'compile', ref)),
    'torch_autocast_bf16': System('torch_autocast_bf16',
                                  'PyTorch eager, bfloat16 autocast (forward + losses)',
                                  'torch', 'bfloat16',
                                  lambda w, b, ref: TorchTrainer(w, b, 'autocast_bf16', ref)),
    'mtan_jax': System('mtan_jax', 'mtan_jax float32 (AOT-compiled, donated state)', 'jax',
                       'float32', lambda w, b, ref: JaxTrainer(w, b, 'float32')),
    'mtan_jax_bf16': System('mtan_jax_bf16',
                            'mtan_jax bfloat16 compute, float32 params (AOT-compiled)', 'jax',
                            'bfloat16', lambda w, b, ref: JaxTrainer(w, b, 'bfloat16')),
}


# `--methods all`: every weighting method but 'equal' (the mtan_jax row itself) and 'fixed'
# (which needs task weights, and costs what 'equal' does).
METHOD_CHOICES = tuple(m for m in mtan_weighting.METHODS if m not in ('equal', 'fixed'))
# Method rows' step times are relative to this system, measured in the same run.
METHOD_BASELINE = 'mtan_jax'


def method_system(method: str) -> System:
  """`mtan_jax` (float32) with task weighting `method` instead of equal weighting."""
  kind = 'gradient-based' if mtan_weighting.is_gradient_method(method) else 'loss-based'
  return System(f'{METHOD_BASELINE}+{method}',
                f'mtan_jax float32, {method} weighting ({kind}, AOT-compiled)', 'jax',
                'float32', lambda w, b, ref: JaxTrainer(w, b, 'float32', method), method)


def framework_platform(framework: str) -> str:
  """The platform a framework's systems run on: 'cpu', 'gpu' (or 'tpu' for JAX)."""
  if framework == 'torch':
    import torch  # pylint: disable=import-outside-toplevel
    return 'gpu' if torch.cuda.is_available() else 'cpu'
  return jax.devices()[0].platform


def torch_model_for(workload: Workload, torch_ref: str | None) -> dict[str, Any]:
  """Which PyTorch model the PyTorch systems train on `workload`.

  The reference `SegNet` hard-codes NYUv2's tasks, 13 classes and full widths, so
  `--torch-ref` applies only to workloads with exactly those; others fall back to the
  project's `TorchMTAN`, and the note says so.

  Returns:
    `torch_model` (description), `torch_ref` (the checkout used, or None) and `note`.
  """
  if torch_ref and workload.is_reference_nyuv2():
    return {'torch_model': f'lorenmt/mtan SegNet ({torch_ref})', 'torch_ref': torch_ref,
            'note': None}
  note = None
  if torch_ref:
    note = (f'--torch-ref does not fit workload {workload.name} (the reference SegNet is fixed '
            f'to semantic 13 + depth + normal at widths {",".join(map(str, DEFAULT_WIDTHS))}; '
            f'this workload has {" + ".join(workload.tasks)}, {workload.num_classes} classes, '
            f'widths {",".join(map(str, workload.widths))}): the project\'s TorchMTAN was used')
  return {'torch_model': 'mtan_jax.torch_reference.TorchMTAN', 'torch_ref': None, 'note': note}


# ----------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------

# Substrings of out-of-memory errors: XLA's status code (JAX raises JaxRuntimeError at
# compile or run time), PyTorch's allocator message, and cuDNN / cuBLAS workspace failures.
_OOM_MARKERS = ('resource_exhausted', 'out of memory', 'cudnn_status_alloc_failed',
                'cublas_status_alloc_failed')


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error`, or an error it was raised from, means the device ran out of memory.

  The chain is followed because torch.compile wraps errors raised while compiling.
  """
  torch = sys.modules.get('torch')
  oom_type = getattr(torch, 'OutOfMemoryError', None) if torch else None
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if oom_type is not None and isinstance(error, oom_type):
      return True
    if any(marker in str(error).lower() for marker in _OOM_MARKERS):
      return True
    error = error.__cause__ or error.__context__
  return False


def free_device_memory() -> None:
  """Returns what the last trainer held: Python garbage, PyTorch's cache, JAX's executables."""
  if 'torch._dynamo' in sys.modules:
    # Compiled graphs guard on, and so keep alive, the model they were compiled for.
    sys.modules['torch._dynamo'].reset()
  gc.collect()
  torch = sys.modules.get('torch')
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()
  jax.clear_caches()


def _time_training(system: System, workload: Workload, batch_size: int,
                   args: argparse.Namespace, torch_ref: str | None) -> dict[str, Any]:
  """Builds `system`, warms it up and times it; the fields of an 'ok' row."""
  start = time.perf_counter()
  trainer = system.build(workload, make_batch(workload, batch_size), torch_ref)
  setup_s = time.perf_counter() - start
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
  row = {'model': trainer.model, 'device': trainer.device,
         'images_per_s': statistics.median(rates), 'window_images_per_s': rates,
         'setup_s': setup_s, 'first_step_s': first_step_s,
         'other_processes_cpu_cores': other_cores, **trainer.memory()}
  trainer.release()
  return row


def measure(system: System, workload: Workload, batch_size: int, args: argparse.Namespace,
            train_gflop: float, mfu_tflops: float | None,
            torch_ref: str | None = None) -> dict[str, Any]:
  """Measures `system` at `batch_size`; an out-of-memory error gives a row with status 'oom'.

  Args:
    system: what to build.
    workload: model and input shape.
    batch_size: images per step.
    args: `windows`, `iters` and `warmup`.
    train_gflop: counted training GFLOPs per image.
    mfu_tflops: the MFU denominator in TFLOP/s, or None for no MFU.
    torch_ref: the lorenmt/mtan checkout for the PyTorch systems on this workload, or None.

  Returns:
    One result row (see `main` for the fields).

  Raises:
    Whatever the system raises other than running out of device memory.
  """
  row = {'workload': workload.name, 'system': system.name, 'label': system.label,
         'dtype': system.dtype, 'weighting': system.weighting, 'batch_size': batch_size,
         'status': 'ok', 'error': None,
         'model': None, 'device': None, 'images_per_s': None, 'window_images_per_s': None,
         'setup_s': None, 'first_step_s': None, 'tflops': None, 'mfu': None,
         'peak_memory_bytes': None, 'peak_memory_per_image_bytes': None,
         'memory_source': None, 'other_processes_cpu_cores': None,
         'ratio_to_torch_eager': None, 'step_time_ratio_to_equal': None, 'largest_fit': False}
  try:
    row.update(_time_training(system, workload, batch_size, args, torch_ref))
  except Exception as e:  # pylint: disable=broad-except
    if not is_out_of_memory(e):
      raise
    row.update(status='oom', error=f'{type(e).__name__}: {str(e).strip()[:500]}')
  # Outside the except clause: the traceback, which references the trainer's frames, is
  # gone, so the trainer's buffers can actually be freed.
  free_device_memory()
  if row['status'] == 'ok':
    row['tflops'] = row['images_per_s'] * train_gflop / 1e3
    row['mfu'] = row['tflops'] / mfu_tflops if mfu_tflops else None
    if row['peak_memory_bytes'] is not None:
      row['peak_memory_per_image_bytes'] = row['peak_memory_bytes'] / batch_size
  return row


def sweep_batch_sizes(measure_at: Callable[[int], dict[str, Any]], batch_sizes: Sequence[int],
                      search_max: bool,
                      max_batch: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Measures the listed batch sizes, then (with `search_max`) doubles until out of memory.

  Sizes above one that ran out of memory are not tried: memory grows with the batch. The
  doubling starts from the largest listed size that fit and stops at the first size that
  runs out of memory, or before exceeding `max_batch`.

  Args:
    measure_at: measures one batch size and returns its row (status 'ok' or 'oom').
    batch_sizes: the listed sizes.
    search_max: whether `max` was asked for.
    max_batch: the largest size the doubling may try.

  Returns:
    (rows in measured order, summary) where the summary has `largest_fit` (the largest size
    that fit, or None), `stopped_by` ('oom', 'max_batch', 'no listed size fit', or None
    without `search_max`) and `skipped` (listed sizes not tried).
  """
  rows, skipped = [], []
  smallest_oom = math.inf
  for size in sorted(set(batch_sizes)):
    if size >= smallest_oom:
      skipped.append(size)
      continue
    rows.append(measure_at(size))
    if rows[-1]['status'] == 'oom':
      smallest_oom = size
  fits = [r['batch_size'] for r in rows if r['status'] == 'ok']
  largest = max(fits, default=None)
  stopped_by = None
  if search_max:
    if largest is None:
      stopped_by = 'no listed size fit'
    while largest is not None and stopped_by is None:
      size = 2 * largest
      if size >= smallest_oom:
        stopped_by = 'oom'
      elif size > max_batch:
        stopped_by = 'max_batch'
      else:
        rows.append(measure_at(size))
        if rows[-1]['status'] == 'ok':
          largest = size
        else:
          smallest_oom = size
    for row in rows:
      row['largest_fit'] = row['status'] == 'ok' and row['batch_size'] == largest
  return rows, {'largest_fit': largest, 'stopped_by': stopped_by, 'skipped': skipped}


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
  """Sets each row's `ratio_to_torch_eager`: its rate over torch_eager's, same workload and
  batch size (None where either has no rate); and each method row's (`mtan_jax+<method>`)
  `step_time_ratio_to_equal`: mtan_jax's rate over its own, i.e. its step time over equal
  weighting's (None where either has no rate, and on other rows)."""
  def rates(system):
    return {(r['workload'], r['batch_size']): r['images_per_s'] for r in results
            if r['system'] == system and r['status'] == 'ok'}

  base, equal = rates(BASELINE), rates(METHOD_BASELINE)
  for row in results:
    key = (row['workload'], row['batch_size'])
    ok = row['status'] == 'ok'
    ref = base.get(key)
    row['ratio_to_torch_eager'] = row['images_per_s'] / ref if ref and ok else None
    ref = equal.get(key)
    is_method_row = row['system'].startswith(METHOD_BASELINE + '+')
    row['step_time_ratio_to_equal'] = (ref / row['images_per_s']
                                       if is_method_row and ref and ok else None)


def sort_rows(results: list[dict[str, Any]], workloads: Sequence[str]) -> list[dict[str, Any]]:
  """Rows grouped by workload (in the given order) and batch size, systems in SYSTEMS order,
  then the method rows in METHOD_CHOICES order."""
  order = [*SYSTEMS, *(f'{METHOD_BASELINE}+{m}' for m in METHOD_CHOICES)]
  return sorted(results, key=lambda r: (workloads.index(r['workload']), r['batch_size'],
                                        order.index(r['system']) if r['system'] in order
                                        else len(order)))


# ----------------------------------------------------------------------------------------
# Goals
# ----------------------------------------------------------------------------------------

GOAL_BATCH = 8
# (system, baseline, minimum images/s ratio) at GOAL_BATCH, same workload, same run.
SPEED_GOALS = (('mtan_jax', 'torch_eager', 2.0),
               ('mtan_jax', 'torch_compile', 1.3),
               ('mtan_jax_bf16', 'torch_eager', 3.0))
# (system, minimum of its best MFU over batch sizes).
MFU_GOAL = ('mtan_jax_bf16', 0.40)
# (system, baseline): peak memory per image no higher than the baseline's, at every batch.
MEMORY_GOALS = (('mtan_jax', 'torch_eager'), ('mtan_jax_bf16', 'torch_autocast_bf16'))
# Largest step time of a gradient-based method's row over mtan_jax's (equal weighting) at
# GOAL_BATCH: the per-task backward passes are vmapped into one step, not run T times.
METHOD_STEP_TIME_GOAL = 1.5
CPU_GOAL_NOTE = 'CPU run: goals are defined for one H100'


def evaluate_goals(results: Sequence[dict[str, Any]], workloads: Sequence[str],
                   device_note: str | None = None) -> list[dict[str, Any]]:
  """Checks the project's goals against the rows of one run.

  Goals, per workload: at batch 8, mtan_jax >= 2.0x torch_eager and >= 1.3x torch_compile,
  mtan_jax_bf16 >= 3.0x torch_eager (float32); mtan_jax_bf16's best MFU >= 40%; at every
  batch size, peak memory per image of mtan_jax <= torch_eager's and of mtan_jax_bf16 <=
  torch_autocast_bf16's. A size at which only the baseline ran out of memory counts as met,
  one at which only the system did as not met. For each gradient-based method with a row
  (`--methods`): its step time at batch 8 <= 1.5x mtan_jax's (equal weighting).

  Args:
    results: rows from `measure` (with ratios not needed).
    workloads: the workload names to evaluate.
    device_note: set when the numbers cannot speak to the goals (a CPU run): every goal is
      then 'not measured' with this note, its value still computed for information.

  Returns:
    One dict per goal: `kind` ('speed': images/s ratio; 'mfu'; 'memory': ratio of peak
    memory per image), `workload`, `goal`, `batch_size`, `value`, `target`, `status` ('met',
    'not met' or 'not measured') and `note`; 'step_time' goals (value: the method row's
    step time over mtan_jax's) follow the others, one per gradient-based method measured.
  """
  rows = {(r['workload'], r['system'], r['batch_size']): r for r in results}
  goals = []

  def add(kind, workload, goal, batch_size, value, target, met, note):
    status = 'not measured' if met is None else ('met' if met else 'not met')
    if device_note is not None:
      status, note = 'not measured', device_note if note is None else f'{device_note}; {note}'
    goals.append({'kind': kind, 'workload': workload, 'goal': goal, 'batch_size': batch_size,
                  'value': value, 'target': target, 'status': status, 'note': note})

  def missing(workload, system, batch_size):
    row = rows.get((workload, system, batch_size))
    if row is None:
      return f'{system} not measured at batch {batch_size}'
    return None if row['status'] == 'ok' else f'{system} ran out of memory at batch {batch_size}'

  for workload in workloads:
    for system, baseline, target in SPEED_GOALS:
      goal = f'{system} / {baseline} images/s at batch {GOAL_BATCH} >= {target}'
      note = missing(workload, system, GOAL_BATCH) or missing(workload, baseline, GOAL_BATCH)
      if note:
        add('speed', workload, goal, GOAL_BATCH, None, target, None, note)
        continue
      value = (rows[workload, system, GOAL_BATCH]['images_per_s']
               / rows[workload, baseline, GOAL_BATCH]['images_per_s'])
      add('speed', workload, goal, GOAL_BATCH, value, target, value >= target, None)

    system, target = MFU_GOAL
    goal = f'best MFU of {system} over batch sizes >= {target:.0%}'
    measured = [r for r in results if r['workload'] == workload and r['system'] == system
                and r['status'] == 'ok' and r['mfu'] is not None]
    if measured:
      best = max(measured, key=lambda r: r['mfu'])
      add('mfu', workload, goal, best['batch_size'], best['mfu'], target,
          best['mfu'] >= target, None)
    else:
      add('mfu', workload, goal, None, None, target, None, f'no MFU of {system} measured')

    for system, baseline in MEMORY_GOALS:
      goal = f"{system} peak memory per image <= {baseline}'s"
      sizes = sorted({b for (w, s, b) in rows if w == workload and s in (system, baseline)})
      if not sizes:
        add('memory', workload, goal, None, None, 1.0, None,
            f'neither {system} nor {baseline} measured')
      for size in sizes:
        value, met, note = _compare_memory(rows.get((workload, system, size)),
                                           rows.get((workload, baseline, size)),
                                           system, baseline, size)
        add('memory', workload, goal, size, value, 1.0, met, note)

    # Only the methods this run measured: without --methods there are no such goals.
    measured = {r['system'] for r in results if r['workload'] == workload}
    for method in METHOD_CHOICES:
      system = f'{METHOD_BASELINE}+{method}'
      if system not in measured or not mtan_weighting.is_gradient_method(method):
        continue
      target = METHOD_STEP_TIME_GOAL
      goal = f'{system} / {METHOD_BASELINE} step time at batch {GOAL_BATCH} <= {target}'
      note = (missing(workload, system, GOAL_BATCH)
              or missing(workload, METHOD_BASELINE, GOAL_BATCH))
      if note:
        add('step_time', workload, goal, GOAL_BATCH, None, target, None, note)
        continue
      value = (rows[workload, METHOD_BASELINE, GOAL_BATCH]['images_per_s']
               / rows[workload, system, GOAL_BATCH]['images_per_s'])
      add('step_time', workload, goal, GOAL_BATCH, value, target, value <= target, None)
  return goals


def _compare_memory(mine: dict[str, Any] | None, theirs: dict[str, Any] | None, system: str,
                    baseline: str, size: int) -> tuple[float | None, bool | None, str]:
  """(ratio of peak memory per image, met or None if not measured, note) at one batch size."""
  if mine is None or theirs is None:
    return None, None, f'{system if mine is None else baseline} not measured at batch {size}'
  if mine['status'] == 'oom' and theirs['status'] == 'oom':
    return None, None, 'both ran out of memory'
  if mine['status'] == 'oom' or theirs['status'] == 'oom':
    # Running out of memory where the other fits means needing more than the other.
    loser = system if mine['status'] == 'oom' else baseline
    return None, loser == baseline, f'only {loser} ran out of memory'
  if mine['peak_memory_per_image_bytes'] is None or theirs['peak_memory_per_image_bytes'] is None:
    absent = system if mine['peak_memory_per_image_bytes'] is None else baseline
    return None, None, f'{absent} reports no peak memory here'
  value = mine['peak_memory_per_image_bytes'] / theirs['peak_memory_per_image_bytes']
  return value, value <= 1.0, (f'{_format_bytes(mine["peak_memory_per_image_bytes"])} vs '
                               f'{_format_bytes(theirs["peak_memory_per_image_bytes"])} per image')


# ----------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------

def environment(argv: Sequence[str], load_before: Sequence[float]) -> dict[str, Any]:
  """Versions, devices and machine facts that the numbers depend on.

  PyTorch facts are recorded only when a PyTorch system ran (torch is then imported).

  Args:
    argv: the command-line arguments of this run.
    load_before: `os.getloadavg()` taken before the measurements.
  """
  torch = sys.modules.get('torch')
  device = jax.devices()[0]
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  versions = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
              'optax': optax.__version__, 'numpy': np.__version__}
  env = {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': shlex.join(['python', 'benchmarks/throughput.py', *argv]),
      'git_commit': commit,
      **_gpu_info(device),
      'jax_backend': jax.default_backend(),
      'jax_device_kind': device.device_kind,
      'jax_device_count': jax.device_count(),
      'jax_platform_version': getattr(getattr(device, 'client', None), 'platform_version', None),
      'jax_compute_capability': getattr(device, 'compute_capability', None),
      'cpu_count': _cpu_count(),
      'cpu_model': _cpu_model(),
      # Other processes on the machine slow CPU runs down; the load says how busy it was.
      'load_average_1_5_15_before': list(load_before),
      'load_average_1_5_15_after': list(os.getloadavg()),
      'jax_default_matmul_precision': jax.config.jax_default_matmul_precision,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'xla_python_client_preallocate': os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'),
      'xla_python_client_mem_fraction': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'),
      'python': platform.python_version(),
      'platform': platform.platform(),
      'versions': versions,
  }
  if torch is not None:
    versions['torch'] = torch.__version__
    env.update({
        'torch_device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
        'torch_cuda_version': torch.version.cuda,
        'torch_num_threads': torch.get_num_threads(),
        'torch_cudnn_benchmark': torch.backends.cudnn.benchmark,
        'torch_cudnn_allow_tf32': torch.backends.cudnn.allow_tf32,
    })
  return env


def _gpu_info(device: Any) -> dict[str, Any]:
  """GPU name and driver version from nvidia-smi, else from PyTorch or JAX (no driver version)."""
  try:
    out = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version', '--format=csv,noheader'],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    first = next(line for line in out.splitlines() if line.strip())
    name, driver = (part.strip() for part in first.split(',', 1))
    return {'gpu_name': name, 'gpu_driver_version': driver, 'gpu_info_source': 'nvidia-smi'}
  except (OSError, subprocess.SubprocessError, StopIteration, ValueError):
    pass
  torch = sys.modules.get('torch')
  if torch is not None and torch.cuda.is_available():
    return {'gpu_name': torch.cuda.get_device_name(), 'gpu_driver_version': None,
            'gpu_info_source': 'torch'}
  if device.platform == 'gpu':
    return {'gpu_name': device.device_kind, 'gpu_driver_version': None, 'gpu_info_source': 'jax'}
  return {'gpu_name': None, 'gpu_driver_version': None, 'gpu_info_source': None}


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


def _batch_sizes(text: str) -> tuple[tuple[int, ...], bool]:
  """'2,8,32,max' -> ((2, 8, 32), True)."""
  items = [v.strip() for v in text.split(',') if v.strip()]
  search_max = 'max' in items
  sizes = _int_list(','.join(v for v in items if v != 'max')) if len(items) > search_max else ()
  if not sizes:
    raise argparse.ArgumentTypeError(
        f'expected a comma-separated list of integers (and optionally max, which doubles the '
        f'largest listed size that fit), got {text!r}')
  return sizes, search_max


def _name_list(choices: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
  """An argparse type for a comma list of names from `choices` (duplicates dropped)."""
  def parse(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in text.split(',') if v.strip()))
    unknown = [n for n in names if n not in choices]
    if not names or unknown:
      raise argparse.ArgumentTypeError(
          f'unknown {what} {",".join(unknown) or repr(text)}; expected a comma list of '
          f'{", ".join(choices)}')
    return names
  return parse


def _methods(text: str) -> tuple[str, ...]:
  """'all' -> METHOD_CHOICES; else a comma list of them (duplicates dropped)."""
  if text.strip() == 'all':
    return METHOD_CHOICES
  return _name_list(METHOD_CHOICES, 'method')(text)


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}')
  return value


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[Workload]]:
  """Parses the command line and resolves the workloads with their overrides.

  Returns:
    (args, workloads). `args.batch_sizes` is the tuple of listed sizes and `args.search_max`
    whether `max` was given; `args.systems` is a tuple of SYSTEMS keys, with mtan_jax added
    when `args.methods` (a tuple of METHOD_CHOICES) is not empty.
  """
  parser = argparse.ArgumentParser(
      description='Training throughput (forward + backward + Adam) and peak memory of mtan_jax '
                  'vs PyTorch on synthetic batches.')
  parser.add_argument('--workload', type=_name_list(sorted(WORKLOADS), 'workload'),
                      default=('tiny',),
                      help='comma list, each measured in the same run. cityscapes: semantic 7 + '
                           'depth, 128x256; nyuv2: semantic 13 + depth + normal, 288x384; tiny: '
                           'cityscapes tasks at 64x128, widths 8,16,16,32,32 (default tiny)')
  parser.add_argument('--systems', type=_name_list(list(SYSTEMS), 'system'),
                      default=tuple(SYSTEMS),
                      help=f'comma list of {", ".join(SYSTEMS)} (default: all)')
  parser.add_argument('--methods', type=_methods, default=(),
                      help='comma list of task weighting methods, each measured as one more '
                           'system mtan_jax+<method> (float32) next to mtan_jax (added to '
                           f'--systems if missing), or all: {", ".join(METHOD_CHOICES)} '
                           '(default: none)')
  parser.add_argument('--widths', type=_int_list,
                      help='override the five SegNet widths of every workload, e.g. '
                           '64,128,256,512,512')
  parser.add_argument('--height', type=int,
                      help='override the input height of every workload (multiple of 32)')
  parser.add_argument('--width', type=int,
                      help='override the input width of every workload (multiple of 32)')
  parser.add_argument('--batch-sizes', type=_batch_sizes, default=DEFAULT_BATCH_SIZES,
                      help='comma list of sizes; max: then double the largest that fit until '
                           'the device runs out of memory, per system (skipped on CPU) '
                           '(default %(default)s)')
  parser.add_argument('--max-batch', type=_positive_int, default=1024,
                      help='largest batch the max search tries (default %(default)s)')
  parser.add_argument('--windows', type=_positive_int, default=5,
                      help='timed windows; the median is reported (default %(default)s)')
  parser.add_argument('--iters', type=_positive_int, default=10,
                      help='train steps per timed window (default %(default)s)')
  parser.add_argument('--warmup', type=int, default=2,
                      help='untimed steps after the first one (default %(default)s)')
  parser.add_argument('--torch-ref', metavar='PATH',
                      help='lorenmt/mtan checkout: the PyTorch systems train its SegNet class on '
                           'the workloads it fits (NYUv2 tasks, 13 classes, full widths) and the '
                           "project's TorchMTAN on the others")
  parser.add_argument('--matmul-size', type=_positive_int,
                      help='side of the square bf16 matmul that measures the MFU denominator '
                           f'(default {DEFAULT_MATMUL_SIZE["gpu"]} on GPU, '
                           f'{DEFAULT_MATMUL_SIZE["cpu"]} on CPU)')
  parser.add_argument('--peak-tflops', type=float,
                      help='MFU denominator in TFLOP/s instead of the measured bf16 matmul rate')
  parser.add_argument('--out', metavar='FILE', help='write the results as JSON here')
  args = parser.parse_args(argv)

  args.batch_sizes, args.search_max = args.batch_sizes
  if args.methods and METHOD_BASELINE not in args.systems:
    # Each method row's step time is relative to equal weighting's, measured in this run.
    args.systems = (*args.systems, METHOD_BASELINE)
  workloads = []
  try:
    widths = check_widths(args.widths) if args.widths else None
    for name in args.workload:
      base = WORKLOADS[name]
      workload = dataclasses.replace(base, widths=widths or base.widths,
                                     height=args.height or base.height,
                                     width=args.width or base.width)
      check_input_size(workload.height, workload.width)
      workloads.append(workload)
  except ConfigError as e:
    parser.error(str(e))
  if args.torch_ref and not os.path.isfile(os.path.join(args.torch_ref, REFERENCE_SCRIPT)):
    parser.error(f'--torch-ref {args.torch_ref}: no {REFERENCE_SCRIPT} there; give the root of '
                 'a lorenmt/mtan checkout')
  if args.warmup < 0:
    parser.error(f'--warmup must be >= 0, got {args.warmup}')
  if args.peak_tflops is not None and args.peak_tflops <= 0:
    parser.error(f'--peak-tflops must be positive, got {args.peak_tflops}')
  return args, workloads


# ----------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------

def _format_bytes(value: float | None) -> str:
  if value is None:
    return 'n/a'
  if value >= 2**30:
    return f'{value / 2**30:.2f} GiB'
  return f'{value / 2**20:.1f} MiB'


def _status(row: dict[str, Any], searches: dict[tuple[str, str], dict[str, Any]]) -> str:
  if row['status'] != 'ok' or not row['largest_fit']:
    return row['status']
  search = searches.get((row['workload'], row['system']), {})
  if search.get('stopped_by') == 'max_batch':
    return 'ok, largest fit up to --max-batch'
  return 'ok, largest fit'


def format_table(results: list[dict[str, Any]],
                 searches: dict[tuple[str, str], dict[str, Any]] | None = None) -> str:
  """The results as one Markdown table, rows as given (see `sort_rows`)."""
  header = ('workload', 'batch', 'system', 'status', 'images/s', 'vs torch eager',
            'step time vs equal', 'TFLOP/s', 'MFU', 'peak memory', 'memory / image',
            'other processes (CPU cores)')
  rows = [header, ('---',) * len(header)]

  def fmt(value, spec, scale=1.0, suffix=''):
    return 'n/a' if value is None else f'{scale * value:{spec}}{suffix}'

  for r in results:
    rows.append((r['workload'], str(r['batch_size']), r['system'], _status(r, searches or {}),
                 fmt(r['images_per_s'], '.3g'), fmt(r['ratio_to_torch_eager'], '.2f', suffix='x'),
                 fmt(r.get('step_time_ratio_to_equal'), '.2f', suffix='x'),
                 fmt(r['tflops'], '.3g'), fmt(r['mfu'], '.3g', 100, '%'),
                 _format_bytes(r['peak_memory_bytes']),
                 _format_bytes(r['peak_memory_per_image_bytes']),
                 fmt(r['other_processes_cpu_cores'], '.2f')))
  return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)


def format_goals(goals: list[dict[str, Any]]) -> str:
  """The goal checks as a Markdown table."""
  header = ('workload', 'goal', 'batch', 'value', 'status', 'note')
  rows = [header, ('---',) * len(header)]
  for g in goals:
    if g['value'] is None:
      value = 'n/a'
    elif g['kind'] == 'mfu':
      value = f'{100 * g["value"]:.1f}%'
    else:
      value = f'{g["value"]:.2f}x'
    batch = 'n/a' if g['batch_size'] is None else str(g['batch_size'])
    rows.append((g['workload'], g['goal'], batch, value, g['status'], g['note'] or ''))
  return '\n'.join('| ' + ' | '.join(row) + ' |' for row in rows)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def describe_workloads(workloads: Sequence[Workload],
                       torch_ref: str | None) -> list[dict[str, Any]]:
  """Each workload's shape, counted FLOPs and PyTorch model, printed and returned for the JSON."""
  described = []
  for workload in workloads:
    info = {**dataclasses.asdict(workload), 'flops': flop_summary(workload)}
    torch_model = torch_model_for(workload, torch_ref)
    info.update(torch_model=torch_model['torch_model'], torch_ref=torch_model['torch_ref'],
                torch_model_note=torch_model['note'])
    described.append(info)
    print(f'workload {workload.name}: tasks {",".join(workload.tasks)} ({workload.num_classes} '
          f'classes), {workload.height}x{workload.width}, widths {workload.widths}; counted '
          f'FLOPs per image: forward {info["flops"]["forward_gmac_per_image"]:.3g} GMAC, '
          f'training {info["flops"]["train_gflop_per_image"]:.3g} GFLOP')
    print(f'  PyTorch model: {info["torch_model"]}')
    if info['torch_model_note']:
      print(f'  note: {info["torch_model_note"]}')
  return described


def measure_system(system: System, workload: Workload, info: dict[str, Any],
                   args: argparse.Namespace, mfu_tflops: float,
                   search_max: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Measures one system on one workload at every batch size, printing progress.

  Args:
    system: what to measure.
    workload: model and input shape.
    info: the workload's entry from `describe_workloads` (FLOPs, --torch-ref to use).
    args: the parsed command line.
    mfu_tflops: the MFU denominator.
    search_max: whether to search for the largest batch that fits.

  Returns:
    The rows and the summary of `sweep_batch_sizes`.
  """
  def measure_at(batch_size):
    print(f'measuring {workload.name} / {system.name} at batch {batch_size} ...', flush=True)
    row = measure(system, workload, batch_size, args, info['flops']['train_gflop_per_image'],
                  mfu_tflops, info['torch_ref'])
    if row['status'] == 'ok':
      print(f'  {row["images_per_s"]:.4g} images/s (setup {row["setup_s"]:.1f} s, first '
            f'step {row["first_step_s"]:.1f} s)', flush=True)
    else:
      print(f'  out of memory: {row["error"][:200]}', flush=True)
    return row

  rows, search = sweep_batch_sizes(measure_at, args.batch_sizes, search_max, args.max_batch)
  if search['skipped']:
    print(f'  skipped batch sizes {search["skipped"]}: a smaller one ran out of memory')
  return rows, search


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints the table and the goals, and optionally writes JSON.

  Args:
    argv: command-line arguments (default: sys.argv[1:]).

  Returns:
    The report: `environment`; `workloads` (each with its shape, counted `flops`,
    `torch_model` and the `torch_model_note` on a --torch-ref fallback); `settings`; `matmul`
    (the measured bf16 matmul rate) and `mfu_denominator_tflops` / `mfu_denominator_source`;
    `results`, one row per (workload, system, batch size) with status ('ok' or 'oom'), error
    (on 'oom'), dtype, images_per_s (median over windows), window_images_per_s,
    ratio_to_torch_eager (same workload and batch), weighting (the task weighting method),
    step_time_ratio_to_equal (method rows: step time over mtan_jax's, same workload and
    batch), tflops, mfu, peak_memory_bytes (XLA's
    memory analysis for JAX, torch.cuda.max_memory_allocated on GPU for PyTorch, else None),
    peak_memory_per_image_bytes, memory_source, for JAX also memory_analysis and
    device_peak_bytes_in_use, largest_fit (the largest size that fit in a max search),
    setup_s (building, and for JAX compiling), first_step_s, other_processes_cpu_cores (CPU
    cores other processes kept busy during the timed windows; Linux only), device and model;
    `max_batch_search` (per workload and system); `goals` (see `evaluate_goals`); and
    `goals_note` (set when the GPU is not an H100).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  args, workloads = parse_args(argv)
  # JAX must not grab most of the GPU when its backend starts: the PyTorch systems share the
  # device in this process. Without preallocation XLA still caps its allocator at this
  # fraction of the device (default 0.75), which would make JAX's largest batch look small
  # next to PyTorch's. Backends start lazily, so setting these before first use suffices.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.95')
  systems = [s for s in SYSTEMS.values() if s.name in args.systems]
  systems += [method_system(m) for m in args.methods]
  if any(s.framework == 'torch' for s in systems):
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(_cpu_count())
    # Lets cuDNN pick its fastest convolution algorithms for these fixed shapes: the
    # strongest fair eager baseline. XLA autotunes its own by default.
    torch.backends.cudnn.benchmark = True
  platforms = {f: framework_platform(f) for f in sorted({s.framework for s in systems})}

  workload_info = describe_workloads(workloads, args.torch_ref)

  jax_platform = jax.devices()[0].platform
  matmul_size = args.matmul_size or DEFAULT_MATMUL_SIZE['cpu' if jax_platform == 'cpu' else 'gpu']
  print(f'measuring the bf16 matmul rate ({matmul_size}x{matmul_size}) ...', flush=True)
  matmul = measure_matmul_tflops(matmul_size)
  free_device_memory()
  mfu_tflops = args.peak_tflops or matmul['tflops']
  mfu_source = ('--peak-tflops' if args.peak_tflops
                else f'measured bf16 matmul on {matmul["device"]}')
  print(f'  {matmul["tflops"]:.4g} TFLOP/s on {matmul["device"]} (median of {matmul["repeats"]}); '
        f'MFU denominator: {mfu_tflops:.4g} TFLOP/s ({mfu_source})')
  on_cpu = [s.name for s in systems if platforms[s.framework] == 'cpu']
  if args.search_max and on_cpu:
    print(f'note: batch size max is skipped for {", ".join(on_cpu)} on CPU: host memory, not '
          'device memory, would run out')

  load_before = os.getloadavg()
  results, searches = [], {}
  for system in systems:
    for workload, info in zip(workloads, workload_info):
      search_max = args.search_max and platforms[system.framework] != 'cpu'
      rows, search = measure_system(system, workload, info, args, mfu_tflops, search_max)
      results.extend(rows)
      if search_max:
        searches[workload.name, system.name] = search
  add_ratios(results)
  names = [w.name for w in workloads]
  results = sort_rows(results, names)
  device_note = CPU_GOAL_NOTE if 'cpu' in platforms.values() else None
  goals = evaluate_goals(results, names, device_note)
  goals_note = None
  if device_note is None and 'H100' not in jax.devices()[0].device_kind:
    goals_note = (f'measured on {jax.devices()[0].device_kind}; the goals are defined for one '
                  'H100')

  report = {
      'environment': environment(argv, load_before),
      'workloads': workload_info,
      'settings': {'systems': [s.name for s in systems],
                   'batch_sizes': [*args.batch_sizes, *(['max'] if args.search_max else [])],
                   'max_batch': args.max_batch, 'windows': args.windows,
                   'iters_per_window': args.iters, 'warmup': args.warmup,
                   'learning_rate': LEARNING_RATE, 'weighting': 'equal',
                   'methods': list(args.methods),
                   'platforms': platforms},
      'matmul': matmul,
      'mfu_denominator_tflops': mfu_tflops,
      'mfu_denominator_source': mfu_source,
      'results': results,
      'max_batch_search': [{'workload': w, 'system': s, **v} for (w, s), v in searches.items()],
      'goals': goals,
      'goals_note': goals_note,
  }
  print()
  print(format_table(results, searches))
  print(f'MFU: model TFLOP/s over {mfu_tflops:.4g} TFLOP/s ({mfu_source})'
        + ('; on CPU this is relative to the CPU\'s own bf16 matmul rate, not a GPU figure'
           if jax_platform == 'cpu' else ''))
  if any(r['status'] == 'ok' and r['peak_memory_bytes'] is None for r in results):
    print('peak memory: n/a where the framework does not report it (PyTorch on CPU)')
  print()
  print('Goals (defined for one H100; only numbers from this run are compared):')
  print(format_goals(goals))
  if goals_note:
    print(f'note: {goals_note}')
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
      f.write('\n')
    print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
