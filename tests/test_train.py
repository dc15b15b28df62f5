"""End to end: training runs, resumes bit-exactly after SIGKILL, and rejects bad input in one line."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config, tiny_flags
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.errors import ConfigError, DataError, NonFiniteLossError
from mtan_jax.train import train_and_evaluate

# The kill test needs a longer run (8 epochs, 32 steps) with frequent checkpoints.
TINY_FLAGS = tiny_flags(num_epochs=8, checkpoint_every_steps=2)


def _train_cmd(workdir, *extra):
  overridden = {e.split('=')[0] for e in extra}
  base = [f for f in TINY_FLAGS if f.split('=')[0] not in overridden]
  return [sys.executable, os.path.join(REPO, 'scripts', 'train.py'), '--config',
          os.path.join(REPO, 'configs', 'mtan.py') + ':runlocal', f'--workdir={workdir}', *base, *extra]


def _final_state(workdir):
  ckpt = Checkpointer(str(workdir), async_save=False)
  step = ckpt.latest_step()
  state, _ = ckpt.restore_arrays(step)
  ckpt.close()
  return step, jax.tree.map(np.asarray, state)


def test_tiny_run_trains_evaluates_and_reports(tmp_path):
  summary = train_and_evaluate(tiny_config(), str(tmp_path))
  assert summary['epochs'] == [2, 3]
  assert set(summary['val']) == {'semantic', 'depth', 'normal'}
  for values in summary['val'].values():
    assert all(np.isfinite(v) for v in values.values())
  assert 0.0 <= summary['val']['semantic']['miou'] <= 1.0
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert any('train/loss' in l for l in lines) and any('val/semantic/miou' in l for l in lines)
  assert json.loads((tmp_path / 'final_metrics.json').read_text())['val'] == summary['val']
  assert json.loads((tmp_path / 'config.json').read_text())['batch_size'] == 4
  # Re-running a finished workdir restores and reports without training again.
  again = train_and_evaluate(tiny_config(), str(tmp_path))
  assert again['val'] == summary['val']


def test_zoo_architecture_with_a_gradient_method_trains_and_logs_weights(tmp_path):
  """Cross-stitch + Nash-MTL end to end; the log has each task's weight and gradient norm."""
  summary = train_and_evaluate(tiny_config(model='cross_stitch', weighting='nash_mtl', num_epochs=1,
                                           weighting_params='max_norm=2.0', tasks=('semantic', 'depth')),
                               str(tmp_path))
  assert all(np.isfinite(v) for task in summary['val'].values() for v in task.values())
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  logged = [l for l in lines if 'train/semantic_weight' in l]
  assert logged and all(l['train/depth_weight'] > 0 and l['train/semantic_grad_norm'] > 0 for l in logged)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_parameters(tmp_path):
  reference, killed = tmp_path / 'reference', tmp_path / 'killed'
  subprocess.run(_train_cmd(reference), check=True, capture_output=True, timeout=600)

  # Kill the second run twice, as soon as new checkpoints appear (mid-epoch, then later),
  # restarting it each time; then let it finish.
  ckpt_dir = killed / 'checkpoints'
  for min_step in (6, 18):
    proc = subprocess.Popen(_train_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
      steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
      if steps and max(steps) >= min_step:
        break
      time.sleep(0.05)
    assert proc.poll() is None, 'the run finished before it could be killed'
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  subprocess.run(_train_cmd(killed), check=True, capture_output=True, timeout=600)

  step_a, state_a = _final_state(reference)
  step_b, state_b = _final_state(killed)
  assert step_a == step_b == 32  # runlocal's 8 epochs of 16 / 4 steps
  leaves_a, tree_a = jax.tree.flatten(state_a)
  leaves_b, tree_b = jax.tree.flatten(state_b)
  assert tree_a == tree_b
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b)  # bitwise
  summary_a = json.loads((reference / 'final_metrics.json').read_text())
  summary_b = json.loads((killed / 'final_metrics.json').read_text())
  assert summary_a == summary_b


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Adam's step is ~lr whatever the gradient: lr 1e30 makes the weights overflow at once.
  config = tiny_config(lr=1e30, log_every_steps=1, checkpoint_every_steps=1)
  with pytest.raises(NonFiniteLossError, match=r'NaN or Inf at step \d+') as info:
    train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert '\n' not in message
  bad_step = int(message.split('at step ')[1].split(';')[0])
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit())
  assert all(s <= bad_step for s in saved)


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
  subprocess.run(cmd, check=True, capture_output=True, timeout=1500)
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
