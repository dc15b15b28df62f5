"""Comparing training runs: one table with mean and std over seeds, size, speed and Delta_MTL.

Each run (a workdir written by `scripts/train.py`) is reduced as its own end-of-run report
is (`mtan_jax.report.summarize`): the validation metrics averaged over its last N evaluated
epochs. Runs whose configs differ only in `seed` and in keys that do not change the
experiment (`IGNORED_KEYS`: logging, checkpointing, paths, process layout) form one group,
one row of the table: the mean and the population std (numpy's default, ddof=0) of those
per-run values over the seeds, the trainable parameter count, the training throughput and,
against single-task baseline runs, Delta_MTL in both published conventions:

- `delta_m` (Nash-MTL / CAGrad / FAMO): mean relative change over all metrics, lower is
  better;
- `delta_mtl_libmtl` (LibMTL): mean over tasks of the mean relative improvement, higher is
  better.

Both are computed per seed against the mean of the baseline runs of each task, then
averaged over seeds, so their std is the seed-to-seed spread of the multi-task runs.

  table = compare(['runs/mtan_seed0', 'runs/mtan_seed1'],
                  baselines=['runs/stl_semantic', 'runs/stl_depth'], last=10)
  print(to_markdown(table))

`scripts/report.py` is the command-line front end. Nothing here imports TensorFlow; models
are only traced (`nnx.eval_shape`) to count their parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from flax import nnx

from mtan_jax import metrics, report, runs
from mtan_jax.data.pipeline import Transforms
from mtan_jax.errors import ConfigError, DataError, MtanError, one_line
from mtan_jax.models.segnet import DEFAULT_HEAD_HIDDEN
from mtan_jax.steps import count_params, create_model
from mtan_jax.tasks import make_tasks

# Config keys that do not change what is trained or how it is evaluated: runs differing only
# in these (and in `seed`) are repeats of one experiment.
IGNORED_KEYS = frozenset({
    'progress_bar', 'tensorboard', 'log_every_steps', 'checkpoint_every_steps',
    'keep_checkpoints', 'data_dir', 'distributed', 'coordinator_address', 'num_processes',
    'process_id', 'single_task_baselines', 'vis_images', 'eval_batch_size',
})

# 'mtan_dwa_seed3', 'mtan-s3', 'seed3' -> 'mtan_dwa', 'mtan', '' (the run name without its seed).
_SEED_SUFFIX = re.compile(r'(?:^|[_-])(?:seed|s)[_-]?\d+$')

IMAGES_PER_SEC = 'train/images_per_sec'


@dataclasses.dataclass
class RunResult:
  """One run, reduced to what the comparison needs.

  Attributes:
    workdir: the run's directory.
    config: its config.json.
    val: {task: {metric: mean over the last `last` evaluated epochs}}.
    epochs: the evaluated epochs that were averaged.
    params: trainable parameters of the run's model.
    images_per_sec: median of the logged `train/images_per_sec` (the median, because the
      first logged interval includes compilation and a resumed run restarts its timer);
      None if the run logged none.
  """
  workdir: str
  config: ml_collections.ConfigDict
  val: dict[str, dict[str, float]]
  epochs: list[int]
  params: int
  images_per_sec: float | None


@functools.lru_cache(maxsize=None)
def _param_count(model: str, task_names: tuple[str, ...], num_classes: int,
                 widths: tuple[int, ...], image_size: tuple[int, ...] | None,
                 task_stacking: str, head_hidden: int) -> int:
  tasks = make_tasks(task_names, num_classes, image_size=image_size)
  # The pipeline decides the input channels (1 with colorization); the other transforms do
  # not change them, so older configs without the augmentation keys still work.
  in_channels = Transforms(colorization='colorization' in [t.name for t in tasks]).image_channels
  # Seed and dtype change no shape: seed 0 and float32 let seeds share the cache entry and
  # count float64 runs without enabling 64-bit JAX here.
  abstract = nnx.eval_shape(lambda: create_model(
      model, tasks, widths, 0, 'float32', in_channels=in_channels, task_stacking=task_stacking,
      image_size=image_size, head_hidden=head_hidden))
  return count_params(abstract)


def _model_params(workdir: str, config: ml_collections.ConfigDict) -> int:
  """Parameter count of the model `config` describes, built abstractly (no arrays)."""
  try:
    image_size = config.get('image_size')
    return _param_count(str(config.model), tuple(str(t) for t in config.tasks),
                        int(config.get('num_classes', 7)),
                        tuple(int(w) for w in config.widths),
                        tuple(int(s) for s in image_size) if image_size else None,
                        str(config.get('task_stacking', 'auto')),
                        int(config.get('head_hidden', DEFAULT_HEAD_HIDDEN)))
  except MtanError as exc:
    raise DataError(f'{workdir}: cannot build the model of its config.json ({exc})') from None
  except (AttributeError, KeyError, TypeError, ValueError) as exc:
    raise DataError(f'{workdir}: cannot build the model of its config.json '
                    f'({type(exc).__name__}: {one_line(exc)})') from None


def _images_per_sec(workdir: str) -> float | None:
  if not os.path.exists(os.path.join(workdir, runs.METRICS_FILE)):
    return None
  _, values = runs.series(runs.read_scalars(workdir), IMAGES_PER_SEC)
  return float(np.median(values)) if values else None


def read_run(workdir: str, last: int = 10) -> RunResult:
  """Reads a workdir: config, last-`last`-epoch validation means, parameters, images/s.

  Raises:
    DataError: not a run directory, unreadable files, or no evaluated epoch yet.
  """
  config = runs.load_config(workdir)
  history = [record for record in runs.read_history(workdir) if record.get('val')]
  if not history:
    raise DataError(f'{workdir} has no evaluated epoch yet (no val metrics in '
                    f'{runs.HISTORY_FILE} or {runs.METRICS_FILE})')
  try:
    summary = report.summarize(history, last)
  except (KeyError, TypeError) as exc:
    raise DataError(f'{workdir}/{runs.HISTORY_FILE}: an averaged epoch lacks the val metric '
                    f'{one_line(exc)} that the last epoch reports') from None
  return RunResult(workdir=workdir, config=config, val=summary['val'], epochs=summary['epochs'],
                   params=_model_params(workdir, config),
                   images_per_sec=_images_per_sec(workdir))


def _experiment(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config keys that define the experiment (everything but the seed and IGNORED_KEYS)."""
  return {k: v for k, v in config.to_dict().items() if k != 'seed' and k not in IGNORED_KEYS}


