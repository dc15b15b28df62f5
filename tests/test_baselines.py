"""Tests for the MTAN paper's baselines (`mtan_jax.models.baselines`) and STAN's size.

Full-width parameter counts are taken abstractly (`nnx.eval_shape`) and must equal those of
the PyTorch reference's own class definitions (see `REFERENCE_COUNTS`). Forward passes use
tiny widths, 32x64 inputs and eager execution: each model runs a handful of times, fewer
than it would take to pay back a jit compilation.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtan_jax.errors import ConfigError
from mtan_jax.models.baselines import CrossStitch, Dense, Split
from mtan_jax.models.mtan import MTAN
from mtan_jax.models.segnet import SegNet
from mtan_jax.steps import count_params
from mtan_jax.tasks import make_tasks

FULL_WIDTHS = (64, 128, 256, 512, 512)
TINY_WIDTHS = (4, 8, 8, 8, 8)
# `wide` doubles the deepest width: built from these, it has TINY_WIDTHS and so the same
# layer shapes as the other tiny models, which spares eager JAX a compilation per new shape.
WIDE_BASE_WIDTHS = (4, 8, 8, 8, 4)
NYUV2 = (('semantic', 'depth', 'normal'), 13)
CITYSCAPES = (('semantic', 'depth'), 7)

# Trainable parameters of the reference's models (lorenmt/mtan, im2im_pred/), counted with
# `sum(p.numel() for p in model.parameters() if p.requires_grad)` on CPU (torch 2.13) after
# executing only the scripts' `class SegNet` definitions (as
# `mtan_jax.torch_reference.load_reference_segnet` does), with `opt.type` set for Split
# and `opt.task` for STAN. NYUv2 is the scripts as written (13 classes, depth, normal);
# Cityscapes is the same source with `class_nb = 7` and the third task removed (its
# `pred_task3`, its task network and stitch column, its log-sigma). The Split standard
# Cityscapes count equals shared/REFERENCE.md's 25,017,674.
REFERENCE_COUNTS = {
    ('split', 'standard', 'nyuv2'): 25_055_188,
    ('split', 'wide', 'nyuv2'): 43_934_164,
    ('split', 'deep', 'nyuv2'): 50_807_764,
    ('dense', None, 'nyuv2'): 123_743_995,
    ('cross_stitch', None, 'nyuv2'): 74_941_807,
    ('split', 'standard', 'cityscapes'): 25_017_674,
    ('split', 'wide', 'cityscapes'): 43_896_650,
    ('split', 'deep', 'cityscapes'): 50_770_250,
    ('dense', None, 'cityscapes'): 90_796_895,
    ('cross_stitch', None, 'cityscapes'): 49_960_988,
}
# model_segnet_stan.py (NYUv2, 13 classes) per `--task`; it has no log-sigma.
REFERENCE_STAN_COUNTS = {'semantic': 38_185_805, 'depth': 38_185_025, 'normal': 38_185_155}

CLASSES = {'split': Split, 'dense': Dense, 'cross_stitch': CrossStitch}
# Tiny models the forward tests share: (class name, variant kwargs).
TINY_MODELS = {
    'split_standard': ('split', {'variant': 'standard'}),
    'split_wide': ('split', {'variant': 'wide', 'widths': WIDE_BASE_WIDTHS}),
    'split_deep': ('split', {'variant': 'deep'}),
    'dense': ('dense', {}),
    'cross_stitch': ('cross_stitch', {}),
    'cross_stitch_matrix': ('cross_stitch', {'stitch': 'matrix'}),
}


def build(name, tasks, widths=TINY_WIDTHS, seed=0, **kwargs):
  return CLASSES[name](tasks, widths, rngs=nnx.Rngs(seed), **kwargs)


def images(batch=2, height=32, width=64, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, height, width, 3))


@pytest.mark.parametrize('name, variant, dataset', sorted(REFERENCE_COUNTS, key=str))
def test_parameter_count_matches_reference(name, variant, dataset):
  task_names, num_classes = NYUV2 if dataset == 'nyuv2' else CITYSCAPES
  tasks = make_tasks(task_names, num_classes)
  kwargs = {'variant': variant} if variant else {}
  model = nnx.eval_shape(lambda: build(name, tasks, FULL_WIDTHS, **kwargs))
  assert count_params(model) == REFERENCE_COUNTS[name, variant, dataset]


@pytest.mark.parametrize('task_name', sorted(REFERENCE_STAN_COUNTS))
def test_stan_is_single_task_mtan(task_name):
  model = nnx.eval_shape(lambda: MTAN(make_tasks((task_name,), 13), FULL_WIDTHS, rngs=nnx.Rngs(0)))
  # MTAN keeps a log-sigma even for one task: one parameter more than the reference's STAN.
  assert count_params(model) == REFERENCE_STAN_COUNTS[task_name] + 1


def test_matrix_cross_stitch_count():
  # A T x T matrix instead of the reference's T-vector at each of the 4 + 5 positions.
  tasks = make_tasks(*NYUV2)
  model = nnx.eval_shape(lambda: build('cross_stitch', tasks, FULL_WIDTHS, stitch='matrix'))
  assert count_params(model) == REFERENCE_COUNTS['cross_stitch', None, 'nyuv2'] + 9 * (3 * 3 - 3)


@pytest.fixture(scope='module')
def tiny_models():
  """Builds each tiny model on first use; the NYUv2 tasks with 5 classes."""
  tasks = make_tasks(NYUV2[0], 5)
  cache = {}

  def get(key):
    if key not in cache:
      name, kwargs = TINY_MODELS[key]
      cache[key] = build(name, tasks, **kwargs)
    return cache[key]

  return get


def _leaf_paths(state):
  """Each leaf's path as plain keys ('encoder_block', 0, 'conv', 'kernel', ...)."""
  return [tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
          for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def _check_outputs(tasks, outputs, batch=2, height=32, width=64):
  assert len(outputs) == len(tasks)
  for task, out in zip(tasks, outputs):
    assert out.shape == (batch, height, width, task.channels)
    assert out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    if task.name == 'semantic':
      np.testing.assert_allclose(np.asarray(jax.nn.logsumexp(out, axis=-1)), 0.0, atol=1e-5)
    elif task.name == 'normal':
      np.testing.assert_allclose(np.asarray(jnp.linalg.norm(out, axis=-1)), 1.0, atol=1e-5)


@pytest.mark.parametrize('key', list(TINY_MODELS))
def test_forward(tiny_models, key):
  model = tiny_models(key)
  stats_before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  _check_outputs(model.tasks, model(images()))
  assert len(model.heads()) == len(model.tasks) == 3
  assert isinstance(model.logsigma, nnx.Param)
  np.testing.assert_array_equal(np.asarray(model.logsigma[...]), np.full(3, -0.5, np.float32))
  # Train mode moves every running statistic, except those of Dense's shared last decoder
  # level, whose output the reference never reads (it is not computed).
  stats_after = nnx.state(model, nnx.BatchStat)
  paths = _leaf_paths(stats_after)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))),
                                       stats_before, stats_after))
  unused = [p[:2] == ('decoder_block', 0) and isinstance(model, Dense) for p in paths]
  assert moved == [not u for u in unused]
  # Every TASK_SPECIFIC prefix names parameters the model has.
  firsts = {p[0] for p in _leaf_paths(nnx.state(model, nnx.Param))}
  for prefix in model.TASK_SPECIFIC:
    assert any(name.startswith(prefix) for name in firsts), (prefix, sorted(firsts))


