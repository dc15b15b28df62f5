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
from mtan_jax.steps import count_params, create_model
from mtan_jax.tasks import make_tasks

FULL_WIDTHS = (64, 128, 256, 512, 512)
TINY_WIDTHS = (8, 16, 16, 32, 32)
NUM_CLASSES = 5


def num_params(model) -> int:
  """Trainable parameter count: nnx.Param leaves only (BatchNorm statistics are BatchStat)."""
  return count_params(model)


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
    # Op by op against one compiled program: float32 rounding, judged against each output's
    # scale (normals near zero differ by ~1e-3 of themselves).
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * np.abs(b).max())


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
  with pytest.raises(ConfigError, match='image size') as info:
    create_model('segnet', make_tasks(('semantic', 'species'), 2), TINY_WIDTHS, 0)
  assert 'species' in str(info.value) and '\n' not in str(info.value)
  with pytest.raises(ConfigError, match='widths'):
    create_model('mtan', tasks, (4, 8, 8), 0)
  with pytest.raises(ConfigError, match='at least one task'):
    create_model('mtan', (), TINY_WIDTHS, 0)


# ---------------------------------------------------------------------------------------------
# Task-stacked attention path (the default) against the reference-order per-task loop.

STACK_WIDTHS = (4, 8, 8, 16, 16)
STACK_TASKS = ('semantic', 'depth', 'normal')


def _stack_pair(num_tasks, dtype=jnp.float32, names=None):
  """Stacked and loop MTANs holding the same perturbed parameters and statistics.

  At init every task's BatchNorm holds the same values; perturbing all 1-D arrays (BatchNorm
  affine and running statistics, conv biases) makes a mix-up between tasks visible.
  """
  from mtan_jax.models.mtan import MTAN  # pylint: disable=import-outside-toplevel
  tasks = make_tasks(names or STACK_TASKS[:num_tasks], NUM_CLASSES, image_size=(32, 64))
  kwargs = dict(rngs=nnx.Rngs(0), dtype=dtype, image_size=(32, 64), head_hidden=8)
  stacked = MTAN(tasks, STACK_WIDTHS, **kwargs)
  loop = MTAN(tasks, STACK_WIDTHS, stack_tasks=False, **kwargs)
  keys = iter(jax.random.split(jax.random.key(42), 10_000))
  perturbed = jax.tree.map(
      lambda v: v + 0.5 * jax.random.uniform(next(keys), v.shape) if v.ndim == 1 and v.size > 3 else v,
      nnx.state(stacked))
  nnx.update(stacked, perturbed)
  nnx.update(loop, perturbed)
  return tasks, stacked, loop


