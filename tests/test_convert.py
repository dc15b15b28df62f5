"""scripts/convert_torch_checkpoint.py: a reference .pth becomes a checkpoint training resumes from."""

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from conftest import REPO, tiny_config, tiny_flags  # pylint: disable=g-import-not-at-top
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.evaluation import evaluate_run
from mtan_jax.torch_reference import TorchMTAN
from mtan_jax.train import train_and_evaluate

CONVERT = os.path.join(REPO, 'scripts', 'convert_torch_checkpoint.py')
# The tiny config of conftest, so that evaluating and training the converted run reuse the
# session's compiled steps.
MODEL_FLAGS = tiny_flags()


def test_convert_then_resume_training(tmp_path):
  torch.manual_seed(0)
  tm = TorchMTAN([('semantic', 7), ('depth', 1), ('normal', 3)], widths=(4, 8, 8, 8, 8))
  pth = tmp_path / 'mtan.pth'
  # DataParallel-style names and a wrapping dict, as users' checkpoints often have.
  torch.save({'state_dict': {f'module.{k}': v for k, v in tm.state_dict().items()}}, pth)
  workdir = tmp_path / 'run'
  result = subprocess.run([sys.executable, CONVERT, f'--pth={pth}', f'--workdir={workdir}', '--config',
                           os.path.join(REPO, 'configs', 'mtan.py') + ':runlocal', *MODEL_FLAGS],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  state, meta = Checkpointer(str(workdir), async_save=False).restore_arrays(0)
  # Untyped restore: nested dicts keyed by strings, each Variable a {'value': array} dict.
  kernel = np.asarray(state['params']['encoder_block']['0']['conv']['kernel']['value'])
  np.testing.assert_array_equal(kernel, tm.state_dict()['encoder_block.0.0.weight'].numpy().transpose(2, 3, 1, 0))
  assert meta['imported_from'] == str(pth)
  # The converted workdir is self-describing: scripts/evaluate.py's code evaluates it as is.
  result = evaluate_run(str(workdir))
  assert result['step'] == 0 and result['num_examples'] == 6
  assert set(result['metrics']) == {'semantic', 'depth', 'normal'}
  assert all(np.isfinite(v) for task in result['metrics'].values() for v in task.values())
  # Training continues from the imported weights.
  summary = train_and_evaluate(tiny_config(num_epochs=1), str(workdir))
  assert summary['epochs'] == [1]


def test_convert_rejects_a_mismatched_model(tmp_path):
  tm = TorchMTAN([('semantic', 7), ('depth', 1)], widths=(4, 8, 8, 8, 8))
  pth = tmp_path / 'two_tasks.pth'
  torch.save(tm.state_dict(), pth)
  result = subprocess.run([sys.executable, CONVERT, f'--pth={pth}', f'--workdir={tmp_path / "run"}', '--config',
                           os.path.join(REPO, 'configs', 'mtan.py') + ':runlocal', *MODEL_FLAGS],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: ') and 'pred_task3' in result.stderr
  assert 'Traceback' not in result.stderr


def test_convert_reports_bad_overrides_as_one_line(tmp_path):
  result = subprocess.run([sys.executable, CONVERT, f'--pth={tmp_path / "x.pth"}', f'--workdir={tmp_path / "run"}',
                           '--config', os.path.join(REPO, 'configs', 'mtan.py'), '--config.foo=1'],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "error: unknown config key 'foo'" in result.stderr and 'Traceback' not in result.stderr
