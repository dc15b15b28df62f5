"""A grid of architecture x weighting method x seed on one data set, with its results table.

`run_sweep` trains, one after another in this process, the single-task SegNet baselines
(one per task and seed, `stl_<task>/seed<k>`) and every `<arch>_<method>/seed<k>` run under
one root directory, then writes `report.md` / `report.json` there with `mtan_jax.compare`:
per (architecture, method) the metrics (mean ± std over seeds of the last
`config.report_last_epochs` evaluated epochs), parameters, images/s, and Delta_MTL against
the single-task runs in both published conventions (Delta_m of Nash-MTL/CAGrad/FAMO, lower
is better; Delta_MTL of LibMTL, higher is better). That is the layout of the Nash-MTL /
CAGrad comparison tables.

A run whose `final_metrics.json` exists is not trained again, and an interrupted run
resumes from its checkpoints (`train_and_evaluate`), so re-running the same command finishes
an interrupted sweep.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import ml_collections

from mtan_jax import compare, weighting
from mtan_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SweepRun:
  """One training run of the sweep."""
  name: str  # e.g. 'mtan_dwa' or 'stl_semantic'; runs of one name differ only in the seed.
  seed: int
  workdir: str
  config: ml_collections.ConfigDict
  baseline: bool


def plan(config: ml_collections.ConfigDict, root: str, archs: Sequence[str], methods: Sequence[str],
         seeds: Sequence[int], baselines: bool = True) -> list[SweepRun]:
  """The runs of the sweep, baselines first (`config` is the data set's base config)."""
  from mtan_jax.steps import MODELS  # pylint: disable=g-import-not-at-top
  if not archs or not methods or not seeds:
    raise ConfigError('a sweep needs at least one architecture, method and seed '
                      f'(got archs={list(archs)}, methods={list(methods)}, seeds={list(seeds)})')
  for arch in archs:
    if arch not in MODELS:
      raise ConfigError(f'unknown architecture {arch!r}; expected one of {", ".join(MODELS)}')
  for method in methods:
    weighting.check_method(method)
  runs = []

  def add(name, seed, baseline, **overrides):
    c = ml_collections.ConfigDict(config.to_dict())
    c.update(seed=int(seed), **overrides)
    runs.append(SweepRun(name, int(seed), os.path.join(root, name, f'seed{seed}'), c, baseline))

  if baselines:
    for task in config.tasks:
      for seed in seeds:
        add(f'stl_{task}', seed, True, model='segnet', tasks=(task,), weighting='equal',
            weighting_params='', task_weights=())
  for arch in archs:
    for method in methods:
      for seed in seeds:
        add(f'{arch}_{method}', seed, False, model=arch, weighting=method)
  return runs


def is_done(run: SweepRun) -> bool:
  return os.path.exists(os.path.join(run.workdir, 'final_metrics.json'))


def run_sweep(config: ml_collections.ConfigDict, root: str, archs: Sequence[str],
              methods: Sequence[str], seeds: Sequence[int], baselines: bool = True,
              train_fn: Callable[[ml_collections.ConfigDict, str], Any] | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains every run not yet finished, then writes and returns the results table."""
  if train_fn is None:
    from mtan_jax.train import train_and_evaluate as train_fn  # pylint: disable=g-import-not-at-top
  runs = plan(config, root, archs, methods, seeds, baselines)
  for k, run in enumerate(runs):
    if is_done(run):
      log(f'[{k + 1}/{len(runs)}] {run.name} seed {run.seed}: done already ({run.workdir})')
      continue
    log(f'[{k + 1}/{len(runs)}] {run.name} seed {run.seed}: training in {run.workdir}')
    train_fn(run.config, run.workdir)
  grid = [r for r in runs if not r.baseline]
  names = list(dict.fromkeys(r.name for r in grid))
  table = compare.compare([r.workdir for r in grid], [r.workdir for r in runs if r.baseline],
                          last=int(config.report_last_epochs), labels=names)
  compare.write_report(table, root)
  return table
