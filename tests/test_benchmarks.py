"""Tests for the training-throughput benchmark, `benchmarks/throughput.py`.

The benchmark is a script, not part of the package, so it is loaded from its path. The
end-to-end run goes through a subprocess: it is the only way to check that the CLI never
imports TensorFlow when other tests in this session may already have.
"""

import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'benchmarks' / 'throughput.py'
# The MTAN Cityscapes model (semantic 7 + depth, 128x256, full width) counted layer by layer
# in shared/REFERENCE.md.
CITYSCAPES_FORWARD_MACS = 48.2e9
TINY_ARGS = ['--widths', '4,8,8,8,8', '--height', '32', '--width', '64', '--batch-sizes', '2',
             '--windows', '2', '--iters', '1', '--warmup', '0']


@pytest.fixture(scope='module')
def throughput():
  spec = importlib.util.spec_from_file_location('benchmarks_throughput', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  # dataclasses look their module up in sys.modules while the module executes.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


def test_cli_measures_both_systems_without_tensorflow(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'result.json'
  driver = ('import runpy, sys\n'
            f'sys.argv = {[str(SCRIPT), *TINY_ARGS, "--out", str(out)]!r}\n'
            f'runpy.run_path({str(SCRIPT)!r}, run_name="__main__")\n'
            'assert "tensorflow" not in sys.modules, "the benchmark imported tensorflow"\n')
  # Unoptimised XLA compiles the tiny train step several times faster; speed is not checked.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}
  proc = subprocess.run([sys.executable, '-c', driver], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| mtan_jax | 2 |' in proc.stdout and '| torch_eager | 2 |' in proc.stdout

  report = json.loads(out.read_text())
  rows = {r['system']: r for r in report['results']}
  assert set(rows) == {'mtan_jax', 'torch_eager'}
  for row in rows.values():
    assert row['batch_size'] == 2
    assert row['images_per_s'] > 0
    assert len(row['window_images_per_s']) == 2
    assert row['tflops'] > 0
    # CPU: neither memory nor MFU is reported rather than made up.
    assert row['peak_memory_bytes'] is None and row['mfu'] is None
  assert rows['torch_eager']['ratio_to_torch_eager'] == 1.0
  assert rows['mtan_jax']['ratio_to_torch_eager'] == pytest.approx(
      rows['mtan_jax']['images_per_s'] / rows['torch_eager']['images_per_s'])
  assert rows['torch_eager']['model'] == 'mtan_jax.torch_reference.TorchMTAN'
  env_info = report['environment']
  for key in ('jax_device_kind', 'cpu_count', 'date_utc', 'command'):
    assert env_info[key]
  assert set(env_info['versions']) >= {'jax', 'jaxlib', 'flax', 'torch'}
  assert report['workload']['widths'] == [4, 8, 8, 8, 8]


def test_flops_of_full_cityscapes_model(throughput):
  flops = throughput.flop_summary(throughput.WORKLOADS['cityscapes'])
  forward_macs = flops['forward_gmac_per_image'] * 1e9
  assert forward_macs == pytest.approx(CITYSCAPES_FORWARD_MACS, rel=0.01)
  assert flops['train_gflop_per_image'] == pytest.approx(6 * flops['forward_gmac_per_image'])


def test_flops_match_torch_flop_counter(throughput):
  """The shape-based count agrees with PyTorch's own counter on the same architecture."""
  torch = pytest.importorskip('torch')
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  from mtan_jax import torch_reference  # pylint: disable=import-outside-toplevel
  workload = throughput.WORKLOADS['nyuv2']
  workload = dataclasses.replace(workload, height=32, width=64, widths=(4, 8, 8, 16, 16))
  model = torch_reference.TorchMTAN(workload.task_channels(), workload.widths)
  counter = FlopCounterMode(display=False)
  with counter, torch.no_grad():
    model(torch.zeros(1, 3, workload.height, workload.width))
  conv_flops = sum(v for op, v in counter.get_flop_counts()['Global'].items()
                   if 'convolution' in str(op))
  assert throughput.forward_conv_macs(workload) * 2 == conv_flops


@pytest.mark.parametrize('workload', ['tiny', 'nyuv2'])
def test_torch_trainer_step(throughput, workload):
  pytest.importorskip('torch')
  config = dataclasses.replace(throughput.WORKLOADS[workload], height=32, width=64,
                                          widths=(4, 8, 8, 8, 8))
  trainer = throughput.TorchTrainer(config, throughput.make_batch(config, 2), False, None)
  losses = [float(trainer.step()) for _ in range(2)]
  assert all(loss == loss and loss > 0 for loss in losses)  # finite, and every task adds > 0
  assert losses[1] != losses[0]  # the optimizer updated the weights


def test_make_batch_ranges(throughput):
  batch = throughput.make_batch(throughput.WORKLOADS['nyuv2'], 2)
  assert batch['image'].shape == (2, 288, 384, 3)
  assert 0 <= batch['image'].min() and batch['image'].max() <= 1
  assert batch['label'].min() == -1 and batch['label'].max() == 12
  assert batch['depth'].min() > 0
  np.testing.assert_allclose(np.linalg.norm(batch['normal'], axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('argv, message', [
    (['--workload', 'cityscapes', '--torch-ref', '/x'], '--torch-ref'),
    (['--workload', 'nyuv2', '--widths', '8,16,16,32,32', '--torch-ref', '/x'], '--torch-ref'),
    (['--height', '100'], 'divisible by 32'),
    (['--batch-sizes', '2,x'], 'comma-separated'),
])
def test_bad_arguments_exit_with_message(throughput, capsys, argv, message):
  with pytest.raises(SystemExit):
    throughput.parse_args(argv)
  assert message in capsys.readouterr().err


def test_torch_ref_accepted_for_nyuv2_at_other_resolutions(throughput):
  args, workload = throughput.parse_args(
      ['--workload', 'nyuv2', '--torch-ref', '/checkout', '--height', '32', '--width', '64'])
  assert args.torch_ref == '/checkout'
  assert (workload.height, workload.width) == (32, 64)


@pytest.mark.skipif(not os.environ.get('MTAN_TORCH_REF'),
                    reason='set MTAN_TORCH_REF to a lorenmt/mtan checkout')
def test_torch_trainer_on_reference_segnet(throughput):
  pytest.importorskip('torch')
  config = dataclasses.replace(throughput.WORKLOADS['nyuv2'], height=32, width=64)
  trainer = throughput.TorchTrainer(config, throughput.make_batch(config, 1), False,
                                    os.environ['MTAN_TORCH_REF'])
  assert trainer.model.startswith('lorenmt/mtan SegNet')
  assert float(trainer.step()) > 0
