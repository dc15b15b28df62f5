"""End to end: training runs; SIGTERM, NaN/Inf, a busy, full or unwritable workdir and bad input
are handled as documented (the SIGKILL soak test is tests/test_soak.py).

The default tier reads the session's `trained_run` and trains only where a test must (a
resume, a fault); those runs use TINY's model so that their compiles hit the cache. The slow
tier runs the README's quickstart, a zoo architecture, bf16 against float32 and the npy layout.
"""

import json
import os
import signal
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, TRAINED_RUN, tiny_config, tiny_flags
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.errors import ConfigError, DataError, NonFiniteLossError
from mtan_jax.preemption import Preempted
from mtan_jax.train import train_and_evaluate
from mtan_jax.workdir import WorkdirLock

# The kill test needs a longer run (8 epochs, 32 steps) with frequent checkpoints.
TINY_FLAGS = tiny_flags(num_epochs=8, checkpoint_every_steps=2)


def _train_cmd(workdir, *extra):
  overridden = {e.split('=')[0] for e in extra}
  base = [f for f in TINY_FLAGS if f.split('=')[0] not in overridden]
  return [sys.executable, os.path.join(REPO, 'scripts', 'train.py'), '--config',
          os.path.join(REPO, 'configs', 'mtan.py') + ':runlocal', f'--workdir={workdir}', *base, *extra]


def test_tiny_run_trains_evaluates_and_reports(trained_run, tmp_path):
  summary, workdir = trained_run.summary, trained_run.workdir
  assert summary['epochs'] == [1, 2]
  assert set(summary['val']) == {'semantic', 'depth', 'normal'}
  for values in summary['val'].values():
    assert all(np.isfinite(v) for v in values.values())
  assert 0.0 <= summary['val']['semantic']['miou'] <= 1.0
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8')]
  assert any('val/semantic/miou' in l for l in lines)
  # Every log point has the loss and each task's gradient norm (a loss-based method: the
  # norms come from their own compiled function).
  logged = [l for l in lines if 'train/loss' in l]
  assert [l['step'] for l in logged] == [2, 4, 6, 8]
  assert all(l[f'train/{t}_grad_norm'] > 0 for l in logged for t in ('semantic', 'depth', 'normal'))
  final = json.load(open(os.path.join(workdir, 'final_metrics.json'), encoding='utf-8'))
  assert final['val'] == summary['val']
  assert json.load(open(os.path.join(workdir, 'config.json'), encoding='utf-8'))['batch_size'] == 4
  # Re-running a finished workdir restores and reports without training again.
  again = train_and_evaluate(tiny_config(**TRAINED_RUN), trained_run.copy(tmp_path / 'again'))
  assert again['val'] == summary['val']


@pytest.mark.slow
def test_zoo_architecture_with_a_gradient_method_trains_and_logs_weights(tmp_path):
  """Cross-stitch + Nash-MTL end to end; the log has each task's weight and gradient norm."""
  summary = train_and_evaluate(tiny_config(model='cross_stitch', weighting='nash_mtl', num_epochs=1,
                                           weighting_params='max_norm=2.0', tasks=('semantic', 'depth')),
                               str(tmp_path))
  assert all(np.isfinite(v) for task in summary['val'].values() for v in task.values())
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  logged = [l for l in lines if 'train/semantic_weight' in l]
  assert logged and all(l['train/depth_weight'] > 0 and l['train/semantic_grad_norm'] > 0 for l in logged)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Adam's step is ~lr whatever the gradient: lr 1e30 makes the weights overflow at once.
  config = tiny_config(lr=1e30, log_every_steps=1, checkpoint_every_steps=1)
  with pytest.raises(NonFiniteLossError, match=r'NaN or Inf at step \d+') as info:
    train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert '\n' not in message
  assert "the loss of task '" in message and 'config.nonfinite=skip' in message
  bad_step = int(message.split('at step ')[1].split(';')[0])
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert all(s <= bad_step for s in saved)


def test_nonfinite_skip_counts_and_logs_the_skipped_steps(tmp_path):
  config = tiny_config(lr=1e30, num_epochs=1, log_every_steps=1, nonfinite='skip', vis_images=0,
                       model='segnet', tasks=('semantic',), weighting='equal')
  train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  counts = [l['train/nonfinite_skipped'] for l in lines if 'train/nonfinite_skipped' in l]
  # The first step applies an overflowing update; every step after it is skipped.
  assert counts == sorted(counts) and counts[-1] >= 1
  assert [l['train_epoch/nonfinite_skipped'] for l in lines if 'train_epoch/nonfinite_skipped' in l] == [counts[-1]]


