"""Evaluation: the training loop's validation metrics, and `scripts/evaluate.py`'s full run.

`metrics_over` is the one implementation of "metrics over a whole split" that both training
(every epoch) and `evaluate_run` use, so the numbers agree exactly: batches are split over
all devices and padded batches masked (`pipeline.eval_batches`), metric sums stay on the
devices until the end, and each task's `finalize` turns them into the reported values.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from mtan_jax import metrics, sharding
from mtan_jax.data.pipeline import KEY_SPECS, Transforms, eval_batches, example_shape
from mtan_jax.errors import ConfigError
from mtan_jax.restore import load_run

_add_stats = jax.jit(metrics.add_stats)


def device_batches(batches: Iterator[dict[str, np.ndarray]], data_sharding, rows: tuple[int, int],
                   size: int, ahead: int = 2):
  """Assembles global batches from this process's rows, a few steps ahead of their use."""
  queue = []
  for batch in batches:
    queue.append(sharding.global_batch(batch, data_sharding, rows, size))
    if len(queue) > ahead:
      yield queue.pop(0)
  yield from queue


def metrics_over(eval_step, params, batch_stats, source, keys: Sequence[str], batch_size: int, tasks,
                 data_sharding, transforms: Transforms, seed: int) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} over every example of `source`; sums stay on device until the end."""
  rows = sharding.process_rows(data_sharding, batch_size)
  total = None
  batches = eval_batches(source, keys, batch_size, rows, transforms, seed)
  for batch in device_batches(batches, data_sharding, rows, batch_size):
    stats = eval_step(params, batch_stats, batch)
    total = stats if total is None else _add_stats(total, stats)
  fetched = sharding.to_host(total)
  return {task.name: task.finalize(fetched[task.name]) for task in tasks}


def _source(config, split: str, task_names: Sequence[str]):
  """The data source of `split`: 'val', 'train', or for TFDS data sets any TFDS split string."""
  from mtan_jax.data import make_sources  # pylint: disable=g-import-not-at-top
  if split in ('val', 'train'):
    train, val = make_sources(config, task_names)
    return val if split == 'val' else train
  if config.dataset not in ('pets', 'cityscapes_tfds'):
    raise ConfigError(f'--split={split!r}: {config.dataset} has the splits train and val only')
  config = config.copy_and_resolve_references()
  config.val_split = split
  return make_sources(config, task_names)[1]


def evaluate_run(workdir: str, step: int | None = None, split: str = 'val',
                 data_dir: str | None = None, batch_size: int | None = None,
                 config=None) -> dict[str, Any]:
  """Evaluates a checkpoint of `workdir` on a whole split, sharded over all devices.

  Args:
    workdir: the run's directory (config.json and checkpoints/).
    step: the checkpoint; None for the newest.
    split: 'val' (the run's validation split), 'train', or a TFDS split string for TFDS
      data sets (e.g. 'test' for pets).
    data_dir: read the data from here instead of the config's data_dir (a run trained on
      another machine).
    batch_size: evaluation batch size; None for the config's eval_batch_size. It must be a
      multiple of the device count.
    config: a config to use instead of the workdir's config.json.

  Returns:
    {'workdir', 'step', 'split', 'num_examples', 'metrics': {task: {metric: value}}}.
  """
  run = load_run(workdir, step, config)
  config = run.config
  if data_dir:
    config = config.copy_and_resolve_references()
    config.data_dir = data_dir
  batch_size = int(batch_size or config.eval_batch_size)
  devices = run.mesh.size
  if batch_size < 1 or batch_size % devices:
    raise ConfigError(f'batch size {batch_size} is not a positive multiple of the {devices} devices')
  source = _source(config, split, [t.name for t in run.tasks if not t.self_supervised])
  if tuple(source.shape) != run.image_size:
    raise ConfigError(f'the {split} data is {tuple(source.shape)} but the model was trained at '
                      f'{run.image_size} (config.image_size)')
  keys = ('image',) + tuple(t.target_key for t in run.tasks)
  data_sharding = sharding.batch_sharding(run.mesh)
  h, w = source.shape
  channels = run.transforms.image_channels
  shapes = {k: (example_shape(k, h, w, channels), KEY_SPECS[k][0]) for k in keys}
  shapes['mask'] = ((), np.float32)
  spec = sharding.batch_spec(shapes, batch_size, data_sharding)
  rep = sharding.replicated(run.mesh)
  rep_tree = lambda tree: jax.tree.map(lambda _: rep, tree)  # noqa: E731
  eval_step = jax.jit(run.steps.eval_step,
                      in_shardings=(rep_tree(run.params), rep_tree(run.batch_stats),
                                    {k: v.sharding for k, v in spec.items()}),
                      out_shardings=rep)
  values = metrics_over(eval_step, run.params, run.batch_stats, source, keys, batch_size, run.tasks,
                        data_sharding, run.transforms, int(config.seed))
  return {'workdir': os.path.abspath(workdir), 'step': run.step, 'split': split,
          'num_examples': len(source), 'metrics': values}


def format_metrics(result: Mapping[str, Any]) -> str:
  """A plain-text table of `evaluate_run`'s result."""
  table = result['metrics']
  width = max(len(name) for values in table.values() for name in values)
  lines = [f'{result["split"]} metrics of step {result["step"]} ({result["num_examples"]} examples)']
  for task, values in table.items():
    lines.append(f'  {task}')
    lines += [f'    {name:<{width}}  {value:10.4f}' for name, value in values.items()]
  return '\n'.join(lines)


def write_result(result: Mapping[str, Any], path: str | None = None) -> str:
  """Writes the result as JSON (default `<workdir>/eval/step_<N>_<split>.json`); returns the path."""
  if path is None:
    safe = ''.join(c if c.isalnum() or c in '-_' else '_' for c in result['split'])
    path = os.path.join(result['workdir'], 'eval', f'step_{result["step"]}_{safe}.json')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  return path
