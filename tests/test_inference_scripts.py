"""The result scripts on the session's trained run: evaluate, predict, plot, report, export,
and the evaluation grids and curves training writes."""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, tiny_config
from mtan_jax import visualize
from mtan_jax.data.synthetic import render_scene
from mtan_jax.errors import ConfigError, DataError
from mtan_jax.evaluation import evaluate_run
from mtan_jax.predict import predict_files
from mtan_jax.restore import load_run

TASKS = ('semantic', 'depth', 'normal')
SIZE = (32, 64)  # tiny_config's image size
VIS = 2


def _script(name, *args, timeout=300, devices=None):
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'PYTHONPATH': REPO}
  if devices:
    env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return subprocess.run([sys.executable, os.path.join(REPO, 'scripts', name), *map(str, args)],
                        capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _one_error_line(result):
  assert result.returncode == 2, result.stderr
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
  return lines[0]


def _nontrivial(path, min_colors=8):
  """A PNG with real content: many distinct colours, not one flat fill."""
  pixels = np.asarray(Image.open(path).convert('RGB'))
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= min_colors, path
  return pixels


@pytest.fixture
def run_dir(trained_run):
  """The tiny MTAN run of conftest (uncertainty weighting, so log-sigma curves exist; grids,
  TensorBoard); read-only."""
  return trained_run.workdir


@pytest.fixture(scope='module')
def images_dir(tmp_path_factory):
  """Synthetic scenes as the files users have: PNGs of another size, a JPEG and an npy."""
  folder = tmp_path_factory.mktemp('images')
  for i in range(3):
    scene = render_scene(20_000_000 + i, 48, 96, seed=0)
    Image.fromarray((scene['image'] * 255).round().astype(np.uint8)).save(folder / f'scene{i}.png')
  scene = render_scene(20_000_010, 40, 72, seed=0)
  Image.fromarray((scene['image'] * 255).round().astype(np.uint8)).save(folder / 'photo.jpg')
  np.save(folder / 'array.npy', render_scene(20_000_011, 32, 64, seed=0)['image'])
  (folder / 'notes.txt').write_text('not an image')
  return folder


def test_training_writes_grids_curves_and_history(run_dir):
  grids = sorted(glob.glob(os.path.join(run_dir, 'images', 'step_*.png')))
  assert [os.path.basename(g) for g in grids] == ['step_00000004.png', 'step_00000008.png']
  # VIS rows; columns: input, then target and prediction of each of the 3 tasks; 2-px gaps.
  pixels = _nontrivial(grids[-1], min_colors=50)
  assert pixels.shape == (VIS * (SIZE[0] + 2) + 2, 7 * (SIZE[1] + 2) + 2, 3)
  history = json.load(open(os.path.join(run_dir, 'history.json')))
  assert [r['epoch'] for r in history] == [1, 2] and [r['step'] for r in history] == [4, 8]
  # TensorBoard has the grids and every loss, metric and weighting curve.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(os.path.join(run_dir, 'tb'), size_guidance={'images': 0, 'tensors': 0})
  events.Reload()
  tags = set(events.Tags()['tensors'])
  for tag in ('val/predictions', 'train/loss', 'train/semantic_loss', 'val/semantic/miou',
              'val/normal/median', 'train_epoch/weights/depth', 'train_epoch/logsigma/normal'):
    assert tag in tags, (tag, sorted(tags))
  assert len(events.Tensors('val/predictions')) == 2


def test_evaluate_reproduces_the_training_evaluation(run_dir, tmp_path):
  history = json.load(open(os.path.join(run_dir, 'history.json')))
  result = evaluate_run(run_dir)
  assert result['step'] == 8 and result['num_examples'] == 6
  for task in TASKS:
    for name, value in history[-1]['val'][task].items():
      assert result['metrics'][task][name] == pytest.approx(value, rel=1e-6, abs=1e-7), (task, name)
  # An earlier checkpoint and the training split.
  assert evaluate_run(run_dir, step=4)['metrics']['semantic']['miou'] == pytest.approx(
      history[0]['val']['semantic']['miou'], rel=1e-6)
  assert evaluate_run(run_dir, split='train')['num_examples'] == 16
  # The script, sharded over 2 (fake CPU) devices: a table and a JSON file, the same numbers.
  out = tmp_path / 'eval.json'
  result = _script('evaluate.py', f'--workdir={run_dir}', f'--output={out}', devices=2)
  assert result.returncode == 0, result.stderr
  assert 'miou' in result.stdout and 'abs_err' in result.stdout
  sharded = json.loads(out.read_text())['metrics']
  for task in TASKS:
    for name, value in history[-1]['val'][task].items():
      assert sharded[task][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, name)
  # A batch the devices cannot split is one line.
  assert 'not a positive multiple of the 2 devices' in _one_error_line(
      _script('evaluate.py', f'--workdir={run_dir}', '--batch_size=3', devices=2))


def test_predict_writes_every_picture(run_dir, images_dir, tmp_path):
  out = tmp_path / 'pred'
  result = _script('predict.py', f'--workdir={run_dir}', f'--input={images_dir}', f'--output={out}',
                   '--batch_size=2')
  assert result.returncode == 0, result.stderr
  stems = ('scene0', 'scene1', 'scene2', 'photo', 'array')
  colors = {tuple(c) for c in visualize.CITYSCAPES_7}
  for stem in stems:
    # Resized to the training resolution.
    semantic = np.asarray(Image.open(out / f'{stem}_semantic.png'))
    assert semantic.shape == SIZE + (3,)
    assert {tuple(c) for c in np.unique(semantic.reshape(-1, 3), axis=0)} <= colors
    overlay = _nontrivial(out / f'{stem}_overlay.png', min_colors=20)
    assert overlay.shape == SIZE + (3,)
    assert _nontrivial(out / f'{stem}_normal.png').shape == SIZE + (3,)
    depth = _nontrivial(out / f'{stem}_depth.png', min_colors=30)  # with its colour bar
    assert depth.shape[1] > depth.shape[0] > 100
    for task in TASKS:
      attention = _nontrivial(out / f'{stem}_attention_enc0_{task}.png', min_colors=3)
      assert attention.shape == SIZE + (3,)
    figure = _nontrivial(out / f'{stem}_figure.png', min_colors=100)
    assert figure.shape[0] > 200 and figure.shape[1] > 400
    raw = np.load(out / f'{stem}.npz')
    assert raw['semantic'].shape == SIZE and raw['depth'].shape == SIZE
    assert raw['normal'].shape == SIZE + (3,)
    np.testing.assert_array_equal(visualize.colorize_labels(raw['semantic'], visualize.palette('synthetic', 7)),
                                  semantic)


def test_predict_pad_mode_keeps_the_native_size_and_decoder_attention(run_dir, images_dir, tmp_path):
  written = predict_files(run_dir, str(images_dir / 'photo.jpg'), str(tmp_path), mode='pad',
                          attention_layer='dec1', progress=False)
  assert str(tmp_path / 'photo_attention_dec1_depth.png') in written
  # 40x72 is padded to 64x96 for the network and cropped back.
  assert np.asarray(Image.open(tmp_path / 'photo_semantic.png')).shape == (40, 72, 3)
  assert np.asarray(Image.open(tmp_path / 'photo_attention_dec1_depth.png')).shape == (40, 72, 3)


def test_predict_matches_the_model_on_training_sized_input(run_dir, tmp_path):
  """No resize at the training size: the .npz holds exactly what the model predicts."""
  image = render_scene(20_000_020, *SIZE, seed=0)['image'].astype(np.float32)
  np.save(tmp_path / 'x.npy', image)
  predict_files(run_dir, str(tmp_path / 'x.npy'), str(tmp_path / 'out'), progress=False)
  run = load_run(run_dir)
  preds = run.steps.predict(run.params, run.batch_stats, image[None])
  raw = np.load(tmp_path / 'out' / 'x.npz')
  np.testing.assert_array_equal(raw['semantic'], np.argmax(np.asarray(preds[0][0]), -1))
  np.testing.assert_allclose(raw['depth'], np.asarray(preds[1][0, ..., 0]), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_one_line(run_dir, tmp_path):
  corrupt = tmp_path / 'corrupt.png'
  corrupt.write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
  gray = tmp_path / 'gray.png'
  Image.fromarray(np.zeros((32, 64), np.uint8)).save(gray)
  wrong = tmp_path / 'wrong.npy'
  np.save(wrong, np.zeros((32, 64, 4), np.float32))
  out = str(tmp_path / 'out')
  cases = [(str(corrupt), 'cannot read image .*corrupt.png'),
           (str(gray), 'gray.png is a 1-channel .* expects 3 channels'),
           (str(wrong), r'wrong.npy: array of shape \(32, 64, 4\); expected \(H, W, 3\)'),
           (str(tmp_path / 'missing.png'), 'missing.png does not exist')]
  for path, message in cases:
    with pytest.raises(DataError, match=message):
      predict_files(run_dir, path, out, progress=False)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(DataError, match='holds no images'):
    predict_files(run_dir, str(empty), out)
  with pytest.raises(ConfigError, match='attention_layer'):
    predict_files(run_dir, str(gray), out, attention_layer='enc9')
  # A workdir without checkpoints, an unknown step, a checkpoint of another config.
  bare = tmp_path / 'bare'
  bare.mkdir()
  shutil.copy(os.path.join(run_dir, 'config.json'), bare / 'config.json')
  with pytest.raises(DataError, match='has no checkpoints'):
    evaluate_run(str(bare))
  with pytest.raises(DataError, match='no checkpoint at step 5; it has steps 4, 6, 8'):
    evaluate_run(run_dir, step=5)
  other = tmp_path / 'other'
  shutil.copytree(run_dir, other)
  config = json.loads((other / 'config.json').read_text())
  config['widths'] = [4, 8, 8, 16, 16]
  (other / 'config.json').write_text(json.dumps(config))
  with pytest.raises(DataError, match='does not match this model/config'):
    evaluate_run(str(other))
  with pytest.raises(DataError, match='config.json does not exist'):
    evaluate_run(str(tmp_path))
  # The scripts print these as one line.
  assert 'has no checkpoints' in _one_error_line(_script('evaluate.py', f'--workdir={bare}'))
  assert 'cannot read image' in _one_error_line(
      _script('predict.py', f'--workdir={run_dir}', f'--input={corrupt}', f'--output={out}'))


def test_plot_script_draws_the_run_curves(run_dir, tmp_path):
  result = _script('plot.py', run_dir, run_dir, '--labels=a,b', f'--output={tmp_path}')
  assert result.returncode == 0, result.stderr
  for name in ('train.png', 'val_semantic.png', 'train_epoch_weights.png', 'train_epoch_logsigma.png'):
    pixels = _nontrivial(tmp_path / name, min_colors=3)
    assert pixels.shape[1] >= 400


def _write_seed(run_dir, workdir, seed, scale):
  """Another seed of the trained run as the results tools read it: its config with another
  seed and a history whose metrics are the trained run's times `scale`."""
  os.makedirs(workdir)
  config = json.load(open(os.path.join(run_dir, 'config.json'), encoding='utf-8'))
  json.dump({**config, 'seed': seed}, open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8'))
  history = json.load(open(os.path.join(run_dir, 'history.json'), encoding='utf-8'))
  for record in history:
    record['val'] = {t: {m: v * scale for m, v in values.items()} for t, values in record['val'].items()}
  json.dump(history, open(os.path.join(workdir, 'history.json'), 'w', encoding='utf-8'))
  shutil.copy(os.path.join(run_dir, 'metrics.jsonl'), os.path.join(workdir, 'metrics.jsonl'))


def test_report_script_compares_seeds_against_single_task_runs(run_dir, tmp_path):
  # A second seed and a single-task baseline, written as training leaves them (the table's
  # arithmetic on made-up runs is tests/test_compare.py's subject; here the script reads a
  # real run).
  seed1, stl = str(tmp_path / 'mtan_seed1'), str(tmp_path / 'stl_semantic')
  _write_seed(run_dir, seed1, 1, 0.9)
  os.makedirs(stl)
  open(os.path.join(stl, 'config.json'), 'w', encoding='utf-8').write(
      tiny_config(model='segnet', tasks=('semantic',), weighting='equal').to_json())
  json.dump([{'epoch': e, 'step': 4 * e, 'train': {'semantic': {'loss': 1.0}},
              'val': {'semantic': {'loss': 1.0, 'miou': 0.3 + 0.1 * e, 'pix_acc': 0.5 + 0.1 * e}}}
             for e in (1, 2)], open(os.path.join(stl, 'history.json'), 'w', encoding='utf-8'))
  out = tmp_path / 'report'
  result = _script('report.py', run_dir, seed1, f'--baseline={stl}', f'--output={out}', '--last=2')
  assert result.returncode == 0, result.stderr
  table = json.loads((out / 'report.json').read_text())
  mtan = next(g for g in table['groups'] if not g['baseline'])
  assert mtan['label'] == 'mtan' and sorted(mtan['seeds']) == [0, 1]
  miou = [json.load(open(os.path.join(d, 'history.json')))[-1]['val']['semantic']['miou'] for d in (run_dir, seed1)]
  first = [json.load(open(os.path.join(d, 'history.json')))[0]['val']['semantic']['miou'] for d in (run_dir, seed1)]
  expected = np.mean([(a + b) / 2 for a, b in zip(miou, first)])
  assert mtan['val']['semantic']['miou']['mean'] == pytest.approx(expected)
  assert np.isfinite(mtan['delta_m']['mean']) and np.isfinite(mtan['delta_mtl_libmtl']['mean'])
  assert mtan['params'] > 0 and '±' in (out / 'report.md').read_text()


def test_export_script_round_trips_the_trained_model(run_dir, tmp_path):
  from mtan_jax.export import load_exported
  out = tmp_path / 'exported'
  result = _script('export.py', f'--workdir={run_dir}', f'--output={out}', '--tf_saved_model')
  assert result.returncode == 0, result.stderr
  call, metadata = load_exported(str(out))
  assert metadata['tasks'] == list(TASKS) and metadata['step'] == 8
  assert metadata['class_names'][0] == 'flat' and len(metadata['palette']) == 7
  run = load_run(run_dir)
  images = np.stack([render_scene(20_000_030 + i, *SIZE, seed=0)['image'] for i in range(3)]).astype(np.float32)
  expected = run.steps.predict(run.params, run.batch_stats, images)
  outputs = call(images)
  for task, want in zip(TASKS, expected):
    np.testing.assert_allclose(outputs[task], np.asarray(want), rtol=1e-5, atol=1e-5)
  import tensorflow as tf
  served = tf.saved_model.load(str(out / 'saved_model')).signatures['serving_default'](
      images=tf.constant(images[:2]))
  np.testing.assert_allclose(served['depth'].numpy(), np.asarray(expected[1][:2]), rtol=1e-4, atol=1e-4)
  # The standalone loader runs it without this package on the path.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  np.save(tmp_path / 'x.npy', images[0])
  loader = subprocess.run([sys.executable, os.path.join(REPO, 'examples', 'run_exported.py'), str(out),
                           str(tmp_path / 'x.npy')], capture_output=True, text=True, timeout=300,
                          env=env, cwd=str(tmp_path))
  assert loader.returncode == 0, loader.stderr
  assert all(task in loader.stdout for task in TASKS)
  # A directory that is not a run is one line.
  assert 'config.json does not exist' in _one_error_line(
      _script('export.py', f'--workdir={tmp_path}', f'--output={out}2'))