def test_sigterm_saves_the_current_step_and_exits_then_resumes(tmp_path):
  # TINY (its compiled steps are in the cache), saving only when told.
  config = tiny_config(checkpoint_every_steps=100, log_every_steps=1)
  metrics = tmp_path / 'metrics.jsonl'

  def send_when_training():
    deadline = time.time() + 600
    while time.time() < deadline and not (metrics.exists() and 'train/loss' in metrics.read_text()):
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=send_when_training, daemon=True).start()
  with pytest.raises(Preempted) as info:
    train_and_evaluate(config, str(tmp_path))
  assert info.value.exit_code == 75 and '\n' not in str(info.value)
  assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  # The step it stopped at is on disk (checkpoint_every_steps=100 would have saved none).
  assert ckpt.latest_step() == info.value.step >= 1
  ckpt.close()
  summary = train_and_evaluate(config, str(tmp_path))
  assert summary['epochs'] == [1, 2]
  # Every step logged once or more (the steps after the last save are trained again).
  logged = {json.loads(l)['step'] for l in metrics.read_text().splitlines() if 'train/loss' in l}
  assert logged == set(range(1, 9))
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  assert ckpt.latest_step() == 8
  ckpt.close()


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(ConfigError, match='is in use by another training run') as info:
      train_and_evaluate(tiny_config(), str(tmp_path))
  assert '\n' not in str(info.value) and f'pid {os.getpid()}' in str(info.value)


def _no_compiling(monkeypatch):
  from mtan_jax import sharding  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError('compiled before the check')
  monkeypatch.setattr(sharding, 'compile_steps', refuse)


def test_unwritable_or_full_workdir_fails_before_compiling(tmp_path, monkeypatch):
  _no_compiling(monkeypatch)
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(ConfigError, match='a_file') as info:
    train_and_evaluate(tiny_config(), str(blocker / 'run'))
  assert '\n' not in str(info.value)
  from mtan_jax import workdir  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(workdir.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))  # pylint: disable=protected-access
  with pytest.raises(ConfigError, match='MiB free but a checkpoint of this run needs') as info:
    train_and_evaluate(tiny_config(), str(tmp_path / 'full'))
  assert '\n' not in str(info.value)


def test_a_checkpoint_write_that_fails_is_one_line_and_never_marked_complete(tmp_path):
  # RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG, as a full disk fails a
  # write: the small files (config, logs) fit, the checkpoint's array data does not.
  def limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
  # No compilation cache: its files would hit the limit too. A small model compiles quickly.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  result = subprocess.run(_train_cmd(tmp_path / 'run', '--config.num_epochs=1', '--config.model=segnet',
                                     "--config.tasks=('semantic',)", '--config.weighting=equal'),
                          capture_output=True, text=True, timeout=600, preexec_fn=limit, env=env)
  assert result.returncode == 2, result.stderr[-2000:]
  # (orbax's own threads log the failure with tracebacks; the run's verdict is the last line)
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: could not write a checkpoint to {tmp_path / "run" / "checkpoints"} '
                         '(at step '), last
  assert 'file too large for the file system (EFBIG)' in last, last
  ckpt_dir = tmp_path / 'run' / 'checkpoints'
  assert not [d for d in os.listdir(ckpt_dir) if d.isdigit()]  # nothing marked complete


@pytest.mark.parametrize('overrides, error, match', [
    ({'image_size': (48, 64)}, ConfigError, 'not divisible by 32'),
    ({'tasks': ('semantic', 'colour')}, ConfigError, "unknown task 'colour'"),
    ({'weighting': 'magic'}, ConfigError, "unknown config.weighting='magic'"),
    ({'dataset': 'imagenet'}, ConfigError, "unknown config.dataset='imagenet'"),
    ({'model': 'unet'}, ConfigError, "unknown config.model='unet'"),
    ({'weighting': 'cagrad', 'weighting_params': 'c=0.4'}, ConfigError, "cagrad has no hyper-parameter 'c'"),
    ({'weighting': 'cagrad', 'weighting_params': 'calpha=x'}, ConfigError, "cagrad.calpha='x' is not a number"),
    ({'model': 'segnet', 'weighting': 'uncertainty'}, ConfigError, 'has none'),
    ({'batch_size': 0}, ConfigError, 'config.batch_size=0'),
    ({'synthetic_train_size': 2}, ConfigError, 'fewer than config.batch_size=4'),
    ({'dataset': 'cityscapes', 'data_dir': ''}, ConfigError, 'needs --config.data_dir'),
    ({'dataset': 'cityscapes', 'data_dir': '/nonexistent/city'}, DataError, '/nonexistent/city'),
    ({'dataset': 'cityscapes', 'data_dir': '/tmp', 'label_dir': 'label_19'}, ConfigError,
     'set --config.num_classes=19'),
])
def test_bad_config_is_one_clear_line(tmp_path, overrides, error, match):
  with pytest.raises(error, match=match) as info:
    train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert '\n' not in str(info.value)