def test_wide_and_deep_shapes(tiny_models):
  wide, deep = tiny_models('split_wide'), tiny_models('split_deep')
  # wide: the deepest level doubles (4 -> 8 here, 512 -> 1024 at full width).
  assert wide.widths == TINY_WIDTHS
  assert wide.conv_block_enc[4][1].conv.kernel.shape == (3, 3, 8, 8)
  assert wide.decoder_block[4].conv.kernel.shape == (3, 3, 8, 8)
  # deep: every layer is two conv-BN-ReLU layers, the second keeping the width.
  assert deep.widths == TINY_WIDTHS
  assert deep.encoder_block[0].layer1.conv.kernel.shape == (3, 3, 3, 4)
  assert deep.encoder_block[0].layer2.conv.kernel.shape == (3, 3, 4, 4)
  assert deep.pred_task1.conv1.kernel.shape == (3, 3, 4, 4)


def _owner(model, path):
  """Index of the task whose loss alone depends on this parameter, None if shared, or
  'logsigma' (task-specific per element, and read by the loss weighting, not the network)."""
  first = path[0]
  if first == 'logsigma':
    return 'logsigma'
  if not any(first.startswith(prefix) for prefix in model.TASK_SPECIFIC):
    return None
  head = re.fullmatch(r'pred_task(\d+)', first)
  # Heads are named per task; the other task-specific attributes are lists indexed by task.
  return int(head.group(1)) - 1 if head else int(path[1])


