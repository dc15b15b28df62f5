"""Training curves of one or several runs, drawn to PNG files.

Each workdir's `metrics.jsonl` is read through `mtan_jax.runs.read_scalars`. Scalars are
grouped by their name up to the last '/' (`train`, `val/semantic`, `train_epoch/weights`,
...); each group becomes one figure `<group with '/' -> '_'>.png` with one subplot per
scalar, the training step on the x axis and every run overlaid as one line, drawn in the
same colour in every subplot and figure.

    from mtan_jax import plotting
    plotting.plot_runs(['runs/mtan', 'runs/split'], 'plots', include=['val/*'])

matplotlib is imported inside the functions that draw, so importing this module stays cheap.
"""

from __future__ import annotations

import fnmatch
import math
import os
from typing import Sequence

from mtan_jax import runs
from mtan_jax.errors import ConfigError, DataError

DPI = 100
# Inches per subplot; at DPI 100 a one-subplot figure is 400x300 pixels.
SUBPLOT_SIZE = (4.0, 3.0)
MAX_COLUMNS = 3
# Sparse series (per-epoch values, short runs) get markers so that a lone point stays visible.
MARKER_BELOW_POINTS = 30
# A learning rate schedule spanning more than this factor is easier to read on a log axis.
LOG_LR_SPAN = 10.0
LR_SCALAR = 'train/lr'
# Scalars whose name has no '/' are drawn together in this figure.
TOP_LEVEL_GROUP = 'scalars'


def group_of(name: str) -> str:
  """The figure a scalar belongs to: its name up to the last '/'."""
  return name.rsplit('/', 1)[0] if '/' in name else TOP_LEVEL_GROUP


def file_name(group: str) -> str:
  """`val/semantic` -> `val_semantic.png`."""
  return group.replace('/', '_') + '.png'


def run_labels(workdirs: Sequence[str]) -> list[str]:
  """Legend labels: each workdir's basename, with as many parent directories as it takes to
  tell equal basenames apart (`a/seed0`, `b/seed0`)."""
  parts = [os.path.abspath(w).strip(os.sep).split(os.sep) for w in workdirs]
  depth = [1] * len(parts)
  while True:
    labels = ['/'.join(p[-d:]) for p, d in zip(parts, depth)]
    clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1]
    grown = False
    for i in clashing:
      if depth[i] < len(parts[i]):
        depth[i] += 1
        grown = True
    if not grown:
      break
  # The same workdir given twice has no path that tells the two apart: number them.
  seen: dict[str, int] = {}
  out = []
  for label in labels:
    seen[label] = seen.get(label, 0) + 1
    out.append(label if labels.count(label) == 1 else f'{label} #{seen[label]}')
  return out


def _scalar_names(all_scalars: Sequence[dict[int, dict[str, float]]]) -> list[str]:
  """Every scalar name in the order training first logged it (train/loss before the task
  losses), which reads better than alphabetical order."""
  names: dict[str, None] = {}
  for scalars in all_scalars:
    for step in sorted(scalars):
      names.update(dict.fromkeys(scalars[step]))
  return list(names)


def _select(names: list[str], include: Sequence[str], workdirs: Sequence[str]) -> list[str]:
  if not include:
    return names
  unmatched = [p for p in include if not any(fnmatch.fnmatchcase(n, p) for n in names)]
  if unmatched:
    groups = ', '.join(dict.fromkeys(group_of(n) for n in names))
    raise ConfigError(f'no scalar matches include pattern(s) {", ".join(unmatched)} in '
                      f'{", ".join(workdirs)}; available groups: {groups}')
  return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]


def _use_log_scale(name: str, values: list[float]) -> bool:
  if name != LR_SCALAR:
    return False
  finite = [v for v in values if math.isfinite(v)]
  return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > LOG_LR_SPAN