def _write_cityscapes(root, n=8, h=32, w=64, bad_label_at=None):
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for key in ('image', 'label_7', 'depth'):
      (root / split / key).mkdir(parents=True)
    for i in range(n):
      np.save(root / split / 'image' / f'{i}.npy', rng.random((h, w, 3)).astype(np.float32))
      label = rng.integers(-1, 7, (h, w)).astype(np.float32)
      if split == 'train' and i == bad_label_at:
        label[3, 5] = 9
      np.save(root / split / 'label_7' / f'{i}.npy', label)
      np.save(root / split / 'depth' / f'{i}.npy', (rng.random((h, w, 1)) * 0.4).astype(np.float32))


@pytest.mark.slow
def test_trains_on_the_cityscapes_npy_layout(tmp_path):
  _write_cityscapes(tmp_path / 'city')
  config = tiny_config(dataset='cityscapes', data_dir=str(tmp_path / 'city'), tasks=('semantic', 'depth'),
                       num_epochs=1)
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  assert set(summary['val']) == {'semantic', 'depth'}


def test_label_out_of_range_names_the_file(tmp_path):
  _write_cityscapes(tmp_path / 'city', bad_label_at=5)
  config = tiny_config(dataset='cityscapes', data_dir=str(tmp_path / 'city'), tasks=('semantic', 'depth'),
                       num_epochs=1)
  with pytest.raises(DataError, match=r'label_7/5\.npy') as info:
    train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(info.value)


def test_script_reports_bad_input_as_one_line(tmp_path):
  for extra, expected in ((['--config.foo=1'], "unknown config key 'foo'"),
                          (['--config.image_size=(40,64)'], 'not divisible by 32')):
    result = subprocess.run(_train_cmd(tmp_path / 'w', *extra), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith('error: ')
    assert expected in result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_runlocal_readme_command_learns(tmp_path):
  """The README's first command: configs/mtan.py:runlocal, unchanged, as a user runs it."""
  cmd = [sys.executable, os.path.join(REPO, 'scripts', 'train.py'), '--config',
         os.path.join(REPO, 'configs', 'mtan.py') + ':runlocal', f'--workdir={tmp_path}',
         '--config.progress_bar=False']
  # As a user runs it: XLA's optimisations on (the default tier turns them off).
  env = {k: v for k, v in os.environ.items() if k != 'JAX_DISABLE_MOST_OPTIMIZATIONS'}
  subprocess.run(cmd, check=True, capture_output=True, timeout=1500, env=env)
  summary = json.loads((tmp_path / 'final_metrics.json').read_text())
  # 7 classes: chance mIoU is ~1/7; the tiny model gets well above it.
  assert summary['val']['semantic']['miou'] > 0.3
  evals = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  depth = [e['val/depth/abs_err'] for e in evals if 'val/depth/abs_err' in e]
  assert depth[-1] < 0.5 * depth[0]


@pytest.mark.slow
def test_bfloat16_training_matches_float32(tmp_path):
  """Mixed precision trains to the float32 run's validation metrics (loose: a tiny, short run;
  README "Measured" gives the runlocal comparison)."""
  settings = dict(num_epochs=4, synthetic_train_size=32, lr_decay_every_epochs=0)
  f32 = train_and_evaluate(tiny_config(**settings), str(tmp_path / 'f32'))
  bf16 = train_and_evaluate(tiny_config(dtype='bfloat16', **settings), str(tmp_path / 'bf16'))
  assert bf16['val']['semantic']['pix_acc'] == pytest.approx(f32['val']['semantic']['pix_acc'], abs=0.05)
  assert bf16['val']['semantic']['miou'] == pytest.approx(f32['val']['semantic']['miou'], abs=0.05)
  assert bf16['val']['depth']['abs_err'] == pytest.approx(f32['val']['depth']['abs_err'], rel=0.15)
  assert bf16['val']['normal']['mean'] == pytest.approx(f32['val']['normal']['mean'], rel=0.1)