def _forward_and_grads(model, x, weights):
  """Train-mode outputs, updated BatchStats, parameter gradients and eval outputs, in one jit."""
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  eval_graphdef = nnx.split(nnx.view(model, use_running_average=True), nnx.Param, nnx.BatchStat)[0]

  @jax.jit
  def run(params, stats, x):
    def loss_fn(params):
      # Fresh Variables at this trace level, which the train-mode forward may update.
      train_model = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, stats))
      outs = train_model(x)
      loss = sum(jnp.mean(o * w) for o, w in zip(outs, weights))
      return loss, (outs, nnx.state(train_model, nnx.BatchStat))
    (_, (outs, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return outs, new_stats, grads, nnx.merge(eval_graphdef, params, stats)(x)

  return jax.tree.map(np.asarray, run(params, stats, x))


def _rel(a, b):
  """max |a - b| / max |b| (0 where both are zero)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.abs(b).max()
  return np.abs(a - b).max() / scale if scale else np.abs(a).max()


# Three tasks in the default tier; one and two (the same code with fewer rows) in the slow one.
@pytest.mark.parametrize('num_tasks', [pytest.param(1, marks=pytest.mark.slow),
                                       pytest.param(2, marks=pytest.mark.slow), 3])
def test_stacked_tasks_equal_per_task_loop(num_tasks):
  tasks, stacked, loop = _stack_pair(num_tasks)
  x = images(2, 32, 64)
  weights = [jax.random.normal(jax.random.key(t), (2, 32, 64, task.channels)) for t, task in enumerate(tasks)]
  outs, stats, grads, evals = _forward_and_grads(stacked, x, weights)
  ref_outs, ref_stats, ref_grads, ref_evals = _forward_and_grads(loop, x, weights)

  for task, a, b in zip(tasks, outs, ref_outs):
    assert a.shape == (2, 32, 64, task.channels)
    assert _rel(a, b) < 1e-5, task.name
  for task, a, b in zip(tasks, evals, ref_evals):
    assert _rel(a, b) < 1e-5, task.name
  # Every running statistic moved identically (shared attention convs: T updates in task order).
  stat_errs = jax.tree.leaves(jax.tree.map(_rel, stats, ref_stats))
  assert len(stat_errs) == len(jax.tree.leaves(nnx.state(loop, nnx.BatchStat)))
  assert max(stat_errs) < 1e-5
  # Gradients, judged per leaf against the largest gradient of that leaf, plus a floor of 1e-5
  # of the largest gradient overall for leaves whose exact gradient is zero (conv biases before
  # a BatchNorm: what they get is float32 rounding noise, ~1e-8 here).
  grad_max = max(np.abs(g).max() for g in jax.tree.leaves(ref_grads))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max() + 1e-5 * grad_max, jax.tree_util.keystr(path)
  # The attention path really is exercised by the gradients of every task's masks.
  for t in range(num_tasks):
    assert np.abs(ref_grads['decoder_att'][t][0]['conv1']['kernel']).max() > 0


def test_image_level_tasks_stacked_equal_loop_and_read_the_encoder():
  # Image-level tasks between dense ones: they stop after the encoder attention, the dense
  # ones go on through the decoder; both paths must agree, BatchNorm statistics included.
  names = ('species', 'semantic', 'bbox', 'depth')
  tasks, stacked, loop = _stack_pair(0, names=names)
  assert [len(stacked.decoder_att[t]) for t in range(4)] == [0, 5, 0, 5]
  x = images(2, 32, 64)
  weights = [jax.random.normal(jax.random.key(t), (2,) + ((task.channels,) if task.image_level
                                                         else (32, 64, task.channels)))
             for t, task in enumerate(tasks)]
  outs, stats, grads, evals = _forward_and_grads(stacked, x, weights)
  ref_outs, ref_stats, ref_grads, ref_evals = _forward_and_grads(loop, x, weights)
  assert [o.shape for o in outs] == [(2, 2), (2, 32, 64, NUM_CLASSES), (2, 4), (2, 32, 64, 1)]
  for a, b in zip(outs + evals, ref_outs + ref_evals):
    assert _rel(a, b) < 1e-5
  assert max(jax.tree.leaves(jax.tree.map(_rel, stats, ref_stats))) < 1e-5
  grad_max = max(np.abs(g).max() for g in jax.tree.leaves(ref_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max() + 1e-5 * grad_max
  # Species and box heads learn from the encoder attention of their own task.
  for t in (0, 2):
    assert np.abs(ref_grads['encoder_att'][t][4]['conv1']['kernel']).max() > 0
  # The box prediction lies inside the image (sigmoid scaled by the size).
  assert np.all((outs[2] >= 0) & (outs[2] <= np.array([32, 64, 32, 64])))


def test_attention_masks_are_returned_alike_by_both_paths():
  """`return_attention` (scripts/predict.py's pictures): every layer's masks, stacked and
  loop paths equal, decoder masks for dense tasks only, predictions unchanged."""
  names = ('species', 'semantic', 'depth')
  tasks, stacked, loop = _stack_pair(0, names=names)
  x = images(2, 32, 64)
  (outs, masks), (ref_outs, ref_masks) = [
      nnx.view(m, use_running_average=True)(x, return_attention=True) for m in (stacked, loop)]
  assert sorted(masks) == sorted(ref_masks) == sorted([f'enc{j}' for j in range(5)] + [f'dec{j}' for j in range(5)])
  for j in range(5):
    h, w = 32 >> j, 64 >> j
    assert masks[f'enc{j}'].shape == (2, 3, h, w, STACK_WIDTHS[j])
    # Decoder level j gates the shared decoder output of width f[j-1] (f[0] at level 0).
    assert masks[f'dec{j}'].shape == (2, 2, h, w, STACK_WIDTHS[max(j - 1, 0)])
  for name in masks:
    assert _rel(masks[name], ref_masks[name]) < 1e-5, name
    assert float(masks[name].min()) > 0 and float(masks[name].max()) < 1
  plain = nnx.view(stacked, use_running_average=True)(x)
  for a, b in zip(outs, plain):
    np.testing.assert_array_equal(a, b)


def test_image_head_parameter_count_and_multi_task_segnet():
  # ImageHead on 512 x 8 x 8 features (256x256 input): 32768*256 + 256 + 256*C + C.
  tasks = make_tasks(('semantic', 'species', 'bbox'), 2, image_size=(256, 256))
  model = nnx.eval_shape(lambda: create_model('segnet', tasks, FULL_WIDTHS, 0, image_size=(256, 256)))
  head = lambda c: 512 * 8 * 8 * 256 + 256 + 256 * c + c
  seg_head = 64 * 64 * 9 + 64 + 64 * 2 + 2
  assert num_params(model) == 24_980_289 - (64 * 64 * 9 + 64 + 64 + 1) + seg_head + head(2) + head(4)
  assert [type(h).__name__ for h in model.heads()] == ['PredictionHead', 'ImageHead', 'ImageHead']
  # MTAN: image-level tasks get encoder masks but no decoder masks.
  mt = nnx.eval_shape(lambda: create_model('mtan', tasks, FULL_WIDTHS, 0, image_size=(256, 256)))
  dense = nnx.eval_shape(lambda: create_model('mtan', tasks[:1], FULL_WIDTHS, 0))
  enc_masks = sum(num_params(m) for m in mt.encoder_att[1])
  assert num_params(mt) == num_params(dense) + 2 * enc_masks + head(2) + head(4) + 2


def test_stacked_tasks_same_structure_and_parameter_count():
  from mtan_jax.models.mtan import MTAN  # pylint: disable=import-outside-toplevel
  tasks = make_tasks(('semantic', 'depth', 'normal'), 13)
  stacked = nnx.eval_shape(lambda: MTAN(tasks, FULL_WIDTHS, rngs=nnx.Rngs(0)))
  loop = nnx.eval_shape(lambda: MTAN(tasks, FULL_WIDTHS, rngs=nnx.Rngs(0), stack_tasks=False))
  assert stacked.stack_tasks and not loop.stack_tasks
  assert num_params(stacked) == num_params(loop) == 44_229_076
  a, b = nnx.state(stacked), nnx.state(loop)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  assert [x.shape for x in jax.tree.leaves(a)] == [x.shape for x in jax.tree.leaves(b)]


def _forward(model, x):
  """Train-mode and eval-mode outputs in one jit (no gradients: cheaper to compile)."""
  graphdef, state = nnx.split(model)
  eval_graphdef = nnx.split(nnx.view(model, use_running_average=True))[0]

  @jax.jit
  def run(state, x):
    train_outs = nnx.merge(graphdef, jax.tree.map(lambda v: v, state))(x)
    return train_outs, nnx.merge(eval_graphdef, state)(x)

  return jax.tree.map(np.asarray, run(state, x))


def test_stacked_tasks_bfloat16_runs_and_is_close_to_float32():
  tasks, stacked32, _ = _stack_pair(3)
  _, stacked16, loop16 = _stack_pair(3, dtype=jnp.bfloat16)
  x = images(2, 32, 64)
  _, evals32 = _forward(stacked32, x)
  outs16, evals16 = _forward(stacked16, x)
  loop_outs16, loop_evals16 = _forward(loop16, x)
  for task, a16, e16, e32, l16, le16 in zip(tasks, outs16, evals16, evals32, loop_outs16, loop_evals16):
    assert a16.dtype == np.float32  # heads return float32
    assert np.all(np.isfinite(a16)) and np.all(np.isfinite(e16))
    # bfloat16 keeps ~3 significant digits and errors compound over ~25 layers.
    assert np.linalg.norm(e16 - e32) / np.linalg.norm(e32) < 0.05, task.name
    # Train mode is compared with the bfloat16 loop only: at 32x64 the deepest train-mode
    # BatchNorms normalise over 2 x 1 x 2 = 4 values per channel, which magnifies rounding, so
    # bfloat16 and float32 differ by 20-60% here, for the loop (the reference order) as much
    # as for the stacked path; the two bfloat16 paths agree within ~1%.
    assert np.linalg.norm(a16 - l16) / np.linalg.norm(l16) < 0.05, task.name
    assert np.linalg.norm(e16 - le16) / np.linalg.norm(le16) < 0.02, task.name
