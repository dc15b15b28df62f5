"""Shared test settings: fast compiles, a tiny training config, and one trained run for the
whole session.

Two tiers (README "Tests"): `pytest` runs the default tier (`-m "not slow"` in pyproject's
addopts, spread over the cores by pytest-xdist); `pytest -m slow` runs the long guarantees.
Most of the suite's time is XLA compiling small models, so everything here aims at compiling
less, and faster:
- `JAX_DISABLE_MOST_OPTIMIZATIONS`: XLA skips its optimisation passes (flax's imagenet
  train_test.py does the same); set in the environment, so the scripts tests start inherit
  it. Results stay within float32 rounding of the optimised code; no test times anything.
- One persistent compilation cache for the session, shared by the xdist workers and the
  subprocesses: the many tiny runs compile the same steps (TINY below is one config on
  purpose; the learning rate is optimizer state, so changing it recompiles nothing).
- `trained_run`: one tiny MTAN run that every test reading a workdir uses, trained once per
  session (once across xdist workers too, under a file lock).
"""

import fcntl
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# Set before JAX is imported (it reads both at import). The controller process of an xdist
# run imports this file before it starts the workers, which inherit the directory.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='mtan_jax_test_xla_cache_')

import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# configs/mtan.py:runlocal shrunk to seconds: 32x64 scenes, widths 4..8, 2 epochs of 4 steps.
# Keys that change the compiled steps (model, tasks, widths, sizes, weighting, vis_images) are
# the same for every test that can use them, so that their compiles hit the cache.
TINY = {
    'widths': (4, 8, 8, 8, 8),
    'image_size': (32, 64),
    'synthetic_train_size': 16,
    'synthetic_val_size': 6,
    'batch_size': 4,
    'eval_batch_size': 4,
    'num_epochs': 2,
    'log_every_steps': 2,
    'checkpoint_every_steps': 3,
    'report_last_epochs': 2,
    'progress_bar': False,
    'tensorboard': False,
    'vis_images': 2,
    # The per-task gradient norms cost one more compiled function; `trained_run` has them.
    'log_grad_norms': False,
    # Uncertainty weighting: its learned log-sigma is state a resumed run must restore, and
    # the results tools draw its curves.
    'weighting': 'uncertainty',
}
# What `trained_run` adds to TINY.
TRAINED_RUN = {'tensorboard': True, 'log_grad_norms': True}


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


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; absent under -p no:xdist
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core, at most 8 (each holds JAX, TensorFlow and a model)."""
  del config
  return max(1, min(len(os.sched_getaffinity(0)), 8))


class TrainedRun:
  """A finished tiny run: `workdir` (read-only: copy it to change it) and its summary."""

  def __init__(self, workdir: str, summary: dict):
    self.workdir, self.summary = workdir, summary

  def copy(self, target) -> str:
    """A private copy of the workdir at `target` (for tests that resume or damage it)."""
    shutil.copytree(self.workdir, target)
    return str(target)


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory) -> TrainedRun:
  """TINY + TRAINED_RUN trained once: 2 epochs of 4 steps, checkpoints at steps 3, 4, 6, 8
  (the newest 3 kept), TensorBoard, evaluation grids and per-task gradient norms.

  Under xdist the first worker to ask trains it into the session's shared temporary
  directory while the others wait on a lock, then all read it.
  """
  from mtan_jax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  worker = os.environ.get('PYTEST_XDIST_WORKER')
  root = tmp_path_factory.getbasetemp()
  if worker:
    root = root.parent  # shared by the workers of this session
  workdir, summary_file = root / 'trained_run' / 'mtan_seed0', root / 'trained_run.json'
  with open(root / 'trained_run.lock', 'w', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not summary_file.exists():
      summary = train_and_evaluate(tiny_config(**TRAINED_RUN), str(workdir))
      summary_file.write_text(json.dumps(summary))
  return TrainedRun(str(workdir), json.loads(summary_file.read_text()))
