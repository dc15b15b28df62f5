"""The final report: last-N-epoch averages, Delta_MTL and single-task baselines."""

import json

import pytest

from mtan_jax import metrics
from mtan_jax.errors import ConfigError
from mtan_jax.report import format_table, load_baselines, summarize


def _history(n):
  return [{'epoch': e, 'val': {'semantic': {'miou': 0.1 * e, 'pix_acc': 0.5},
                               'depth': {'abs_err': 0.02, 'rel_err': 0.3}}} for e in range(1, n + 1)]


def test_summarize_averages_the_last_epochs():
  summary = summarize(_history(12), last=10)
  assert summary['epochs'] == list(range(3, 13))
  assert summary['val']['semantic']['miou'] == pytest.approx(0.1 * sum(range(3, 13)) / 10)
  assert summary['val']['depth']['abs_err'] == pytest.approx(0.02)
  assert summarize(_history(2), last=10)['epochs'] == [1, 2]
  assert summarize([], last=10) == {'epochs': [], 'val': {}}


def test_delta_mtl_in_both_conventions():
  baselines = {'semantic': {'miou': 1.0, 'pix_acc': 0.5}, 'depth': {'abs_err': 0.02}}
  summary = summarize(_history(1), last=1, baselines=baselines)
  val = summary['val']
  assert summary['delta_m'] == pytest.approx(metrics.delta_m(val, baselines))
  assert summary['delta_mtl_libmtl'] == pytest.approx(metrics.delta_mtl_libmtl(val, baselines))
  # miou 0.1 vs 1.0 is a 90% drop, pix_acc and abs_err are unchanged: Delta_m = 90 / 3.
  assert summary['delta_m'] == pytest.approx(30.0)
  table = format_table(summary)
  assert 'Delta_m' in table and 'LibMTL' in table and 'single-task' in table


def test_load_baselines_from_json_and_files(tmp_path):
  assert load_baselines('') == {}
  assert load_baselines('{"depth": {"abs_err": 0.0125}}') == {'depth': {'abs_err': 0.0125}}
  seg, dep = tmp_path / 'seg.json', tmp_path / 'dep.json'
  seg.write_text(json.dumps({'val': {'semantic': {'miou': 0.74}}}))
  dep.write_text(json.dumps({'val': {'depth': {'abs_err': 0.0125}}}))
  assert load_baselines(f'{seg},{dep}') == {'semantic': {'miou': 0.74}, 'depth': {'abs_err': 0.0125}}
  # final_metrics.json of a real run also holds the validation losses; they are not metrics
  # of Delta_MTL (and used to make the end-of-run report raise a KeyError).
  full = tmp_path / 'full.json'
  full.write_text(json.dumps({'val': {'semantic': {'miou': 0.5, 'pix_acc': 0.8, 'loss': 1.2}}}))
  baselines = load_baselines(str(full))
  assert baselines == {'semantic': {'miou': 0.5, 'pix_acc': 0.8}}
  assert summarize(_history(3), last=2, baselines=baselines)['delta_m'] == pytest.approx(
      metrics.delta_m({'semantic': {'miou': 0.25, 'pix_acc': 0.5}}, baselines))
  with pytest.raises(ConfigError, match='missing.json'):
    load_baselines(str(tmp_path / 'missing.json'))
  with pytest.raises(ConfigError, match='not valid JSON'):
    load_baselines('{nope')
  with pytest.raises(ConfigError, match='expected'):
    load_baselines('{"depth": 3}')