def _draw_group(group, names, all_scalars, labels, colors, path) -> None:
  """One figure: a grid of subplots, one per scalar, every run overlaid."""
  # The Agg canvas is attached to the figure directly, without pyplot: no global figure
  # list to leak into and no change to the backend of a caller's interactive session.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  columns = min(MAX_COLUMNS, len(names))
  rows = math.ceil(len(names) / columns)
  fig = Figure(figsize=(SUBPLOT_SIZE[0] * columns, SUBPLOT_SIZE[1] * rows), dpi=DPI,
               layout='constrained')
  FigureCanvasAgg(fig)
  legend: dict[int, object] = {}  # run index -> its first line
  for index, name in enumerate(names):
    ax = fig.add_subplot(rows, columns, index + 1)
    ax.set_title(name.rsplit('/', 1)[-1])
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
    plotted: list[float] = []
    for run, (scalars, label, color) in enumerate(zip(all_scalars, labels, colors)):
      steps, values = runs.series(scalars, name)
      if not steps:
        continue
      marker = 'o' if len(steps) < MARKER_BELOW_POINTS else None
      (line,) = ax.plot(steps, values, color=color, label=label, marker=marker, markersize=3,
                        linewidth=1.5)
      legend.setdefault(run, line)
      plotted.extend(values)
    if _use_log_scale(name, plotted):
      ax.set_yscale('log')
  fig.suptitle(group)
  # Runs in the order given, whichever subplot first showed them.
  handles = [legend[run] for run in sorted(legend)]
  fig.legend(handles, [h.get_label() for h in handles], loc='outside lower center',
             ncol=min(len(handles), 4), fontsize='small')
  try:
    fig.savefig(path, dpi=DPI)
  finally:
    fig.clear()


def plot_runs(workdirs: Sequence[str], output_dir: str, labels: Sequence[str] | None = None,
              include: Sequence[str] = ()) -> list[str]:
  """Draws the training curves of `workdirs` to PNG files in `output_dir`.

  Args:
    workdirs: training workdirs, each holding the `metrics.jsonl` that scripts/train.py writes.
    output_dir: where the PNGs go; created if needed, existing files of the same name are
      overwritten.
    labels: legend label per workdir; default `run_labels(workdirs)`.
    include: fnmatch patterns over full scalar names (`val/*`, `train/loss`); empty draws every
      scalar.

  Returns:
    The paths of the written PNGs, one per scalar group, in the order training first logged
    the groups.

  Raises:
    ConfigError: no workdirs, a label count that does not match, an `include` pattern that
      matches no scalar, or an `output_dir` that is a file.
    DataError: a workdir without a readable metrics.jsonl, or runs that logged nothing.
  """
  workdirs = list(workdirs)
  if not workdirs:
    raise ConfigError('no workdirs given; expected one or more training workdirs holding metrics.jsonl')
  if labels is None:
    labels = run_labels(workdirs)
  labels = list(labels)
  if len(labels) != len(workdirs):
    raise ConfigError(f'{len(labels)} labels ({", ".join(labels)}) for {len(workdirs)} workdirs '
                      f'({", ".join(workdirs)}); give one label per workdir')
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise ConfigError(f'output directory {output_dir} is a file; expected a directory')

  all_scalars = [runs.read_scalars(w) for w in workdirs]
  names = _scalar_names(all_scalars)
  if not names:
    raise DataError(f'no scalars logged in {", ".join(workdirs)}; '
                    f'{runs.METRICS_FILE} is empty (has training started?)')
  names = _select(names, include, workdirs)

  import matplotlib as mpl  # pylint: disable=g-import-not-at-top
  # A run keeps its colour in every figure, even in one where an earlier run is absent.
  cycle = mpl.rcParams['axes.prop_cycle'].by_key().get('color') or ['C0']
  colors = [cycle[i % len(cycle)] for i in range(len(workdirs))]

  groups: dict[str, list[str]] = {}
  for name in names:
    groups.setdefault(group_of(name), []).append(name)
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for group, group_names in groups.items():
    path = os.path.join(output_dir, file_name(group))
    _draw_group(group, group_names, all_scalars, labels, colors, path)
    paths.append(path)
  return paths
