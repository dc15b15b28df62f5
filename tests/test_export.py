"""Tests of mtan_jax.export: the serialized model reproduces the model, in JAX and in TF."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from mtan_jax import export
from mtan_jax.errors import ConfigError, DataError
from mtan_jax.steps import create_model
from mtan_jax.tasks import make_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (4, 8, 8, 8, 8)
SIZE = (32, 64)
# (model, tasks, num_classes); MTAN stacked: the attention path a GPU-trained model exports,
# whose (B*T) reshapes must stay batch-polymorphic.
MODELS = {
    'mtan': ('mtan', ('semantic', 'depth', 'normal'), 7),
    'segnet': ('segnet', ('semantic', 'species', 'bbox'), 2),
}


def _model(key):
  name, task_names, num_classes = MODELS[key]
  model = create_model(name, make_tasks(task_names, num_classes, SIZE), WIDTHS, seed=0,
                       task_stacking='stacked', image_size=SIZE)
  # Non-trivial running statistics, so that evaluation mode is distinguishable from init.
  rng = np.random.default_rng(1)

  def randomise(path, x):
    if "'var'" in jax.tree_util.keystr(path):
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    return rng.normal(0.0, 0.3, x.shape).astype(np.float32)

  nnx.update(model, jax.tree_util.tree_map_with_path(randomise, nnx.state(model, nnx.BatchStat)))
  return model


def _images(batch, seed=0):
  return np.random.default_rng(seed).uniform(size=(batch,) + SIZE + (3,)).astype(np.float32)


@nnx.jit
def _eval_forward(view, images):
  return view(images)


def _reference(model, images):
  """The model's own evaluation-mode outputs (jitted: eager MTAN takes ~10 s per call)."""
  preds = _eval_forward(nnx.view(model, use_running_average=True), images)
  return {task.name: np.asarray(p) for task, p in zip(model.tasks, preds)}


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """{key: (model, export dir)}; the SegNet export also has a SavedModel."""
  out = {}
  for key, (name, task_names, num_classes) in MODELS.items():
    model = _model(key)
    directory = str(tmp_path_factory.mktemp(key))
    paths = export.export_model(
        model, directory, image_size=SIZE, in_channels=3,
        metadata={'model': name, 'tasks': list(task_names), 'num_classes': num_classes},
        tf_saved_model=key == 'segnet')
    assert set(paths) == {'jax_export', 'variables', 'metadata'} | (
        {'saved_model'} if key == 'segnet' else set())
    out[key] = (model, directory)
  return out


