r"""Draws the training curves of one or several runs to PNG files; logic in `mtan_jax.plotting`.

  python scripts/plot.py runs/mtan runs/split --output plots \
      --labels mtan,split --include 'val/*,train/loss'

Every run is a workdir written by scripts/train.py (its `metrics.jsonl` is read). One PNG per
scalar group (`train.png`, `val_semantic.png`, `train_epoch_weights.png`, ...), runs overlaid
in one colour each; the written paths are printed. Errors (a missing workdir, an --include
pattern matching nothing) are printed as one line (exit status 2).
"""

from absl import flags

from mtan_jax import cli
from mtan_jax.plotting import plot_runs

_OUTPUT = flags.DEFINE_string('output', 'plots', 'Directory for the PNG files.')
_LABELS = flags.DEFINE_list('labels', None, 'Comma-separated legend label per run; default: '
                            'the workdir names.')
_INCLUDE = flags.DEFINE_list('include', [], "Comma-separated fnmatch patterns over scalar names, "
                             "e.g. 'val/*,train/loss'; default: every scalar.")


def main(runs):
  include = [p for p in _INCLUDE.value if p]
  for path in plot_runs(runs, _OUTPUT.value, labels=_LABELS.value or None, include=include):
    print(path)


if __name__ == '__main__':
  cli.run(main)
