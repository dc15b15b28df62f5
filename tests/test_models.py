"""Tests for the SegNet and MTAN models and `steps.create_model`.

Full-width parameter counts are taken with `nnx.eval_shape` (nothing is allocated) and must
equal the reference's (see shared/REFERENCE.md); forward passes use tiny widths and 64x64
inputs (the same widths, classes and sizes as tests/test_torch_import.py, so that the two
files share JAX's compiled kernels when run together).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtan_jax.errors import ConfigError
from mtan_jax.models import segnet
from mtan_jax.steps import create_model
from mtan_jax.tasks import make_tasks

FULL_WIDTHS = (64, 128, 256, 512, 512)
TINY_WIDTHS = (8, 16, 16, 32, 32)
NUM_CLASSES = 5


def num_params(model) -> int:
  """Trainable parameter count: nnx.Param leaves only (BatchNorm statistics are BatchStat)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(name, task_names, num_classes, widths=FULL_WIDTHS):
  return nnx.eval_shape(lambda: create_model(name, make_tasks(task_names, num_classes), widths, 0))


def images(batch=2, height=64, width=64, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, height, width, 3))


@pytest.mark.parametrize('task_names, num_classes, expected', [
    (('semantic', 'depth', 'normal'), 13, 44_229_076),
    (('semantic', 'depth'), 7, 41_206_986),
])
def test_mtan_parameter_count(task_names, num_classes, expected):
  model = abstract_model('mtan', task_names, num_classes)
  assert isinstance(jax.tree.leaves(nnx.state(model, nnx.Param))[0], jax.ShapeDtypeStruct)
  assert num_params(model) == expected


@pytest.mark.parametrize('task_names, num_classes, expected', [
    (('semantic',), 13, 24_981_069),
    (('semantic',), 7, 24_980_679),
    (('depth',), 7, 24_980_289),
])
def test_segnet_parameter_count(task_names, num_classes, expected):
  assert num_params(abstract_model('segnet', task_names, num_classes)) == expected