@pytest.mark.parametrize('key', list(MODELS))
def test_exported_outputs_equal_the_model_at_any_batch_size(exported, key):
  model, directory = exported[key]
  call, metadata = export.load_exported(directory)
  assert metadata['tasks'] == list(MODELS[key][1])
  assert [o['name'] for o in metadata['outputs']] == list(MODELS[key][1])
  assert metadata['platforms'] == ['cpu', 'cuda']
  for batch in (1, 3):
    images = _images(batch)
    out, ref = call(images), _reference(model, images)
    assert list(out) == list(ref)
    for name in ref:
      assert out[name].shape == ref[name].shape
      np.testing.assert_allclose(out[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize('key', list(MODELS))
def test_serialized_shapes_are_symbolic_in_batch_and_variables_are_complete(exported, key):
  model, directory = exported[key]
  with open(os.path.join(directory, export.EXPORT_FILE), 'rb') as f:
    exp = jax.export.deserialize(bytearray(f.read()))
  image = exp.in_avals[-1]
  assert jax.export.is_symbolic_dim(image.shape[0]) and tuple(image.shape[1:]) == SIZE + (3,)
  for aval in exp.out_avals:
    assert jax.export.is_symbolic_dim(aval.shape[0])
  assert sorted(exp.platforms) == ['cpu', 'cuda']
  num_leaves = len(jax.tree.leaves(nnx.state(model, nnx.Param))) + len(
      jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  with np.load(os.path.join(directory, export.VARIABLES_FILE)) as npz:
    assert len(npz.files) == num_leaves == len(exp.in_avals) - 1
    assert all(npz[k].dtype == np.float32 for k in npz.files)
    assert any(k.startswith('params/encoder_block/0/') for k in npz.files)
    assert any(k.startswith('batch_stats/') for k in npz.files)
  _, metadata = export.load_exported(directory)
  assert metadata['input']['shape'] == ['b', *SIZE, 3]
  shapes = {o['name']: o['shape'] for o in metadata['outputs']}
  assert shapes['semantic'] == ['b', *SIZE, MODELS[key][2]]
  if key == 'segnet':
    assert shapes['species'] == ['b', 2] and shapes['bbox'] == ['b', 4]


def test_saved_model_matches(exported):
  from mtan_jax.data.pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top
  tf = import_tensorflow()
  model, directory = exported['segnet']
  loaded = tf.saved_model.load(os.path.join(directory, export.SAVED_MODEL_DIR))
  images = _images(2, seed=3)
  out = loaded.signatures['serving_default'](images=tf.constant(images))
  ref = _reference(model, images)
  assert set(out) == set(ref)
  for name in ref:
    np.testing.assert_allclose(out[name].numpy(), ref[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_example_script_runs_without_mtan_jax(exported, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, directory = exported['mtan']
  png = tmp_path / 'scene.png'
  Image.fromarray((_images(1)[0] * 255).astype(np.uint8)).resize((80, 40)).save(png)
  npy = tmp_path / 'batch.npy'
  np.save(npy, _images(2))
  # Outside the repository root and without PYTHONPATH, so `import mtan_jax` would fail.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  script = os.path.join(REPO, 'examples', 'run_exported.py')
  for args in ([], [str(png), str(npy)]):
    result = subprocess.run([sys.executable, script, directory, *args], capture_output=True,
                            text=True, cwd=str(tmp_path), env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in MODELS['mtan'][1]:
      assert f'{name}: shape ({2 if not args else 3}, 32, 64' in result.stdout, result.stdout


def test_load_errors_name_the_file_or_shape(exported, tmp_path):
  _, directory = exported['mtan']
  call, _ = export.load_exported(directory)
  with pytest.raises(DataError, match=r'expected \(b, H, W, C\) = \(b, 32, 64, 3\), got \(1, 64, 64, 3\)'):
    call(np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(DataError, match='dtype uint8'):
    call(np.zeros((1, 32, 64, 3), np.uint8))
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(DataError, match='nowhere: export directory not found'):
    export.load_exported(missing)
  broken = str(tmp_path / 'broken')
  shutil.copytree(directory, broken)
  path = os.path.join(broken, export.EXPORT_FILE)
  with open(path, 'wb') as f:
    f.write(b'not a serialized model')
  with pytest.raises(DataError, match=f'{path}: not a valid jax.export'):
    export.load_exported(broken)
  os.remove(path)
  with pytest.raises(DataError, match=f'{path}: serialized model not found'):
    export.load_exported(broken)


def test_export_rejects_bad_arguments(tmp_path):
  model = create_model('segnet', make_tasks(('depth',), 2), WIDTHS, seed=0)
  with pytest.raises(ConfigError, match='not divisible by 32'):
    export.export_model(model, str(tmp_path), image_size=(30, 64), in_channels=3, metadata={})
  with pytest.raises(ConfigError, match='does not accept images of shape'):
    export.export_model(model, str(tmp_path), image_size=SIZE, in_channels=1, metadata={})
  with pytest.raises(ConfigError, match='reserved'):
    export.export_model(model, str(tmp_path), image_size=SIZE, in_channels=3,
                        metadata={'outputs': 1})
  with pytest.raises(ConfigError, match='platforms'):
    export.export_model(model, str(tmp_path), image_size=SIZE, in_channels=3, metadata={},
                        platforms=('gpu0',))
  assert not os.listdir(tmp_path)
