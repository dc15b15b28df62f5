r"""Trains a multi-task model; all logic lives in `mtan_jax.train`.

  python scripts/train.py --config configs/mtan.py:runlocal --workdir runs/quickstart

`--config.KEY=VALUE` overrides any config key. Re-running with the same --workdir resumes.
Errors caused by the config or the data are printed as one line (exit status 2).
"""

import os
import sys

# Keep TensorFlow (used only for tf.data and TensorBoard files) quiet and off the GPU.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mtan_jax.errors import MtanError
from mtan_jax.logs import quiet_libraries
from mtan_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/mtan.py:runlocal.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the report.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl flag parsing, with bad config overrides reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as exc:
    # A failing config file arrives with its traceback inside the message: keep the flag and
    # the final error line.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if len(lines) == 1 else f'{lines[0].split(": Error")[0]}: {lines[-1]}'
  except (AttributeError, KeyError) as exc:
    # ml_collections raises these for --config.KEY overrides naming a key the config lacks.
    message = f'unknown config key {str(exc).strip(chr(34))} in the --config.* overrides; README.md lists every key'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv):
  del argv
  quiet_libraries()
  # ml_collections loads the config file lazily and reports a missing one with a traceback.
  config_path = flags.FLAGS['config'].serialize().split('=', 1)[-1].split(':', 1)[0]
  if not os.path.isfile(config_path):
    print(f'error: config file {config_path} does not exist (e.g. --config configs/mtan.py:runlocal)',
          file=sys.stderr)
    sys.exit(2)
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except MtanError as exc:
    print(f'error: {exc}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
