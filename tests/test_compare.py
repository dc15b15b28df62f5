"""The run comparison table: seeds grouped, mean/std, parameters, images/s and Delta_MTL."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, tiny_config
from mtan_jax import compare, metrics
from mtan_jax.errors import ConfigError, DataError
from mtan_jax.steps import count_params, create_model
from mtan_jax.tasks import make_tasks

EPOCHS = 12
LAST = 10
_METRICS = {
    'semantic': ('loss', 'miou', 'pix_acc'),
    'depth': ('loss', 'abs_err', 'rel_err'),
    'normal': ('loss', 'mean', 'median', 'within_11_25', 'within_22_5', 'within_30'),
}


def _random_val(tasks, key):
  """Made-up metrics of one evaluated epoch, different for every `key`."""
  rng = np.random.default_rng(key)
  return {t: {m: float(rng.uniform(0.1, 0.9)) for m in _METRICS[t]} for t in tasks}


def _write_run(workdir, config, val_of_epoch, rates=(90.0, 120.0, 100.0, 110.0)):
  """A workdir as scripts/train.py leaves it: config.json, history.json, metrics.jsonl."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json())
  history = [{'epoch': e, 'step': 4 * e, 'val': val_of_epoch(e),
              'train': {t: {'loss': 1.0 / e} for t in config.tasks}} for e in range(1, EPOCHS + 1)]
  with open(os.path.join(workdir, 'history.json'), 'w', encoding='utf-8') as f:
    json.dump(history, f)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for i, rate in enumerate(rates):
      f.write(json.dumps({'step': 2 * (i + 1), 'train/loss': 1.0, 'train/images_per_sec': rate}) + '\n')
  return history


def _last_means(history):
  window = history[-LAST:]
  return {t: {m: float(np.mean([r['val'][t][m] for r in window])) for m in values}
          for t, values in window[-1]['val'].items()}


@pytest.fixture
def runs(tmp_path):
  """Two seeds of MTAN with DWA, one with equal weighting, single-task baselines."""
  tasks = ('semantic', 'depth', 'normal')
  out = {'histories': {}}

  def add(name, config, key, **kwargs):
    workdir = str(tmp_path / name)
    out['histories'][workdir] = _write_run(
        workdir, config, lambda e: _random_val(config.tasks, [key, e]), **kwargs)
    return workdir

  # Seed 1 also differs in keys that do not change the experiment: still the same group.
  out['dwa'] = [add('dwa/mtan_seed0', tiny_config(seed=0, tasks=tasks, weighting='dwa'), 0),
                add('dwa/mtan_seed1', tiny_config(seed=1, tasks=tasks, weighting='dwa', log_every_steps=7,
                                                  data_dir='/elsewhere', progress_bar=True), 1,
                    rates=(50.0, 70.0, 60.0))]
  out['equal'] = [add('equal/mtan_seed0', tiny_config(seed=0, tasks=tasks, weighting='equal'), 2)]
  out['stl'] = [add('stl_semantic', tiny_config(model='segnet', tasks=('semantic',), weighting='equal'), 3),
                add('stl_depth', tiny_config(model='segnet', tasks=('depth',), weighting='equal'), 4)]
  return out


def _baseline_means(runs):
  values = {}
  for workdir in runs['stl']:
    for task, table in _last_means(runs['histories'][workdir]).items():
      values[task] = {m: v for m, v in table.items() if m != 'loss'}
  return values


