"""The end-of-run report: validation metrics averaged over the last N epochs, and Delta_MTL.

The MTAN reference (and the papers that re-ran it) report the mean of the last 10 epochs'
validation metrics; `summarize` does that over the per-epoch history the trainer keeps.
When single-task baselines are configured, both Delta_MTL conventions are added:
`delta_m` (Nash-MTL / CAGrad / FAMO: flat mean over metrics, lower is better) and
`delta_mtl_libmtl` (LibMTL: mean over tasks, higher is better).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np

from mtan_jax import metrics
from mtan_jax.errors import ConfigError, one_line


def load_baselines(spec: str) -> dict[str, dict[str, float]]:
  """Parses `config.single_task_baselines`.

  Args:
    spec: '' (none), an inline JSON object {task: {metric: value}}, or comma-separated paths
      of `final_metrics.json` files written by single-task runs (configs/single_task.py), whose
      'val' entries are merged.

  Returns:
    {task: {metric: value}}.
  """
  spec = (spec or '').strip()
  if not spec:
    return {}
  if spec.startswith('{'):
    try:
      parsed = json.loads(spec)
    except json.JSONDecodeError as exc:
      raise ConfigError(f'config.single_task_baselines is not valid JSON: {one_line(exc)}') from None
    sources = [('config.single_task_baselines', parsed)]
  else:
    sources = []
    for path in (p.strip() for p in spec.split(',') if p.strip()):
      try:
        with open(path, encoding='utf-8') as f:
          sources.append((path, json.load(f).get('val', {})))
      except (OSError, ValueError, AttributeError) as exc:
        # ValueError: invalid JSON or not UTF-8; AttributeError: JSON that is not an object.
        raise ConfigError(f'config.single_task_baselines: cannot read {path} ({one_line(exc)}); '
                          f'expected the final_metrics.json of a single-task run') from None
  out: dict[str, dict[str, float]] = {}
  for where, table in sources:
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
      raise ConfigError(f'{where}: expected {{task: {{metric: value}}}}, got {str(table)[:80]}')
    for task, values in table.items():
      for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
          raise ConfigError(f'{where}: {task}.{name}={repr(value)[:40]} is not a number; expected '
                            f'{{task: {{metric: value}}}}')
      # Validation losses are logged with the metrics but belong to neither Delta_MTL
      # convention (and have no better direction in metrics.HIGHER_IS_BETTER).
      out.setdefault(task, {}).update({k: float(v) for k, v in values.items()
                                       if k in metrics.HIGHER_IS_BETTER})
  return out


def summarize(history: Sequence[Mapping[str, Any]], last: int,
              baselines: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, Any]:
  """Averages each task metric over the last `last` evaluated epochs.

  Args:
    history: per-epoch records {'epoch': e, 'val': {task: {metric: value}}}.
    last: how many of the final epochs to average (fewer if fewer were run).
    baselines: optional single-task results {task: {metric: value}} for Delta_MTL.

  Returns:
    {'epochs': [...averaged epochs...], 'val': {task: {metric: mean}}, and the two Delta_MTL
    values when baselines are given}.
  """
  if not history:
    return {'epochs': [], 'val': {}}
  window = list(history)[-max(int(last), 1):]
  tasks = window[-1]['val']
  val = {task: {name: float(np.mean([rec['val'][task][name] for rec in window]))
                for name in tasks[task]}
         for task in tasks}
  out = {'epochs': [int(rec['epoch']) for rec in window], 'val': val}
  baselines = {t: dict(m) for t, m in (baselines or {}).items() if t in val and m}
  if baselines:
    out['delta_m'] = metrics.delta_m(val, baselines)
    out['delta_mtl_libmtl'] = metrics.delta_mtl_libmtl(val, baselines)
    out['baselines'] = baselines
  return out


def format_table(summary: Mapping[str, Any]) -> str:
  """A plain-text table of `summarize`'s output."""
  epochs = summary.get('epochs', [])
  if not epochs:
    return 'no evaluated epochs'
  lines = [f'validation metrics, mean of epochs {epochs[0]}..{epochs[-1]} ({len(epochs)} epochs)']
  width = max(len(name) for task in summary['val'].values() for name in task)
  for task, values in summary['val'].items():
    lines.append(f'  {task}')
    for name, value in values.items():
      base = summary.get('baselines', {}).get(task, {}).get(name)
      extra = f'   (single-task {base:.4f})' if base is not None else ''
      lines.append(f'    {name:<{width}}  {value:10.4f}{extra}')
  if 'delta_m' in summary:
    lines.append(f'  Delta_m (Nash-MTL convention, lower is better): {summary["delta_m"]:+.2f}%')
    lines.append(f'  Delta_MTL (LibMTL convention, higher is better): {summary["delta_mtl_libmtl"]:+.2f}%')
  return '\n'.join(lines)
