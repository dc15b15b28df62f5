"""Training curves to PNG: `mtan_jax.plotting` and `scripts/plot.py`, on hand-written logs.

Two fake runs: `mtan` (DWA; killed and resumed, so some steps are logged twice) and `uw`
(uncertainty weighting, the only one with `train_epoch/logsigma/*`). The PNGs are checked
with PIL: size, that something was drawn, and which run colours appear where.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from mtan_jax import plotting
from mtan_jax.errors import ConfigError, DataError

SCRIPT = os.path.join(REPO, 'scripts', 'plot.py')
TASKS = ('semantic', 'depth')
STEPS_PER_EPOCH = 20
EPOCHS = 4
ALL_FILES = {'train.png', 'val_semantic.png', 'val_depth.png', 'train_epoch_semantic.png',
             'train_epoch_depth.png', 'train_epoch_weights.png', 'train_epoch_logsigma.png'}


def _records(scale, logsigma, steps=range(0, EPOCHS * STEPS_PER_EPOCH + 1, 4)):
  """metrics.jsonl records as scripts/train.py writes them: train scalars every few steps,
  val and train_epoch scalars once per epoch."""
  for step in steps:
    yield {'step': step, 'train/loss': scale * 3 / (1 + step), 'train/semantic_loss': scale * 2 / (1 + step),
           'train/depth_loss': scale / (1 + step), 'train/lr': 1e-4 * 0.97**step,
           'train/images_per_sec': 100 + step % 7}
    if step and step % STEPS_PER_EPOCH == 0:
      epoch = step // STEPS_PER_EPOCH
      yield {'step': step, 'val/semantic/miou': scale * 0.1 * epoch, 'val/semantic/pix_acc': 0.5 + 0.05 * epoch,
             'val/depth/abs_err': scale / epoch, 'val/depth/rel_err': 0.5 / epoch}
      epoch_record = {'step': step}
      for i, task in enumerate(TASKS):
        epoch_record[f'train_epoch/{task}/loss'] = scale / epoch + i
        epoch_record[f'train_epoch/weights/{task}'] = 1.0 + (-1)**i * 0.1 * epoch
        if logsigma:
          epoch_record[f'train_epoch/logsigma/{task}'] = -0.1 * epoch * (i + 1)
      yield epoch_record


def _write(workdir, records):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')


@pytest.fixture(scope='module')
def run_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  mtan, uw = str(root / 'mtan'), str(root / 'uw')
  # Killed after step 48 and resumed from the step-40 checkpoint: steps 40..48 appear twice,
  # the second time with other values (the later line wins).
  first = [r for r in _records(1.3, False) if r['step'] <= 48]
  _write(mtan, first + list(_records(1.0, False, steps=range(40, EPOCHS * STEPS_PER_EPOCH + 1, 4))))
  _write(uw, _records(2.0, True))
  return mtan, uw


@pytest.fixture(scope='module')
def plotted(run_dirs, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('plots'))
  return plotting.plot_runs(run_dirs, out), out


def _pixels(path):
  with Image.open(path) as image:
    return np.asarray(image.convert('RGB')).astype(int)


def _count_near(pixels, color, tolerance=40):
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  rgb = np.round(np.array(colors.to_rgb(color)) * 255)
  return int((np.abs(pixels - rgb).sum(-1) < tolerance).sum())


def _run_colors():
  import matplotlib as mpl  # pylint: disable=g-import-not-at-top
  return mpl.rcParams['axes.prop_cycle'].by_key()['color'][:2]


def test_one_png_per_group_with_drawn_content(plotted):
  paths, out = plotted
  assert {os.path.basename(p) for p in paths} == ALL_FILES
  assert set(os.listdir(out)) == ALL_FILES
  for path in paths:
    pixels = _pixels(path)
    height, width, _ = pixels.shape
    assert width >= 400 and height >= 250, (path, pixels.shape)
    assert (pixels.min(-1) < 250).sum() > 1000, path
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= 3, path
  # train has 5 scalars: a 3-column grid of 2 rows of 4x3-inch subplots at 100 dpi.
  with Image.open(os.path.join(out, 'train.png')) as image:
    assert image.size == (1200, 600)


def test_each_run_keeps_its_colour_in_every_figure(plotted):
  _, out = plotted
  first, second = _run_colors()
  both = _pixels(os.path.join(out, 'val_semantic.png'))
  assert _count_near(both, first) > 50 and _count_near(both, second) > 50
  # Only the second run has logsigma: it is drawn in its own colour, not the first colour.
  only_second = _pixels(os.path.join(out, 'train_epoch_logsigma.png'))
  assert _count_near(only_second, second) > 50
  assert _count_near(only_second, first) == 0


def test_include_filters_scalars_and_groups(run_dirs, tmp_path):
  paths = plotting.plot_runs(run_dirs, str(tmp_path), include=['val/*', 'train/loss'])
  assert [os.path.basename(p) for p in paths] == ['train.png', 'val_semantic.png', 'val_depth.png']
  # One subplot (train/loss alone) instead of the 3x2 grid.
  with Image.open(paths[0]) as image:
    assert image.size == (400, 300)


def test_labels_default_to_unique_workdir_names():
  assert plotting.run_labels(['runs/mtan', 'runs/uw']) == ['mtan', 'uw']
  assert plotting.run_labels(['a/x/seed0', 'b/x/seed0', 'c/seed1']) == ['a/x/seed0', 'b/x/seed0', 'seed1']
  assert plotting.run_labels(['/r/run', '/r/run']) == ['r/run #1', 'r/run #2']


def test_errors_name_the_workdir_or_pattern(run_dirs, tmp_path):
  with pytest.raises(ConfigError, match='no workdirs'):
    plotting.plot_runs([], str(tmp_path))
  missing = str(tmp_path / 'never_trained')
  with pytest.raises(DataError, match='never_trained'):
    plotting.plot_runs([run_dirs[0], missing], str(tmp_path))
  with pytest.raises(ConfigError, match=r'vall/\*.*available groups: train, val/semantic') as info:
    plotting.plot_runs(run_dirs, str(tmp_path), include=['train/loss', 'vall/*'])
  assert '\n' not in str(info.value)
  with pytest.raises(ConfigError, match='1 labels'):
    plotting.plot_runs(run_dirs, str(tmp_path), labels=['only_one'])
  assert not list(tmp_path.glob('*.png'))


def _script(*args):
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'PYTHONPATH': REPO}
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120, check=False)


def test_script_writes_the_pngs_and_prints_their_paths(run_dirs, tmp_path):
  out = tmp_path / 'plots'
  proc = _script(*run_dirs, '--output', str(out), '--labels', 'mtan,uw', '--include',
                 'val/*,train_epoch/weights/*')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == ['train_epoch_weights.png', 'val_depth.png', 'val_semantic.png']
  assert sorted(proc.stdout.split()) == sorted(str(p) for p in out.iterdir())


def test_script_reports_a_missing_workdir_as_one_line(run_dirs, tmp_path):
  missing = str(tmp_path / 'no_such_run')
  proc = _script(run_dirs[0], missing, '--output', str(tmp_path / 'plots'))
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'no_such_run' in lines[0], proc.stderr