def test_groups_seeds_and_reports_mean_std_params_speed_and_deltas(runs):
  table = compare.compare(runs['dwa'] + runs['equal'], runs['stl'], last=LAST)
  groups = {g['label']: g for g in table['groups']}
  # Same workdir name in two experiments: the differing key tells them apart.
  assert list(groups) == ['stl_semantic', 'stl_depth', 'mtan weighting=dwa', 'mtan weighting=equal']
  assert [g['baseline'] for g in table['groups']] == [True, True, False, False]
  dwa = groups['mtan weighting=dwa']
  assert dwa['workdirs'] == runs['dwa'] and dwa['seeds'] == [0, 1]
  assert groups['mtan weighting=equal']['seeds'] == [0]

  per_seed = [_last_means(runs['histories'][w]) for w in runs['dwa']]
  for task, values in per_seed[0].items():
    for metric in values:
      seeds = [p[task][metric] for p in per_seed]
      assert dwa['val'][task][metric]['mean'] == pytest.approx(np.mean(seeds))
      assert dwa['val'][task][metric]['std'] == pytest.approx(np.std(seeds))
  assert [r['epochs'] for r in dwa['runs']] == [list(range(3, 13))] * 2

  # Medians per run (105, 60), then the mean over seeds.
  assert [r['images_per_sec'] for r in dwa['runs']] == [105.0, 60.0]
  assert dwa['images_per_sec'] == pytest.approx(82.5)

  config = tiny_config()
  model = create_model('mtan', make_tasks(config.tasks, config.num_classes), config.widths, 0,
                       in_channels=3, image_size=config.image_size, head_hidden=config.head_hidden)
  assert dwa['params'] == count_params(model)
  stl = create_model('segnet', make_tasks(('depth',), config.num_classes), config.widths, 0)
  assert groups['stl_depth']['params'] == count_params(stl) < dwa['params']

  baselines = _baseline_means(runs)
  assert table['baselines'].keys() == baselines.keys()
  for task, values in baselines.items():
    assert table['baselines'][task] == pytest.approx(values)
  assert dwa['delta_tasks'] == ['semantic', 'depth']
  for key, fn in (('delta_m', metrics.delta_m), ('delta_mtl_libmtl', metrics.delta_mtl_libmtl)):
    values = [fn(p, baselines) for p in per_seed]
    assert [r[key] for r in dwa['runs']] == pytest.approx(values)
    assert dwa[key] == pytest.approx({'mean': np.mean(values), 'std': np.std(values)})
  assert 'delta_m' not in groups['stl_depth']


def test_delta_by_hand(tmp_path):
  """miou 0.55 vs 0.50 (+10%), abs_err 0.018 vs 0.020 (+10%), the rest unchanged."""
  mtl = {'semantic': {'loss': 1.0, 'miou': 0.55, 'pix_acc': 0.8},
         'depth': {'loss': 0.018, 'abs_err': 0.018, 'rel_err': 0.3}}
  workdirs = [str(tmp_path / f'mtl_s{s}') for s in (0, 1)]
  for seed, workdir in enumerate(workdirs):
    _write_run(workdir, tiny_config(seed=seed, tasks=('semantic', 'depth')), lambda e: mtl)
  stl = [str(tmp_path / 'stl_sem'), str(tmp_path / 'stl_dep')]
  _write_run(stl[0], tiny_config(model='segnet', tasks=('semantic',)),
             lambda e: {'semantic': {'loss': 2.0, 'miou': 0.5, 'pix_acc': 0.8}})
  _write_run(stl[1], tiny_config(model='segnet', tasks=('depth',)),
             lambda e: {'depth': {'loss': 0.02, 'abs_err': 0.02, 'rel_err': 0.3}})
  group = compare.compare(workdirs, stl)['groups'][-1]
  assert group['label'] == 'mtl'
  # Delta_m: -(10 + 0 + 10 + 0) / 4 metrics; LibMTL: (10 / 2 + 10 / 2) / 2 tasks.
  assert group['delta_m'] == pytest.approx({'mean': -5.0, 'std': 0.0})
  assert group['delta_mtl_libmtl'] == pytest.approx({'mean': 5.0, 'std': 0.0})


