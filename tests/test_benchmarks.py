"""Tests for the training-throughput benchmark, `benchmarks/throughput.py`.

The benchmark is a script, not part of the package, so it is loaded from its path. The
end-to-end run goes through a subprocess: it is the only way to check that the benchmark
never imports TensorFlow or ml_collections when other tests in this session may already
have. Out-of-memory handling and the `max` batch search are tested with fake systems, so
nothing here needs a GPU or runs out of real memory.
"""

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import weakref

import jax
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'benchmarks' / 'throughput.py'
# The MTAN Cityscapes model (semantic 7 + depth, 128x256, full width) counted layer by layer
# in shared/REFERENCE.md.
CITYSCAPES_FORWARD_MACS = 48.2e9
E2E_SYSTEMS = ('mtan_jax', 'mtan_jax_bf16', 'torch_eager', 'torch_autocast_bf16')
# `max` is listed to check that CPU runs skip it rather than exhaust host memory.
TINY_ARGS = ['--workload', 'tiny', '--widths', '4,8,8,8,8', '--height', '32', '--width', '64',
             '--systems', ','.join(E2E_SYSTEMS), '--methods', 'pcgrad', '--batch-sizes', '2,max',
             '--windows', '1', '--iters', '1', '--warmup', '0', '--matmul-size', '128']
OOM_MESSAGE = 'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.'
TIMING = argparse.Namespace(windows=1, iters=1, warmup=0)


