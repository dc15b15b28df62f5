"""Multi-process start-up, and two processes training as one (gloo on 127.0.0.1)."""

import json
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import REPO, tiny_flags
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.distributed import cluster_detected, maybe_initialize
from mtan_jax.errors import ConfigError


def test_cluster_detection_from_the_environment():
  assert cluster_detected({}) is None
  assert cluster_detected({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}) == 'JAX_COORDINATOR_ADDRESS'
  assert cluster_detected({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}) == 'SLURM'
  # A one-task SLURM allocation is a single process.
  assert cluster_detected({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) is None
  assert cluster_detected({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}) == 'Cloud TPU slice'
  assert cluster_detected({'TPU_WORKER_HOSTNAMES': 'localhost'}) is None


def _config(**values):
  c = ml_collections.ConfigDict({'distributed': 'auto', 'coordinator_address': '', 'num_processes': 0,
                                 'process_id': -1})
  c.update(values)
  return c


def test_single_process_runs_do_not_initialise():
  assert not maybe_initialize(_config(), environ={})
  assert not maybe_initialize(_config(distributed='off'), environ={'SLURM_JOB_ID': '1', 'SLURM_NTASKS': '2'})
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize('values, message', [
    ({'distributed': 'yes'}, 'config.distributed'),
    ({'num_processes': 2, 'process_id': 2}, 'config.process_id=2'),
    ({'num_processes': -1}, 'config.num_processes=-1'),
])
def test_bad_distributed_settings_are_one_line_errors(values, message):
  with pytest.raises(ConfigError, match=message):
    maybe_initialize(_config(**values), environ={})


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _train(workdir, devices, *extra):
  # float64: equal results up to rounding, not up to Adam-amplified rounding (tests/test_sharding.py).
  flags = tiny_flags(batch_size=8, eval_batch_size=8, synthetic_train_size=24, num_epochs=2,
                     checkpoint_every_steps=2, report_last_epochs=1, dtype='float64')
  cmd = [sys.executable, os.path.join(REPO, 'scripts', 'train.py'), '--config',
         os.path.join(REPO, 'configs', 'mtan.py') + ':runlocal', f'--workdir={workdir}', *flags, *extra]
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': str(devices), 'PYTHONPATH': REPO}
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  return out


def _final(workdir):
  ckpt = Checkpointer(str(workdir), async_save=False)
  step = ckpt.latest_step()
  state, meta = ckpt.restore_arrays(step)
  ckpt.close()
  return step, jax.tree.map(np.asarray, state), meta


@pytest.mark.slow
def test_two_processes_with_4_devices_train_like_one_with_8(tmp_path):
  single, multi = tmp_path / 'one_process', tmp_path / 'two_processes'
  port = _free_port()
  procs = [_train(multi, 4, f'--config.coordinator_address=127.0.0.1:{port}', '--config.num_processes=2',
                  f'--config.process_id={rank}') for rank in (0, 1)]
  reference = _train(single, 8)
  outputs = [_finish(p) for p in procs]
  single_out = _finish(reference)

  # Only process 0 reports.
  assert 'semantic' in outputs[0] and 'semantic' in single_out
  assert 'semantic' not in outputs[1]
  compiled = json.loads((multi / 'compiled.json').read_text())
  assert compiled['processes'] == 2 and compiled['devices'] == 8
  # Every metric line comes from one writer: the same lines as the single process wrote.
  lines = lambda d: [json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()]
  assert [sorted(l) for l in lines(multi)] == [sorted(l) for l in lines(single)]

  # Checkpoints were written collectively and restore to the same state.
  step_a, state_a, meta_a = _final(single)
  step_b, state_b, meta_b = _final(multi)
  assert step_a == step_b == 6
  assert meta_a['data'] == meta_b['data']
  flat_a = jax.tree_util.tree_leaves_with_path(state_a)
  flat_b = jax.tree_util.tree_leaves_with_path(state_b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, a), (_, b) in zip(flat_a, flat_b):
    np.testing.assert_allclose(b, a, rtol=2e-6, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  metrics_a = json.loads((single / 'final_metrics.json').read_text())['val']
  metrics_b = json.loads((multi / 'final_metrics.json').read_text())['val']
  for task in metrics_a:
    for name in metrics_a[task]:
      assert metrics_b[task][name] == pytest.approx(metrics_a[task][name], rel=1e-4, abs=1e-4), (task, name)