def test_markdown_and_json(runs, tmp_path):
  table = compare.compare(runs['dwa'] + runs['equal'], runs['stl'], last=LAST,
                          labels=['MTAN DWA', 'MTAN equal'])
  text = compare.to_markdown(table)
  lines = text.splitlines()
  assert 'Nash-MTL' in lines[0] and 'LibMTL' in lines[0] and f'last {LAST}' in lines[0]
  rows = {line.split(' | ')[0].lstrip('| '): line for line in lines if line.startswith('| ')}
  assert set(rows) == {'run', 'stl_semantic (baseline)', 'stl_depth (baseline)', 'MTAN DWA', 'MTAN equal'}
  assert 'semantic miou ↑' in rows['run'] and 'depth abs_err ↓' in rows['run']
  assert 'loss' not in rows['run']
  dwa = table['groups'][2]
  miou = dwa['val']['semantic']['miou']
  assert f'{miou["mean"]:#.4g} ± {miou["std"]:#.4g}' in rows['MTAN DWA']
  assert f'{dwa["delta_m"]["mean"]:+.2f} ± {dwa["delta_m"]["std"]:.2f}' in rows['MTAN DWA']
  assert f'{dwa["params"]:,}' in rows['MTAN DWA'] and ' 0, 1 ' in rows['MTAN DWA']
  assert '±' not in rows['MTAN equal']  # one seed: no spread to show
  assert 'no baseline for normal' in text

  md_path, json_path = compare.write_report(table, str(tmp_path / 'out'))
  assert open(md_path, encoding='utf-8').read() == text
  assert json.load(open(json_path, encoding='utf-8')) == table


def _one_line_error(exc_info, *needles):
  message = str(exc_info.value)
  assert '\n' not in message
  for needle in needles:
    assert needle in message


def test_errors_are_one_line_and_name_the_workdir(runs, tmp_path):
  with pytest.raises(DataError, match='no runs'):
    compare.compare([])
  missing = str(tmp_path / 'missing')
  with pytest.raises(DataError) as exc:
    compare.compare([missing])
  _one_line_error(exc, missing)
  not_a_run = tmp_path / 'not_a_run'
  not_a_run.mkdir()
  with pytest.raises(DataError) as exc:
    compare.compare([str(not_a_run)])
  _one_line_error(exc, str(not_a_run))

  empty = str(tmp_path / 'empty')
  _write_run(empty, tiny_config(), lambda e: {})
  with pytest.raises(DataError) as exc:
    compare.read_run(empty)
  _one_line_error(exc, empty, 'no evaluated epoch')

  edges = str(tmp_path / 'stl_edges')
  _write_run(edges, tiny_config(model='segnet', tasks=('edges',)), lambda e: {'edges': {'f1': 0.5}})
  with pytest.raises(DataError) as exc:
    compare.compare(runs['dwa'], [edges])
  _one_line_error(exc, edges, 'none of which')

  # A baseline metric the runs do not report.
  extra = str(tmp_path / 'stl_extra')
  _write_run(extra, tiny_config(model='segnet', tasks=('semantic',), num_classes=2),
             lambda e: {'semantic': {'miou': 0.5, 'fg_f1': 0.6}})
  with pytest.raises(DataError) as exc:
    compare.compare(runs['dwa'], [extra])
  _one_line_error(exc, runs['dwa'][0], 'semantic/fg_f1')

  with pytest.raises(DataError, match='twice'):
    compare.compare(runs['dwa'] + runs['dwa'][:1])
  with pytest.raises(ConfigError, match='1 labels for 2 run groups'):
    compare.compare(runs['dwa'] + runs['equal'], labels=['only one'])


def _script(*args, cwd=REPO):
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'}
  return subprocess.run([sys.executable, 'scripts/report.py', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_script_writes_the_report(runs, tmp_path):
  out = tmp_path / 'report'
  result = _script(*runs['dwa'], '--baseline', ','.join(runs['stl']), '--output', str(out),
                   '--last', str(LAST))
  assert result.returncode == 0, result.stderr
  assert (out / 'report.md').read_text(encoding='utf-8') == result.stdout
  table = json.loads((out / 'report.json').read_text(encoding='utf-8'))
  assert [g['label'] for g in table['groups']] == ['stl_semantic', 'stl_depth', 'mtan']
  assert table['groups'][-1]['seeds'] == [0, 1]

  missing = str(tmp_path / 'missing')
  result = _script(missing, '--output', str(out))
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and missing in lines[0], result.stderr
