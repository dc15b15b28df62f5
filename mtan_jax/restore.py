"""Loading a trained model back from a workdir, for evaluation, prediction and export.

`load_run(workdir, step)` rebuilds the model the run's `config.json` describes, restores the
checkpoint's parameters and BatchNorm statistics onto every device (replicated, whatever
device layout trained it) and returns them with the run's tasks and input transforms. A
checkpoint converted from PyTorch (`scripts/convert_torch_checkpoint.py`) loads the same way.

Errors are one line: a missing workdir or config, a workdir without checkpoints, an unknown
step (listing the ones there are), and a checkpoint whose arrays do not fit the config's
model (a different model, task list, class count or width).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from mtan_jax import runs, sharding
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.data.pipeline import Transforms, transforms_from_config
from mtan_jax.errors import DataError
from mtan_jax.steps import Steps, create_model, make_optimizer
from mtan_jax.tasks import Task, make_tasks


@dataclasses.dataclass
class LoadedRun:
  """A trained model restored from a workdir.

  Attributes:
    workdir: the run's directory.
    config: its config.
    step: the restored checkpoint's step.
    tasks: the tasks, in head order.
    transforms: the input transforms (`image_channels`, self-supervised targets).
    steps: the step functions (`steps.predict`, `steps.eval_step`) bound to the model.
    params: restored parameters (replicated over `mesh`).
    batch_stats: restored BatchNorm statistics (replicated over `mesh`).
    mesh: all devices.
    meta: the checkpoint's metadata (data position, per-epoch history).
  """
  workdir: str
  config: ml_collections.ConfigDict
  step: int
  tasks: tuple[Task, ...]
  transforms: Transforms
  steps: Steps
  params: Any
  batch_stats: Any
  mesh: Any
  meta: dict[str, Any]

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(int(s) for s in self.config.image_size)

  def model(self) -> nnx.Module:
    """The model in evaluation mode (BatchNorm running statistics), holding the weights."""
    return self.steps.model(self.params, self.batch_stats, train=False)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in `workdir`; one-line error when there are none."""
  directory = os.path.join(workdir, 'checkpoints')
  found = sorted(int(name) for name in (os.listdir(directory) if os.path.isdir(directory) else ())
                 if name.isdigit() and os.path.isdir(os.path.join(directory, name)))
  if not found:
    raise DataError(f'{workdir} has no checkpoints (expected {directory}/<step>/); train it with '
                    f'scripts/train.py or import one with scripts/convert_torch_checkpoint.py')
  return found


def load_run(workdir: str, step: int | None = None,
             config: ml_collections.ConfigDict | None = None) -> LoadedRun:
  """Restores the model of the checkpoint at `step` (default: the newest) in `workdir`.

  Args:
    workdir: a directory written by scripts/train.py (or convert_torch_checkpoint.py).
    step: which checkpoint; None for the newest.
    config: the config to rebuild the model from; None reads `<workdir>/config.json`.
  """
  config = runs.load_config(workdir) if config is None else config
  available = checkpoint_steps(workdir)
  if step is None:
    step = available[-1]
  elif step not in available:
    raise DataError(f'{workdir} has no checkpoint at step {step}; it has steps '
                    f'{", ".join(map(str, available))}')
  image_size = tuple(int(s) for s in config.image_size)
  tasks = make_tasks(config.tasks, config.num_classes, image_size=image_size)
  transforms = transforms_from_config(config, [t.name for t in tasks])

  def make_model():
    return create_model(config.model, tasks, config.widths, config.seed, config.dtype,
                        in_channels=transforms.image_channels,
                        task_stacking=config.get('task_stacking', 'auto'), image_size=image_size,
                        head_hidden=config.get('head_hidden', 256))

  # The optimizer state's structure (not its values) must match what was saved.
  tx, _ = make_optimizer(config, steps_per_epoch=1)
  steps = Steps(nnx.eval_shape(make_model), tx, config.weighting, config.dwa_temperature,
                tuple(config.get('task_weights', ())), config.get('weighting_params', ''),
                config.get('seed', 0))
  shapes = jax.eval_shape(lambda: steps.state_from_model(make_model()))
  mesh = sharding.make_mesh()
  # Replicated: inference batches are split over devices, and any saved layout restores.
  shardings = sharding.state_shardings(shapes, mesh, fsdp=False)
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    state, meta = checkpointer.restore(sharding.with_shardings(shapes, shardings), step)
  finally:
    checkpointer.close()
  return LoadedRun(workdir=workdir, config=config, step=int(step), tasks=tasks,
                   transforms=transforms, steps=steps, params=state.params,
                   batch_stats=state.batch_stats, mesh=mesh, meta=meta)