def _group(results: Sequence[RunResult]) -> list[list[RunResult]]:
  """Runs of equal experiment, in order of first appearance."""
  groups: dict[str, list[RunResult]] = {}
  for result in results:
    key = json.dumps(_experiment(result.config), sort_keys=True, default=str)
    groups.setdefault(key, []).append(result)
  return list(groups.values())


def _format_value(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return ','.join(str(v) for v in value)
  return str(value)


def _labels(groups: Sequence[Sequence[RunResult]]) -> list[str]:
  """Workdir names without their seed suffix; equal names get the differing keys appended."""
  labels = []
  for group in groups:
    name = _SEED_SUFFIX.sub('', os.path.basename(os.path.normpath(group[0].workdir)))
    config = group[0].config
    labels.append(name or f'{config.model}/{config.get("weighting", "equal")}')
  out = list(labels)
  for label in set(labels):
    same = [i for i, other in enumerate(labels) if other == label]
    if len(same) < 2:
      continue
    tables = [_experiment(groups[i][0].config) for i in same]
    keys = sorted(k for k in set().union(*tables)
                  if len({json.dumps(t.get(k, '<unset>'), default=str) for t in tables}) > 1)
    for i, table in zip(same, tables):
      if keys:
        out[i] = label + ' ' + ' '.join(f'{k}={_format_value(table.get(k, "<unset>"))}' for k in keys)
  return out


def _load_all(workdirs: Sequence[str], last: int, what: str) -> list[RunResult]:
  seen: dict[str, str] = {}
  for workdir in workdirs:
    real = os.path.realpath(workdir)
    if real in seen:
      raise DataError(f'{what} {workdir} is given twice (also as {seen[real]})')
    seen[real] = workdir
  return [read_run(w, last) for w in workdirs]


def _baseline_values(baseline_runs: Sequence[RunResult], run_tasks: set[str]) -> dict[str, dict[str, float]]:
  """{task: {metric: mean over the baseline runs that have the task}}.

  Only metrics with a known direction (`metrics.HIGHER_IS_BETTER`) count; the validation
  loss has none and no paper's Delta_MTL includes it.
  """
  values: dict[str, dict[str, list[float]]] = {}
  for run in baseline_runs:
    if not set(run.val) & run_tasks:
      raise DataError(f'baseline {run.workdir} has tasks {", ".join(run.val)}, none of which the '
                      f'compared runs have ({", ".join(sorted(run_tasks))})')
    for task, table in run.val.items():
      for metric, value in table.items():
        if metric in metrics.HIGHER_IS_BETTER:
          values.setdefault(task, {}).setdefault(metric, []).append(value)
  return {task: {m: float(np.mean(v)) for m, v in table.items()} for task, table in values.items()}


def _mean_std(values: Sequence[float]) -> dict[str, float]:
  # Population std (ddof=0): the spread of the seeds that were run, 0.0 for a single seed.
  return {'mean': float(np.mean(values)), 'std': float(np.std(values))}


def _group_row(group: Sequence[RunResult], label: str, is_baseline: bool,
               baselines: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
  first = group[0]
  val: dict[str, dict[str, dict[str, float]]] = {}
  for task, table in first.val.items():
    for metric in table:
      missing = [r.workdir for r in group if metric not in r.val.get(task, {})]
      if missing:
        raise DataError(f'{missing[0]} lacks the val metric {task}/{metric} that {first.workdir} '
                        f'(same experiment, another seed) reports')
      val.setdefault(task, {})[metric] = _mean_std([r.val[task][metric] for r in group])
  rates = [r.images_per_sec for r in group if r.images_per_sec is not None]
  row: dict[str, Any] = {
      'label': label,
      'baseline': is_baseline,
      'workdirs': [r.workdir for r in group],
      'seeds': [r.config.get('seed') for r in group],
      'params': first.params,
      'images_per_sec': float(np.mean(rates)) if rates else None,
      'val': val,
      'runs': [{'workdir': r.workdir, 'seed': r.config.get('seed'), 'epochs': r.epochs,
                'images_per_sec': r.images_per_sec, 'val': r.val} for r in group],
  }
  covered = [task for task in first.val if task in baselines]
  if is_baseline or not covered:
    return row
  against = {task: dict(baselines[task]) for task in covered}
  for run, record in zip(group, row['runs']):
    try:
      record['delta_m'] = metrics.delta_m(run.val, against)
      record['delta_mtl_libmtl'] = metrics.delta_mtl_libmtl(run.val, against)
    except (KeyError, ValueError) as exc:
      message = exc.args[0] if exc.args else exc
      raise DataError(f'{run.workdir}: cannot compare with the baselines: {one_line(message)}') from None
  row['delta_tasks'] = covered
  row['delta_m'] = _mean_std([r['delta_m'] for r in row['runs']])
  row['delta_mtl_libmtl'] = _mean_std([r['delta_mtl_libmtl'] for r in row['runs']])
  return row


def compare(workdirs: Sequence[str], baselines: Sequence[str] = (), last: int = 10,
            labels: Sequence[str] | None = None) -> dict[str, Any]:
  """The comparison table of training runs, seeds grouped, against single-task baselines.

  Args:
    workdirs: run directories; runs of one experiment with different seeds become one row.
    baselines: baseline run directories (usually single-task, configs/single_task.py),
      grouped the same way and shown as rows marked baseline. Per task, each metric's
      baseline value is its mean over the baseline runs that have the task.
    last: how many final evaluated epochs each run's metrics are averaged over.
    labels: optional row labels of the run groups (not the baselines), in order of first
      appearance; by default a group is named after its workdir without the seed suffix.

  Returns:
    A JSON-able dict: 'last', 'baselines' ({task: {metric: value}} used for Delta) and
    'groups', baseline groups first, each with 'label', 'baseline', 'workdirs', 'seeds',
    'params', 'images_per_sec' (mean over seeds, None if no run logged it), 'val'
    ({task: {metric: {'mean', 'std'}}}, std over seeds with ddof=0) and 'runs' (per seed:
    workdir, seed, epochs, images_per_sec, val and its Delta values). Run groups sharing a
    task with the baselines also get 'delta_tasks' (the tasks compared), 'delta_m' and
    'delta_mtl_libmtl' ({'mean', 'std'} over seeds, percent).

  Raises:
    DataError: no runs, a directory that is not a readable run, a baseline sharing no task
      with the runs, or metrics the baselines have and a run lacks.
    ConfigError: `last` < 1 or a number of labels other than the number of run groups.
  """
  if not workdirs:
    raise DataError('no runs to compare; give one or more workdirs written by scripts/train.py')
  if int(last) < 1:
    raise ConfigError(f'last={last}; expected at least 1 evaluated epoch to average')
  results = _load_all(workdirs, last, 'run')
  baseline_results = _load_all(baselines, last, 'baseline')
  run_groups, baseline_groups = _group(results), _group(baseline_results)
  all_labels = _labels(baseline_groups + run_groups)
  baseline_labels, run_labels = all_labels[:len(baseline_groups)], all_labels[len(baseline_groups):]
  if labels is not None:
    if len(labels) != len(run_groups):
      raise ConfigError(f'{len(labels)} labels for {len(run_groups)} run groups '
                        f'({", ".join(run_labels)}); give one label per group')
    run_labels = [str(label) for label in labels]
  values = _baseline_values(baseline_results, {task for r in results for task in r.val})
  rows = [_group_row(g, label, True, values) for g, label in zip(baseline_groups, baseline_labels)]
  rows += [_group_row(g, label, False, values) for g, label in zip(run_groups, run_labels)]
  return {'last': int(last), 'baselines': values, 'groups': rows}


def _num(value: float) -> str:
  # 4 significant digits, trailing zeros kept so that columns line up (0.7400, 25.30).
  return f'{value:#.4g}'.rstrip('.')


def _delta(value: float) -> str:
  return f'{value:+.2f}'


def _cell(stats: Mapping[str, float], seeds: int, fmt=_num, std_fmt=_num) -> str:
  return fmt(stats['mean']) if seeds < 2 else f'{fmt(stats["mean"])} ± {std_fmt(stats["std"])}'


def _escape(text: str) -> str:
  return str(text).replace('|', '\\|')


def to_markdown(table: Mapping[str, Any]) -> str:
  """The table of `compare` as markdown: one row per group, one column per task metric.

  Only metrics with a known direction (`metrics.HIGHER_IS_BETTER`, marked ↑ / ↓) get a column;
  the validation losses are in the JSON.
  """
  groups = table['groups']
  columns: list[tuple[str, str]] = []
  for group in groups:
    for task, values in group['val'].items():
      columns += [(task, m) for m in values
                  if m in metrics.HIGHER_IS_BETTER and (task, m) not in columns]
  last = table['last']
  lines = [
      f'Validation metrics: mean ± std over seeds (population std, ddof=0; a single seed shows '
      f'its value) of each run\'s mean over its last {last} evaluated epochs. '
      f'Δm (%): Nash-MTL / CAGrad / FAMO convention, mean relative change over all metrics, '
      f'lower is better. Δ_MTL (%): LibMTL convention, mean over tasks of the mean relative '
      f'improvement, higher is better. Both are computed per seed against the mean of the '
      f'baseline runs of each task, then averaged over seeds.',
      '',
  ]
  arrows = {True: '↑', False: '↓'}
  header = ['run', 'seeds', 'params', 'images/s']
  header += [f'{task} {m} {arrows[metrics.HIGHER_IS_BETTER[m]]}' for task, m in columns]
  header += ['Δm (%) ↓', 'Δ_MTL LibMTL (%) ↑']
  lines.append('| ' + ' | '.join(header) + ' |')
  lines.append('|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|')
  notes = []
  for group in groups:
    n = len(group['runs'])
    label = _escape(group['label']) + (' (baseline)' if group['baseline'] else '')
    rate = group['images_per_sec']
    cells = [label, ', '.join(str(s) for s in group['seeds']), f'{group["params"]:,}',
             f'{rate:,.1f}' if rate is not None else '–']
    for task, m in columns:
      stats = group['val'].get(task, {}).get(m)
      cells.append(_cell(stats, n) if stats else '')
    for key in ('delta_m', 'delta_mtl_libmtl'):
      cells.append(_cell(group[key], n, _delta, lambda v: f'{v:.2f}') if key in group else '–')
    lines.append('| ' + ' | '.join(cells) + ' |')
    missing = [t for t in group['val'] if 'delta_tasks' in group and t not in group['delta_tasks']]
    if missing:
      notes.append(f'{group["label"]}: Δ covers {", ".join(group["delta_tasks"])} only '
                   f'(no baseline for {", ".join(missing)}).')
    for run in group['runs']:
      if len(run['epochs']) < last:
        notes.append(f'{run["workdir"]}: only {len(run["epochs"])} evaluated epochs averaged '
                     f'(epochs {run["epochs"][0]}..{run["epochs"][-1]}).')
  if notes:
    lines += [''] + [f'- {note}' for note in notes]
  return '\n'.join(lines) + '\n'


def write_report(table: Mapping[str, Any], directory: str) -> tuple[str, str]:
  """Writes `report.md` and `report.json` under `directory`; returns their paths."""
  os.makedirs(directory, exist_ok=True)
  md_path = os.path.join(directory, 'report.md')
  json_path = os.path.join(directory, 'report.json')
  with open(md_path, 'w', encoding='utf-8') as f:
    f.write(to_markdown(table))
  runs.write_json_atomic(json_path, table)
  return md_path, json_path
