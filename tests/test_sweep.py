"""Tests for `mtan_jax.sweep`: the grid's runs, skipping finished runs, and the results table.

Training is replaced by a fake that writes what `train_and_evaluate` writes for the report
(config.json, history.json, final_metrics.json) with known metrics, so the Delta_MTL in the
table can be checked against the formula by hand. The real training of every architecture
and method is tested in tests/test_weighting_methods.py and tests/test_train.py.
"""

import json
import os

import numpy as np
import pytest

from conftest import tiny_config
from mtan_jax import sweep
from mtan_jax.errors import ConfigError

# Validation metrics each fake run reports: single-task baselines, then per grid cell.
STL = {'semantic': {'miou': 0.50, 'pix_acc': 0.80}, 'depth': {'abs_err': 0.020, 'rel_err': 0.10}}
GRID = {'mtan_equal': {'semantic': {'miou': 0.55, 'pix_acc': 0.80}, 'depth': {'abs_err': 0.018, 'rel_err': 0.10}},
        'mtan_pcgrad': {'semantic': {'miou': 0.52, 'pix_acc': 0.80}, 'depth': {'abs_err': 0.019, 'rel_err': 0.10}},
        'segnet_equal': {'semantic': {'miou': 0.48, 'pix_acc': 0.80}, 'depth': {'abs_err': 0.021, 'rel_err': 0.10}},
        'segnet_pcgrad': {'semantic': {'miou': 0.45, 'pix_acc': 0.80}, 'depth': {'abs_err': 0.022, 'rel_err': 0.10}}}


def _fake_train(calls):
  def train(config, workdir):
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    name = os.path.basename(os.path.dirname(workdir))
    val = {t: STL[t] for t in config.tasks} if name.startswith('stl_') else GRID[name]
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f)
    with open(os.path.join(workdir, 'history.json'), 'w') as f:
      json.dump([{'epoch': 1, 'step': 4, 'val': val}], f)
    with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
      json.dump(val, f)
  return train


def test_plan_names_every_run():
  config = tiny_config(tasks=('semantic', 'depth'))
  runs = sweep.plan(config, '/r', ['mtan', 'segnet'], ['equal', 'pcgrad'], [0, 1])
  assert [r.name for r in runs if r.baseline] == ['stl_semantic'] * 2 + ['stl_depth'] * 2
  assert len([r for r in runs if not r.baseline]) == 8
  stl = runs[0]
  assert (stl.config.model, tuple(stl.config.tasks), stl.config.weighting) == ('segnet', ('semantic',), 'equal')
  run = [r for r in runs if r.name == 'segnet_pcgrad' and r.seed == 1][0]
  assert run.workdir == '/r/segnet_pcgrad/seed1'
  assert (run.config.model, run.config.weighting, run.config.seed) == ('segnet', 'pcgrad', 1)
  assert config.model == 'mtan'  # the base config is not modified


@pytest.mark.parametrize('archs, methods, seeds, match', [
    (['mtan'], ['pcgradd'], [0], "unknown config.weighting='pcgradd'"),
    (['resnet'], ['equal'], [0], "unknown architecture 'resnet'"),
    (['mtan'], [], [0], 'at least one'),
])
def test_plan_rejects_unknown_names(archs, methods, seeds, match):
  with pytest.raises(ConfigError, match=match):
    sweep.plan(tiny_config(), '/r', archs, methods, seeds)


def test_sweep_trains_missing_runs_and_tables_delta_mtl(tmp_path):
  config = tiny_config(tasks=('semantic', 'depth'))
  calls = []
  args = (config, str(tmp_path), ['mtan', 'segnet'], ['equal', 'pcgrad'], [0])
  table = sweep.run_sweep(*args, train_fn=_fake_train(calls), log=lambda _: None)
  assert len(calls) == 2 + 4  # two baselines and the four grid runs
  assert os.path.exists(tmp_path / 'report.md') and os.path.exists(tmp_path / 'report.json')
  # Re-running finds everything finished and trains nothing.
  again = sweep.run_sweep(*args, train_fn=_fake_train(calls), log=lambda _: None)
  assert len(calls) == 6 and again == table
  rows = {row['label']: row for row in table['groups']}
  assert list(rows)[2:] == ['mtan_equal', 'mtan_pcgrad', 'segnet_equal', 'segnet_pcgrad']
  pcgrad = rows['segnet_pcgrad']
  # Nash-MTL Delta_m: mean over the 4 metrics of (-1)^higher (M - M_stl) / M_stl, in percent.
  expected_m = 100 / 4 * (-(0.45 - 0.50) / 0.50 - 0 + (0.022 - 0.020) / 0.020 + 0)
  # LibMTL Delta_MTL: mean over tasks of the mean over metrics of (-1)^lower (M - B) / B.
  expected_libmtl = 100 / 2 * (((0.45 - 0.50) / 0.50 + 0) / 2 + (-(0.022 - 0.020) / 0.020 + 0) / 2)
  np.testing.assert_allclose(pcgrad['delta_m']['mean'], expected_m, rtol=1e-6)
  np.testing.assert_allclose(pcgrad['delta_mtl_libmtl']['mean'], expected_libmtl, rtol=1e-6)
  assert rows['mtan_equal']['delta_m']['mean'] < 0 < pcgrad['delta_m']['mean']