def _leaf_names(state):
  """The attribute name holding each leaf of an NNX state ('kernel', 'mean', ...)."""
  return [[k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
          for path, _ in jax.tree_util.tree_leaves_with_path(state)]


def test_batch_stats_are_not_params():
  model = abstract_model('segnet', ('depth',), 7, TINY_WIDTHS)
  stats = _leaf_names(nnx.state(model, nnx.BatchStat))
  params = _leaf_names(nnx.state(model, nnx.Param))
  # One mean and one var per BatchNorm; 5 encoder + 8 encoder convs + 5 decoder + 8 decoder = 26 BNs.
  assert sorted(set(stats)) == ['mean', 'var'] and len(stats) == 2 * 26
  assert sorted(set(params)) == ['bias', 'kernel', 'scale']
  # 26 conv layers (kernel, bias, BN scale, BN bias) plus the head's two convs.
  assert len(params) == 26 * 4 + 2 * 2


def _check_outputs(tasks, outputs, batch, height, width):
  assert len(outputs) == len(tasks)
  for task, out in zip(tasks, outputs):
    assert out.shape == (batch, height, width, task.channels)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    if task.name == 'semantic':
      np.testing.assert_allclose(np.asarray(jax.nn.logsumexp(out, axis=-1)), 0.0, atol=1e-5)
    elif task.name == 'normal':
      np.testing.assert_allclose(np.asarray(jnp.linalg.norm(out, axis=-1)), 1.0, atol=1e-5)


@pytest.mark.parametrize('task_names', [
    ('semantic',), ('depth', 'normal'), ('semantic', 'depth', 'normal'),
])
def test_mtan_outputs(task_names):
  tasks = make_tasks(task_names, NUM_CLASSES)
  model = create_model('mtan', tasks, TINY_WIDTHS, 0)
  outputs = model(images())
  _check_outputs(tasks, outputs, 2, 64, 64)
  np.testing.assert_array_equal(np.asarray(model.logsigma[...]), np.full(len(tasks), -0.5, np.float32))
  assert isinstance(model.logsigma, nnx.Param)
  assert len(model.heads()) == len(tasks)


@pytest.mark.parametrize('name', ['semantic', 'depth', 'normal'])
def test_segnet_outputs(name):
  tasks = make_tasks((name,), NUM_CLASSES)
  model = create_model('segnet', tasks, TINY_WIDTHS, 0)
  outputs = model(images())
  _check_outputs(tasks, outputs, 2, 64, 64)
  assert not hasattr(model, 'logsigma')


def test_eval_view_uses_running_stats_and_keeps_them():
  tasks = make_tasks(('semantic', 'depth'), NUM_CLASSES)
  model = create_model('mtan', tasks, TINY_WIDTHS, 0)
  x = images()
  train_out = model(x)  # one train-mode call moves the running statistics
  stats = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  view = nnx.view(model, use_running_average=True)
  first, second = view(x), view(x)
  _check_outputs(tasks, first, 2, 64, 64)
  for a, b, t in zip(first, second, train_out):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(t), atol=1e-3)
  jax.tree.map(np.testing.assert_array_equal, stats, jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  assert not model.encoder_block[0].bn.use_running_average


def test_train_mode_updates_batch_stats():
  model = create_model('mtan', make_tasks(('depth',), NUM_CLASSES), TINY_WIDTHS, 0)
  before = np.asarray(model.encoder_block[0].bn.mean[...]).copy()
  model(images())
  assert not np.allclose(before, np.asarray(model.encoder_block[0].bn.mean[...]))


def test_same_seed_same_weights():
  tasks = make_tasks(('depth',), NUM_CLASSES)
  a = nnx.state(create_model('mtan', tasks, TINY_WIDTHS, 3), nnx.Param)
  b = nnx.state(create_model('mtan', tasks, TINY_WIDTHS, 3), nnx.Param)
  c = nnx.state(create_model('mtan', tasks, TINY_WIDTHS, 4), nnx.Param)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(np.asarray(a['encoder_block'][0]['conv']['kernel'][...]),
                            np.asarray(c['encoder_block'][0]['conv']['kernel'][...]))


def test_model_under_jit():
  tasks = make_tasks(('semantic', 'depth', 'normal'), NUM_CLASSES)
  model = create_model('mtan', tasks, TINY_WIDTHS, 0)
  x = images()
  eager = nnx.view(model, use_running_average=True)(x)
  graphdef, state = nnx.split(nnx.view(model, use_running_average=True))

  @jax.jit
  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  jitted = forward(state, x)
  _check_outputs(tasks, jitted, 2, 64, 64)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('height, width', [(100, 256), (256, 100), (0, 64), (48, 64)])
def test_check_input_size_rejects(height, width):
  with pytest.raises(ConfigError, match='32') as info:
    segnet.check_input_size(height, width)
  assert '\n' not in str(info.value)
  assert f'{height}x{width}' in str(info.value)


@pytest.mark.parametrize('height, width', [(64, 96), (32, 32), (128, 256), (288, 384)])
def test_check_input_size_accepts(height, width):
  segnet.check_input_size(height, width)


def test_check_widths_rejects():
  with pytest.raises(ConfigError, match='widths'):
    segnet.check_widths((4, 8, 8, 8))
  with pytest.raises(ConfigError, match='widths'):
    segnet.check_widths((4, 8, 0, 8, 8))


def test_create_model_errors():
  tasks = make_tasks(('semantic', 'depth'), 7)
  with pytest.raises(ConfigError, match='resnet'):
    create_model('resnet', tasks, TINY_WIDTHS, 0)
  with pytest.raises(ConfigError, match='float16'):
    create_model('mtan', tasks, TINY_WIDTHS, 0, dtype='float16')
  with pytest.raises(ConfigError, match='single-task') as info:
    create_model('segnet', tasks, TINY_WIDTHS, 0)
  assert 'semantic' in str(info.value) and '\n' not in str(info.value)
  with pytest.raises(ConfigError, match='widths'):
    create_model('mtan', tasks, (4, 8, 8), 0)
  with pytest.raises(ConfigError, match='at least one task'):
    create_model('mtan', (), TINY_WIDTHS, 0)
