r"""Trains a multi-task model; all logic lives in `mtan_jax.train`.

  python scripts/train.py --config configs/mtan.py:runlocal --workdir runs/quickstart

`--config.KEY=VALUE` overrides any config key. Re-running with the same --workdir resumes.
Errors caused by the config or the data are printed as one line (exit status 2).
"""

import os

# Keep TensorFlow (used only for tf.data and TensorBoard files) quiet and off the GPU.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mtan_jax import cli
from mtan_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/mtan.py:runlocal.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the report.')
flags.mark_flags_as_required(['config', 'workdir'])


def main():
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
