"""Shared test settings: a tiny, fast training config and a quiet TensorFlow."""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent XLA compilation cache for the session, shared with the subprocesses tests
# start: the many tiny runs compile the same steps, and a killed-and-restarted run (the soak
# test) loads them instead of compiling again. Set before JAX is imported, which reads it.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import tempfile  # pylint: disable=g-import-not-at-top
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='mtan_jax_test_xla_cache_')

import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# configs/mtan.py:runlocal shrunk to seconds: 32x64 scenes, widths 4..8, 3 epochs of 4 steps.
TINY = {
    'widths': (4, 8, 8, 8, 8),
    'image_size': (32, 64),
    'synthetic_train_size': 16,
    'synthetic_val_size': 6,
    'batch_size': 4,
    'eval_batch_size': 4,
    'num_epochs': 3,
    'log_every_steps': 2,
    'checkpoint_every_steps': 3,
    'report_last_epochs': 2,
    'progress_bar': False,
    'tensorboard': False,
    # The per-task gradient norms of loss-based methods cost one more compiled function;
    # tests/test_train.py turns them on where it checks them.
    'log_grad_norms': False,
    'weighting': 'dwa',
}


def tiny_config(**overrides):
  """The runlocal config with TINY and `overrides` applied."""
  from configs import mtan  # pylint: disable=g-import-not-at-top
  config = mtan.get_config('runlocal')
  for key, value in {**TINY, **overrides}.items():
    config[key] = value
  return config


def tiny_flags(**overrides):
  """The same settings as `--config.KEY=VALUE` flags for scripts/train.py on :runlocal."""
  def fmt(value):
    if not isinstance(value, tuple):
      return str(value)
    # Python literals, as the flag parser reads them: quoted strings, a 1-tuple's comma.
    return '(' + ','.join(repr(v) if isinstance(v, str) else str(v) for v in value) + (
        ',)' if len(value) == 1 else ')')
  return [f'--config.{key}={fmt(value)}' for key, value in {**TINY, **overrides}.items()]


@pytest.fixture
def config_factory():
  return tiny_config
