"""Tests for the input pipeline benchmark, `benchmarks/input_pipeline.py`.

The benchmark runs each core count in a worker process of its own, so it is run here as a
subprocess too, on tiny settings (8 fake pets, batches of 4, half a second per row, one
core): the point is that every piece runs and the report holds together, not the numbers.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / 'benchmarks' / 'input_pipeline.py'
TINY_ARGS = ['--workloads', 'synthetic,pets_aux', '--num-examples', '8', '--batch-size', '4',
             '--seconds', '0.5', '--cores', '1']


def _run(args, timeout=240):
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope='module')
def benchmark_module():
  spec = importlib.util.spec_from_file_location('benchmarks_input_pipeline', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  # dataclasses look their module up in sys.modules while the module executes.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  yield module
  del sys.modules[spec.name]


def test_tiny_run_prints_the_table_and_writes_one_row_per_workload_and_core_count(tmp_path):
  out = tmp_path / 'result.json'
  proc = _run([*TINY_ARGS, '--out', str(out)])
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert 'os.cpu_count()=' in proc.stdout
  assert '| workload | cores | images/s | ms per batch | vs goal 1,200 images/s |' in proc.stdout
  for workload in ('synthetic', 'pets_aux'):
    assert f'| {workload} | 1 | ' in proc.stdout
  assert 'Canny edges' in proc.stdout

  report = json.loads(out.read_text())
  env = report['environment']
  assert env['os_cpu_count'] == os.cpu_count()
  assert env['affinity_cpu_count'] == len(os.sched_getaffinity(0))
  assert env['versions']['tensorflow']
  rows = report['results']
  assert sorted((r['workload'], r['cores']) for r in rows) == [('pets_aux', 1), ('synthetic', 1)]
  for row in rows:
    assert row['images_per_s'] > 0 and row['ms_per_batch'] > 0
    assert row['ratio_to_goal'] == pytest.approx(row['images_per_s'] / 1200)
    assert len(row['cpus']) == 1
    # TensorFlow's pool followed the one-CPU mask the worker was started with.
    assert row['tensorflow_pool_threads'] == 1
  assert report['settings']['goal_images_per_s'] == 1200
  stages = [s['stage'] for s in report['stages'] if s['workload'] == 'pets_aux']
  for prefix in ('decode JPEG', 'Canny edges', 'RGB -> Lab', 'full pipeline on 1 core'):
    assert any(name.startswith(prefix) for name in stages), (prefix, stages)


@pytest.mark.parametrize('args, message', [
    (['--workloads', 'pets_aux,imagenet'], 'unknown workload imagenet'),
    (['--cores', '0'], 'expected a comma list of positive integers'),
    (['--cores', '4096'], 'this process may run on only'),
    (['--batch-size', '64', '--num-examples', '8', '--workloads', 'synthetic'],
     'an epoch would have no batch'),
])
def test_bad_arguments_give_one_line_and_a_nonzero_exit(benchmark_module, capsys, args, message):
  # parse_args is what main runs first; in-process it needs no TensorFlow and no worker.
  with pytest.raises(SystemExit) as exc:
    benchmark_module.main([*args, '--out', os.devnull])
  assert exc.value.code != 0
  err = capsys.readouterr().err
  assert len(err.strip().splitlines()) == 1, err
  assert message in err


def test_bad_workload_from_the_command_line(tmp_path):
  proc = _run(['--workloads', 'nope', '--out', str(tmp_path / 'x.json')], timeout=60)
  assert proc.returncode != 0
  assert proc.stdout == ''
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'unknown workload nope' in lines[0], proc.stderr
  assert not (tmp_path / 'x.json').exists()


def test_import_has_no_side_effects():
  # Importing the script must neither run the benchmark nor pull in TensorFlow.
  driver = (f'import importlib.util, sys\n'
            f'spec = importlib.util.spec_from_file_location("b", {str(SCRIPT)!r})\n'
            'module = importlib.util.module_from_spec(spec)\n'
            'sys.modules["b"] = module\n'
            'spec.loader.exec_module(module)\n'
            'assert "tensorflow" not in sys.modules\n'
            'assert set(module.WORKLOADS) == {"npy_cityscapes", "tfds_cityscapes", "pets_aux", '
            '"pets_aux_augment", "synthetic"}\n')
  proc = subprocess.run([sys.executable, '-c', driver], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == ''
