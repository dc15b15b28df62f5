r"""Compares training runs in one table; all logic lives in `mtan_jax.compare`.

  python scripts/report.py runs/mtan_dwa_seed0 runs/mtan_dwa_seed1 runs/mtan_equal_seed0 \
      --baseline runs/stl_semantic,runs/stl_depth --output report --last 10

Runs of one experiment with different seeds become one row (mean ± std over seeds); each row
has the parameter count, images/s and, against the `--baseline` runs (single-task, from
configs/single_task.py), Delta_m (Nash-MTL convention, lower is better) and Delta_MTL (LibMTL
convention, higher is better). Writes report.md and report.json under --output and prints
the markdown. Errors caused by the input are printed as one line (exit status 2).
"""

import os

# Keep TensorFlow quiet, should anything load it.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top

from mtan_jax import cli, compare  # pylint: disable=g-import-not-at-top
from mtan_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

_BASELINE = flags.DEFINE_list('baseline', [], 'Comma-separated baseline workdirs (single-task runs).')
_OUTPUT = flags.DEFINE_string('output', 'report', 'Directory for report.md and report.json.')
_LAST = flags.DEFINE_integer('last', 10, 'Average each run over its last N evaluated epochs.')
_LABELS = flags.DEFINE_list('labels', None, 'Comma-separated row labels of the run groups, in '
                            'order of first appearance (default: workdir names without the seed).')


def main(workdirs):
  if not workdirs:
    raise ConfigError('no runs given; usage: python scripts/report.py RUN [RUN ...] '
                      '[--baseline STL_RUN,...] [--output DIR] [--last N] [--labels A,B]')
  table = compare.compare(workdirs, _BASELINE.value, _LAST.value, _LABELS.value)
  compare.write_report(table, _OUTPUT.value)
  print(compare.to_markdown(table), end='', flush=True)


if __name__ == '__main__':
  cli.run(main)