def _outputs_with_noise(model, x, select):
  """Train-mode outputs after adding noise to the parameters whose path `select` accepts."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  paths = _leaf_paths(params)
  leaves, treedef = jax.tree.flatten(params)
  # numpy noise: a JAX random draw would compile a kernel per parameter shape.
  rng = np.random.default_rng(0)
  leaves = [leaf + 0.5 * rng.standard_normal(leaf.shape).astype(np.float32) if select(path) else leaf
            for path, leaf in zip(paths, leaves)]
  new = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), jax.tree.map(lambda v: v, rest))
  return [np.asarray(o) for o in new(x)]


@pytest.mark.parametrize('key', ['split_standard', 'dense', 'cross_stitch'])
def test_task_specific_parameters_reach_one_task(tiny_models, key):
  model = tiny_models(key)
  x = images()
  base = _outputs_with_noise(model, x, lambda path: False)
  num_tasks = len(model.tasks)
  for t in range(num_tasks):
    outs = _outputs_with_noise(model, x, lambda path: _owner(model, path) == t)
    for s in range(num_tasks):
      if s == t:
        assert not np.allclose(outs[s], base[s])
      else:
        np.testing.assert_array_equal(outs[s], base[s])
  # The shared parameters reach every task.
  assert 'logsigma' in model.TASK_SPECIFIC
  shared = _outputs_with_noise(model, x, lambda path: _owner(model, path) is None)
  for s in range(num_tasks):
    assert not np.allclose(shared[s], base[s])
  if isinstance(model, CrossStitch):
    # Through the stitch units, task 0 reads task 1's network: hence networks are shared.
    coupled = _outputs_with_noise(model, x, lambda path: path[:2] == ('networks', 1))
    assert not np.allclose(coupled[0], base[0])


def test_cross_stitch_init(tiny_models):
  ref, matrix = tiny_models('cross_stitch'), tiny_models('cross_stitch_matrix')
  # As in the reference: ones, so at init every network reads the sum of all networks.
  np.testing.assert_array_equal(np.asarray(ref.cs_unit_encoder[...]), np.ones((4, 3)))
  np.testing.assert_array_equal(np.asarray(ref.cs_unit_decoder[...]), np.ones((5, 3)))
  # Misra et al.: 0.9 of a task's own feature, 0.1 shared among the others; rows sum to 1.
  expected = np.full((3, 3), 0.05, np.float32) + 0.85 * np.eye(3, dtype=np.float32)
  np.testing.assert_allclose(np.asarray(matrix.cs_unit_encoder[...]),
                             np.broadcast_to(expected, (4, 3, 3)))
  np.testing.assert_allclose(np.asarray(matrix.cs_unit_decoder[...]),
                             np.broadcast_to(expected, (5, 3, 3)))


def test_identity_cross_stitch_is_independent_segnets(tiny_models):
  model = tiny_models('cross_stitch_matrix')
  eye = jnp.eye(len(model.tasks))
  graphdef, state = nnx.split(model)
  stitched = nnx.merge(graphdef, jax.tree.map(lambda v: v, state))
  stitched.cs_unit_encoder.set_value(jnp.tile(eye, (4, 1, 1)))
  stitched.cs_unit_decoder.set_value(jnp.tile(eye, (5, 1, 1)))
  x = images()
  outputs = stitched(x)
  for t, task in enumerate(model.tasks):
    single = SegNet(task, TINY_WIDTHS, rngs=nnx.Rngs(1))
    nnx.update(single, nnx.state(model.networks[t]))
    nnx.update(single.pred_task, nnx.state(model.heads()[t]))
    np.testing.assert_allclose(np.asarray(outputs[t]), np.asarray(single(x)[0]), rtol=1e-6, atol=1e-6)


def test_split_image_level_task():
  tasks = make_tasks(('semantic', 'species'), 5)
  model = Split(tasks, WIDE_BASE_WIDTHS, rngs=nnx.Rngs(0), image_size=(32, 64), variant='wide')
  semantic, species = model(images())
  assert semantic.shape == (2, 32, 64, 5)
  assert species.shape == (2, tasks[1].channels)
  # The image head reads the doubled deepest level: 8 channels x 1 x 2 after five pools.
  assert model.pred_task2.fc1.kernel.shape[0] == 8 * 1 * 2


@pytest.mark.parametrize('name, model_name', [('dense', 'Dense'), ('cross_stitch', 'CrossStitch')])
def test_image_level_task_is_rejected(name, model_name):
  tasks = make_tasks(('semantic', 'species'), 5)
  with pytest.raises(ConfigError, match=f'^{model_name} supports dense .* species is image-level'):
    build(name, tasks)


def test_unknown_options_are_rejected():
  tasks = make_tasks(('depth',), 5)
  with pytest.raises(ConfigError, match='split variant .*standard, wide, deep'):
    build('split', tasks, variant='tall')
  with pytest.raises(ConfigError, match='cross-stitch unit .*reference, matrix'):
    build('cross_stitch', tasks, stitch='diagonal')
  with pytest.raises(ConfigError, match='widths'):
    build('dense', tasks, widths=(4, 8))
