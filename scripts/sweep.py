r"""Trains a grid of architecture x weighting method x seed and writes the results table;
all logic lives in `mtan_jax.sweep`.

  python scripts/sweep.py --config configs/mtan.py:nyuv2 --config.data_dir=/data/nyuv2 \
      --workdir runs/sweep_nyuv2 --archs mtan,split --methods equal,dwa,pcgrad,cagrad,nash_mtl \
      --seeds 0,1,2

Trains the single-task SegNet baselines (one per task and seed) and every grid run under
--workdir (`<arch>_<method>/seed<k>`, `stl_<task>/seed<k>`), then writes report.md and
report.json there: metrics as mean ± std over seeds, parameters, images/s, and Delta_MTL in
both published conventions. Re-running resumes: finished runs are skipped, interrupted ones
resume from their checkpoints. `--config.KEY=VALUE` overrides apply to every run.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mtan_jax import cli, compare, sweep
from mtan_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Base config, e.g. configs/mtan.py:nyuv2.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Root directory of the sweep.')
_ARCHS = flags.DEFINE_list('archs', ['mtan'], 'Architectures (config.model values).')
_METHODS = flags.DEFINE_list('methods', ['equal', 'dwa', 'uncertainty'], 'Weighting methods.')
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
_BASELINES = flags.DEFINE_bool('baselines', True, 'Also train the single-task baselines.')
flags.mark_flags_as_required(['config', 'workdir'])


def main():
  seeds = []
  for s in _SEEDS.value:
    try:
      seeds.append(int(s))
    except ValueError:
      raise ConfigError(f'--seeds: {s!r} is not an integer') from None
  table = sweep.run_sweep(_CONFIG.value, _WORKDIR.value, _ARCHS.value, _METHODS.value, seeds,
                          _BASELINES.value)
  print(compare.to_markdown(table), end='', flush=True)


if __name__ == '__main__':
  cli.run(main)