@pytest.fixture(scope='module')
def throughput():
  spec = importlib.util.spec_from_file_location('benchmarks_throughput', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  # dataclasses look their module up in sys.modules while the module executes.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


@pytest.fixture
def small_workload(throughput):
  """The tiny workload at 32x32: fake systems only build its batches."""
  return dataclasses.replace(throughput.WORKLOADS['tiny'], height=32, width=32)


def test_main_on_cpu_compares_all_cpu_systems_and_a_method_without_tensorflow(tmp_path):
  """One run of the script: every CPU system, a weighting method's row next to equal
  weighting, the goals, the environment; no TensorFlow or ml_collections imported."""
  pytest.importorskip('torch')
  out = tmp_path / 'result.json'
  driver = ('import runpy, sys\n'
            f'benchmark = runpy.run_path({str(SCRIPT)!r})\n'
            f'benchmark["main"]({[*TINY_ARGS, "--out", str(out)]!r})\n'
            'for name in ("tensorflow", "ml_collections"):\n'
            '  assert name not in sys.modules, f"the benchmark imported {name}"\n')
  # Unoptimised XLA compiles the tiny train step several times faster; speed is not checked.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}
  proc = subprocess.run([sys.executable, '-c', driver], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=400, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for system in E2E_SYSTEMS:
    assert f'| tiny | 2 | {system} | ok |' in proc.stdout
  assert 'batch size max is skipped' in proc.stdout
  assert 'Goals' in proc.stdout

  assert '| tiny | 2 | mtan_jax+pcgrad | ok |' in proc.stdout
  assert 'step time vs equal' in proc.stdout

  report = json.loads(out.read_text())
  rows = {r['system']: r for r in report['results']}
  assert set(rows) == {*E2E_SYSTEMS, 'mtan_jax+pcgrad'} and len(report['results']) == len(E2E_SYSTEMS) + 1
  assert report['mfu_denominator_tflops'] == report['matmul']['tflops'] > 0
  assert report['matmul']['size'] == 128
  assert report['mfu_denominator_source'].startswith('measured bf16 matmul')
  for row in (rows[system] for system in E2E_SYSTEMS):
    assert row['workload'] == 'tiny' and row['batch_size'] == 2 and row['status'] == 'ok'
    assert row['images_per_s'] > 0 and len(row['window_images_per_s']) == 1
    assert row['tflops'] > 0
    assert row['mfu'] == pytest.approx(row['tflops'] / report['mfu_denominator_tflops'])
    assert row['largest_fit'] is False  # the max search did not run on CPU
  assert rows['mtan_jax']['dtype'] == 'float32' and rows['mtan_jax_bf16']['dtype'] == 'bfloat16'
  assert rows['torch_eager']['ratio_to_torch_eager'] == 1.0
  for system in ('mtan_jax', 'mtan_jax_bf16', 'torch_autocast_bf16'):
    assert rows[system]['ratio_to_torch_eager'] == pytest.approx(
        rows[system]['images_per_s'] / rows['torch_eager']['images_per_s'])
  # XLA's memory analysis works on CPU too; PyTorch reports device memory only on GPU.
  for system in ('mtan_jax', 'mtan_jax_bf16'):
    assert rows[system]['peak_memory_bytes'] > 0
    assert rows[system]['peak_memory_per_image_bytes'] == rows[system]['peak_memory_bytes'] / 2
    assert rows[system]['memory_analysis']['temp_size_in_bytes'] > 0
  assert rows['torch_eager']['peak_memory_bytes'] is None
  assert rows['torch_eager']['model'] == 'mtan_jax.torch_reference.TorchMTAN'
  assert report['workloads'][0]['torch_model'] == 'mtan_jax.torch_reference.TorchMTAN'
  assert report['workloads'][0]['widths'] == [4, 8, 8, 8, 8]
  assert report['max_batch_search'] == []
  # The method's row: its step time against equal weighting (the mtan_jax row).
  assert report['settings']['methods'] == ['pcgrad']
  method = rows['mtan_jax+pcgrad']
  assert method['status'] == 'ok' and method['weighting'] == 'pcgrad'
  assert rows['mtan_jax']['weighting'] == 'equal'
  assert rows['mtan_jax']['step_time_ratio_to_equal'] is None
  assert method['step_time_ratio_to_equal'] == pytest.approx(
      rows['mtan_jax']['images_per_s'] / method['images_per_s'])
  assert method['peak_memory_bytes'] > 0
  step_goals = [g for g in report['goals'] if g['kind'] == 'step_time']
  assert [g['goal'] for g in step_goals] == [
      'mtan_jax+pcgrad / mtan_jax step time at batch 8 <= 1.5']
  assert report['goals'] and all(g['status'] == 'not measured' for g in report['goals'])
  assert all(g['note'].startswith('CPU run: goals are defined for one H100')
             for g in report['goals'])
  env_info = report['environment']
  for key in ('jax_device_kind', 'cpu_count', 'date_utc', 'command'):
    assert env_info[key]
  assert 'gpu_driver_version' in env_info
  assert set(env_info['versions']) >= {'jax', 'jaxlib', 'flax', 'torch'}


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
  trainer = throughput.TorchTrainer(config, throughput.make_batch(config, 2), 'eager')
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


# ----------------------------------------------------------------------------------------
# Out of memory and the max batch search, with fake systems
# ----------------------------------------------------------------------------------------

class FakeTrainer:
  """A trainer that runs out of memory above `limit` images, in `build` or in `step`."""

  model = 'fake'
  device = 'fake:0'

  def __init__(self, batch, limit, fail_in='step'):
    self.batch_size = len(batch['image'])
    self.limit = limit
    if fail_in == 'build':
      self._check()

  def _check(self):
    if self.batch_size > self.limit:
      raise jax.errors.JaxRuntimeError(OOM_MESSAGE)

  def step(self):
    self._check()

  def sync(self, outputs):
    del outputs

  def memory(self):
    return {'peak_memory_bytes': 1000 * self.batch_size, 'memory_source': 'fake'}

  def release(self):
    pass


def fake_system(throughput, limit, fail_in='step', built=None):
  """A System whose trainers run out of memory above `limit`; `built` collects weakrefs."""
  def build(workload, batch, torch_ref):
    del workload, torch_ref
    trainer = FakeTrainer(batch, limit, fail_in)
    if built is not None:
      built.append(weakref.ref(trainer))
    return trainer
  return throughput.System('fake', 'fake system', 'jax', 'float32', build)


@pytest.mark.parametrize('fail_in', ['build', 'step'])
def test_out_of_memory_gives_an_oom_row_and_frees_the_trainer(throughput, small_workload,
                                                               fail_in):
  built = []
  system = fake_system(throughput, limit=4, fail_in=fail_in, built=built)
  ok = throughput.measure(system, small_workload, 4, TIMING, train_gflop=2.0, mfu_tflops=1.0)
  oom = throughput.measure(system, small_workload, 8, TIMING, train_gflop=2.0, mfu_tflops=1.0)
  assert ok['status'] == 'ok' and ok['images_per_s'] > 0
  assert ok['peak_memory_per_image_bytes'] == 1000
  assert oom['status'] == 'oom' and 'RESOURCE_EXHAUSTED' in oom['error']
  for key in ('images_per_s', 'tflops', 'mfu', 'peak_memory_bytes',
              'peak_memory_per_image_bytes', 'ratio_to_torch_eager'):
    assert oom[key] is None, key
  gc.collect()
  # Not even the exception's traceback keeps the failed trainer (and its buffers) alive.
  assert all(ref() is None for ref in built)
  throughput.add_ratios([ok, oom])
  table = throughput.format_table([ok, oom])
  assert '| tiny | 8 | fake | oom | n/a | n/a |' in table


def test_other_errors_propagate(throughput, small_workload):
  def build(workload, batch, torch_ref):
    raise ValueError('shapes do not match')
  system = throughput.System('broken', 'broken', 'jax', 'float32', build)
  with pytest.raises(ValueError, match='shapes'):
    throughput.measure(system, small_workload, 2, TIMING, train_gflop=1.0, mfu_tflops=1.0)


def test_is_out_of_memory(throughput):
  torch = pytest.importorskip('torch')
  assert throughput.is_out_of_memory(jax.errors.JaxRuntimeError(OOM_MESSAGE))
  assert throughput.is_out_of_memory(torch.OutOfMemoryError('CUDA out of memory.'))
  # torch.compile wraps errors raised while compiling.
  try:
    try:
      raise torch.OutOfMemoryError('CUDA out of memory.')
    except torch.OutOfMemoryError as e:
      raise RuntimeError('backend compiler failed') from e
  except RuntimeError as wrapped:
    assert throughput.is_out_of_memory(wrapped)
  assert not throughput.is_out_of_memory(ValueError('INVALID_ARGUMENT: bad shape'))


def test_max_search_doubles_from_the_largest_listed_fit_until_oom(throughput, small_workload):
  system = fake_system(throughput, limit=40)
  measured = []

  def measure_at(batch_size):
    measured.append(batch_size)
    return throughput.measure(system, small_workload, batch_size, TIMING, 1.0, 1.0)

  rows, search = throughput.sweep_batch_sizes(measure_at, (32, 2, 8), True, 1024)
  assert measured == [2, 8, 32, 64]
  assert [r['status'] for r in rows] == ['ok', 'ok', 'ok', 'oom']
  assert [r['largest_fit'] for r in rows] == [False, False, True, False]
  assert search == {'largest_fit': 32, 'stopped_by': 'oom', 'skipped': []}


def fake_measure(limit, measured):
  """measure_at for `sweep_batch_sizes` without building anything: 'oom' above `limit`."""
  def measure_at(batch_size):
    measured.append(batch_size)
    return {'batch_size': batch_size, 'status': 'ok' if batch_size <= limit else 'oom',
            'largest_fit': False}
  return measure_at


@pytest.mark.parametrize('limit, sizes, max_batch, expected_measured, largest, stopped_by', [
    # A listed size ran out of memory: the search refines below it, and stops there.
    (20, (2, 8, 32), 1024, [2, 8, 32, 16], 16, 'oom'),
    # --max-batch bounds the doubling.
    (10**6, (2, 8), 100, [2, 8, 16, 32, 64], 64, 'max_batch'),
    # Nothing fit: there is nothing to double.
    (1, (2, 8), 1024, [2], None, 'no listed size fit'),
])
def test_max_search_edges(throughput, limit, sizes, max_batch, expected_measured, largest,
                          stopped_by):
  measured = []
  rows, search = throughput.sweep_batch_sizes(fake_measure(limit, measured), sizes, True,
                                              max_batch)
  assert measured == expected_measured
  assert search['largest_fit'] == largest and search['stopped_by'] == stopped_by
  assert [r['batch_size'] for r in rows if r['largest_fit']] == ([largest] if largest else [])


def test_without_max_only_listed_sizes_run_and_none_above_an_oom(throughput):
  measured = []
  rows, search = throughput.sweep_batch_sizes(fake_measure(5, measured), (2, 8, 32), False, 1024)
  assert measured == [2, 8]
  assert search == {'largest_fit': 2, 'stopped_by': None, 'skipped': [32]}
  assert not any(r['largest_fit'] for r in rows)


# ----------------------------------------------------------------------------------------
# Command line and --torch-ref per workload
# ----------------------------------------------------------------------------------------

@pytest.fixture
def reference_checkout(tmp_path):
  """A directory shaped like a lorenmt/mtan checkout (parse_args only checks the script)."""
  script = tmp_path / 'im2im_pred' / 'model_segnet_mtan.py'
  script.parent.mkdir()
  script.write_text('class SegNet: pass\n')
  return str(tmp_path)


def test_defaults(throughput):
  args, workloads = throughput.parse_args([])
  assert [w.name for w in workloads] == ['tiny']
  assert args.systems == ('torch_eager', 'torch_compile', 'torch_autocast_bf16', 'mtan_jax',
                          'mtan_jax_bf16')
  assert args.batch_sizes == (2, 8, 32) and args.search_max
  assert args.max_batch == 1024 and args.peak_tflops is None and args.matmul_size is None


def test_workload_list_with_overrides(throughput):
  args, workloads = throughput.parse_args(
      ['--workload', 'cityscapes,nyuv2,cityscapes', '--height', '64', '--width', '96',
       '--systems', 'mtan_jax,torch_eager', '--batch-sizes', '8,2'])
  assert [w.name for w in workloads] == ['cityscapes', 'nyuv2']
  assert all((w.height, w.width) == (64, 96) for w in workloads)
  assert [w.tasks for w in workloads] == [('semantic', 'depth'), ('semantic', 'depth', 'normal')]
  assert args.systems == ('mtan_jax', 'torch_eager')
  assert args.batch_sizes == (8, 2) and not args.search_max


def test_torch_ref_applies_per_workload(throughput, reference_checkout):
  _, workloads = throughput.parse_args(
      ['--workload', 'cityscapes,nyuv2', '--torch-ref', reference_checkout])
  cityscapes, nyuv2 = (throughput.torch_model_for(w, reference_checkout) for w in workloads)
  assert cityscapes['torch_model'] == 'mtan_jax.torch_reference.TorchMTAN'
  assert cityscapes['torch_ref'] is None
  assert 'cityscapes' in cityscapes['note'] and 'TorchMTAN was used' in cityscapes['note']
  assert nyuv2['torch_model'].startswith('lorenmt/mtan SegNet')
  assert nyuv2['torch_ref'] == reference_checkout and nyuv2['note'] is None
  # Other resolutions still fit the reference class; other widths do not.
  _, (small,) = throughput.parse_args(
      ['--workload', 'nyuv2', '--height', '32', '--width', '64', '--torch-ref',
       reference_checkout])
  assert throughput.torch_model_for(small, reference_checkout)['torch_ref'] == reference_checkout
  narrow = dataclasses.replace(small, widths=(8, 16, 16, 32, 32))
  assert throughput.torch_model_for(narrow, reference_checkout)['torch_ref'] is None
  assert throughput.torch_model_for(narrow, None) == {
      'torch_model': 'mtan_jax.torch_reference.TorchMTAN', 'torch_ref': None, 'note': None}


@pytest.mark.parametrize('argv, message', [
    (['--torch-ref', '/nonexistent/mtan'], '--torch-ref'),
    (['--workload', 'tiny,imagenet'], 'unknown workload imagenet'),
    (['--systems', 'mtan_jax,torch_jit'], 'unknown system torch_jit'),
    (['--height', '100'], 'divisible by 32'),
    (['--batch-sizes', '2,x'], 'comma-separated'),
    (['--batch-sizes', 'max'], 'largest listed size'),
    (['--peak-tflops', '0'], '--peak-tflops'),
])
def test_bad_arguments_exit_with_message(throughput, capsys, argv, message):
  with pytest.raises(SystemExit):
    throughput.parse_args(argv)
  assert message in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get('MTAN_TORCH_REF'),
                    reason='set MTAN_TORCH_REF to a lorenmt/mtan checkout')
def test_torch_trainer_on_reference_segnet(throughput):
  pytest.importorskip('torch')
  config = dataclasses.replace(throughput.WORKLOADS['nyuv2'], height=32, width=64)
  trainer = throughput.TorchTrainer(config, throughput.make_batch(config, 1), 'eager',
                                    os.environ['MTAN_TORCH_REF'])
  assert trainer.model.startswith('lorenmt/mtan SegNet')
  assert float(trainer.step()) > 0


# ----------------------------------------------------------------------------------------
# Goals
# ----------------------------------------------------------------------------------------

def goal_row(system, batch_size, images_per_s=None, mfu=None, memory_per_image=None,
             status='ok', workload='cityscapes'):
  return {'workload': workload, 'system': system, 'batch_size': batch_size, 'status': status,
          'images_per_s': images_per_s if status == 'ok' else None,
          'mfu': mfu if status == 'ok' else None,
          'peak_memory_per_image_bytes': memory_per_image if status == 'ok' else None}


GIB = 2**30
GOAL_ROWS = [
    goal_row('torch_eager', 8, 100.0, 0.1, 1.5 * GIB),
    goal_row('torch_compile', 8, 160.0, 0.16),
    goal_row('torch_autocast_bf16', 8, 180.0, 0.18, 1.0 * GIB),
    goal_row('mtan_jax', 8, 250.0, 0.25, 1.0 * GIB),
    goal_row('mtan_jax_bf16', 8, 280.0, 0.35, 0.9 * GIB),
    goal_row('torch_eager', 32, status='oom'),
    goal_row('mtan_jax', 32, 260.0, 0.26, 1.0 * GIB),
    goal_row('torch_autocast_bf16', 32, 190.0, 0.19, 1.0 * GIB),
    goal_row('mtan_jax_bf16', 32, status='oom'),
    goal_row('mtan_jax_bf16', 16, 300.0, 0.45, 0.9 * GIB),
]


def goals_by_name(goals):
  return {(g['workload'], g['goal'], g['batch_size']): g for g in goals}


def test_goals_on_hand_made_gpu_rows(throughput):
  goals = goals_by_name(throughput.evaluate_goals(GOAL_ROWS, ['cityscapes', 'nyuv2']))
  eager = goals['cityscapes', 'mtan_jax / torch_eager images/s at batch 8 >= 2.0', 8]
  assert eager['status'] == 'met' and eager['value'] == pytest.approx(2.5)
  compiled = goals['cityscapes', 'mtan_jax / torch_compile images/s at batch 8 >= 1.3', 8]
  assert compiled['status'] == 'met' and compiled['value'] == pytest.approx(250 / 160)
  bf16 = goals['cityscapes', 'mtan_jax_bf16 / torch_eager images/s at batch 8 >= 3.0', 8]
  assert bf16['status'] == 'not met' and bf16['value'] == pytest.approx(2.8)
  mfu = goals['cityscapes', 'best MFU of mtan_jax_bf16 over batch sizes >= 40%', 16]
  assert mfu['status'] == 'met' and mfu['value'] == 0.45

  memory = "mtan_jax peak memory per image <= torch_eager's"
  assert goals['cityscapes', memory, 8]['status'] == 'met'
  assert goals['cityscapes', memory, 8]['value'] == pytest.approx(1 / 1.5)
  # Only the baseline ran out of memory at 32: the system needs less.
  assert goals['cityscapes', memory, 32]['status'] == 'met'
  bf16_memory = "mtan_jax_bf16 peak memory per image <= torch_autocast_bf16's"
  assert goals['cityscapes', bf16_memory, 8]['status'] == 'met'
  assert goals['cityscapes', bf16_memory, 16]['status'] == 'not measured'
  assert goals['cityscapes', bf16_memory, 32]['status'] == 'not met'

  # No rows for nyuv2: every goal is reported, as not measured.
  nyuv2 = [g for g in goals.values() if g['workload'] == 'nyuv2']
  assert len(nyuv2) == 6 and all(g['status'] == 'not measured' for g in nyuv2)
  table = throughput.format_goals(list(goals.values()))
  assert '| cityscapes | best MFU of mtan_jax_bf16 over batch sizes >= 40% | 16 | 45.0% | met |' \
      in table


def test_goals_on_cpu_are_not_measured(throughput):
  goals = throughput.evaluate_goals(GOAL_ROWS, ['cityscapes'], throughput.CPU_GOAL_NOTE)
  assert goals and all(g['status'] == 'not measured' for g in goals)
  assert all(g['note'].startswith('CPU run: goals are defined for one H100') for g in goals)
  # The values are still there, for information.
  assert goals[0]['value'] == pytest.approx(2.5)


# ----------------------------------------------------------------------------------------
# Weighting methods (--methods)
# ----------------------------------------------------------------------------------------

def test_methods_all_and_names(throughput):
  assert throughput.parse_args([])[0].methods == ()
  args, _ = throughput.parse_args(['--systems', 'torch_eager', '--methods', 'all'])
  assert args.methods == throughput.METHOD_CHOICES
  assert 'equal' not in args.methods and 'fixed' not in args.methods
  assert {'pcgrad', 'mgda', 'dwa', 'db_mtl'} <= set(args.methods)
  # The method rows' step times are relative to mtan_jax's, so it is measured too.
  assert args.systems == ('torch_eager', 'mtan_jax')
  args, _ = throughput.parse_args(['--systems', 'mtan_jax', '--methods', 'pcgrad, dwa,pcgrad'])
  assert args.methods == ('pcgrad', 'dwa') and args.systems == ('mtan_jax',)


@pytest.mark.parametrize('methods, message', [
    ('pcgrad,sgd', 'unknown method sgd'),
    # fixed needs task weights; equal is mtan_jax itself.
    ('fixed', 'unknown method fixed'),
    ('equal', 'unknown method equal'),
    (',', 'unknown method'),
])
def test_bad_methods_exit_with_message(throughput, capsys, methods, message):
  with pytest.raises(SystemExit):
    throughput.parse_args(['--methods', methods])
  assert message in capsys.readouterr().err


def test_step_time_ratio_and_goal_of_method_rows(throughput):
  rows = [goal_row('mtan_jax', 8, 100.0), goal_row('mtan_jax+pcgrad', 8, 80.0),
          goal_row('mtan_jax+mgda', 8, 50.0), goal_row('mtan_jax+dwa', 8, 100.0),
          goal_row('mtan_jax+cagrad', 8, status='oom'), goal_row('mtan_jax+pcgrad', 2, 40.0)]
  throughput.add_ratios(rows)
  ratios = {(r['system'], r['batch_size']): r['step_time_ratio_to_equal'] for r in rows}
  assert ratios == {('mtan_jax', 8): None, ('mtan_jax+pcgrad', 8): pytest.approx(1.25),
                    ('mtan_jax+mgda', 8): pytest.approx(2.0), ('mtan_jax+dwa', 8): 1.0,
                    ('mtan_jax+cagrad', 8): None, ('mtan_jax+pcgrad', 2): None}
  ordered = [r['system'] for r in throughput.sort_rows(rows, ['cityscapes'])]
  assert ordered[0] == 'mtan_jax+pcgrad'  # batch 2 first
  # Method rows follow mtan_jax, in METHOD_CHOICES order.
  assert ordered[1:] == ['mtan_jax', 'mtan_jax+dwa', 'mtan_jax+mgda', 'mtan_jax+pcgrad',
                         'mtan_jax+cagrad']
  table = throughput.format_table([
      {'largest_fit': False, 'tflops': None, 'peak_memory_bytes': None,
       'other_processes_cpu_cores': None, **r} for r in rows])
  assert '| cityscapes | 8 | mtan_jax+mgda | ok | 50 | n/a | 2.00x |' in table

  step = lambda m: f'mtan_jax+{m} / mtan_jax step time at batch 8 <= 1.5'
  goals = goals_by_name(throughput.evaluate_goals(rows, ['cityscapes']))
  assert goals['cityscapes', step('pcgrad'), 8]['status'] == 'met'
  assert goals['cityscapes', step('mgda'), 8]['status'] == 'not met'
  assert goals['cityscapes', step('mgda'), 8]['value'] == pytest.approx(2.0)
  assert goals['cityscapes', step('cagrad'), 8]['status'] == 'not measured'
  # Loss-based methods have no step-time goal; without method rows there is none at all.
  assert not any('dwa' in g for _, g, _ in goals)
  assert not any(g['kind'] == 'step_time'
                 for g in throughput.evaluate_goals(GOAL_ROWS, ['cityscapes']))
  # On CPU the ratio is reported, not judged.
  cpu = goals_by_name(throughput.evaluate_goals(rows, ['cityscapes'], throughput.CPU_GOAL_NOTE))
  assert cpu['cityscapes', step('mgda'), 8]['status'] == 'not measured'
  assert cpu['cityscapes', step('mgda'), 8]['value'] == pytest.approx(2.0)


def test_method_memory_plans_per_task_gradients(tmp_path):
  """benchmarks/method_memory.py: compile-only peak memory; per-task gradients cost memory,
  and computing them one task at a time costs less than vmapping them."""
  out = tmp_path / 'mem.json'
  subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks' / 'method_memory.py'), '--workload', 'tiny',
                  '--widths', '4,8,8,8,8', '--height', '32', '--width', '64', '--batch', '2',
                  '--methods', 'equal,pcgrad,pcgrad:sequential', '--out', str(out)],
                 check=True, capture_output=True, timeout=900, cwd=REPO_ROOT)
  peaks = {m: row['peak_bytes'] for m, row in json.loads(out.read_text())['methods'].items()}
  assert peaks['equal'] < peaks['pcgrad']
  assert peaks['pcgrad:sequential'] <= peaks['pcgrad']
