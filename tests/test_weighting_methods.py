"""Every weighting method through the real train step: the registry, the per-task gradients
of one compiled step, and training on 1 and 8 (fake CPU) devices.

The methods' formulas are tested one module at a time (tests/test_weighting_<name>.py);
here the step that feeds them is: per-task gradients from one forward pass and a vmapped
backward pass must equal separate backward passes, the shared / task-specific split must
follow the model's TASK_SPECIFIC, and every method must train under data parallelism and
FSDP to the same parameters as on one device.
"""

import importlib
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtan_jax import weighting
from mtan_jax.data.synthetic import render_scenes
from mtan_jax.errors import ConfigError
from mtan_jax.models.segnet import SegNet
from mtan_jax.steps import Steps, create_model, shared_mask
from mtan_jax.tasks import make_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTHS = (4, 8, 8, 8, 8)


def test_every_method_is_registered_and_documented():
  for name in weighting.METHODS:
    cls = weighting.method_class(name)
    assert cls.name == name
    doc = importlib.import_module(cls.__module__).__doc__
    assert doc and len(doc) > 200, name
    method = weighting.make(name, 3)
    assert all(isinstance(v, float) for v in method.hp.values()), name
    assert weighting.is_gradient_method(name) == issubclass(cls, weighting.GradientMethod)


def test_parse_params():
  assert weighting.parse_params('') == {}
  assert weighting.parse_params('c=0.4, max_norm=1') == {'c': 0.4, 'max_norm': 1.0}
  assert weighting.parse_params({'alpha': 2}) == {'alpha': 2.0}
  for bad, match in [('c', 'not name=value'), (3, 'expected')]:
    with pytest.raises(ConfigError, match=match):
      weighting.parse_params(bad)
  assert weighting.parse_params('normalization=l2') == {'normalization': 'l2'}
  assert weighting.make('mgda', 2, 'normalization=l2').hp['normalization'] == 1.0
  with pytest.raises(ConfigError, match="cagrad.calpha='abc' is not a number"):
    weighting.make('cagrad', 2, 'calpha=abc')
  with pytest.raises(ConfigError, match='more than the 12'):
    weighting.make('upgrad', 13)
  with pytest.raises(ConfigError, match="has no hyper-parameter 'nope'"):
    weighting.make('equal', 2, 'nope=1')


class _OneTask(weighting.GradientMethod):
  """Test method: the shared parameters follow the gradient of task `state['k']` alone (the
  task is state, so one compiled step serves every k)."""
  name = 'one_task'

  def init_state(self, shared_params):
    return {'k': jnp.zeros((), jnp.int32)}

  def weights(self, gram, losses, state, key):
    return jax.nn.one_hot(state['k'], self.num_tasks), state


def _setup(method='equal', arch='split'):
  tasks = make_tasks(('semantic', 'depth', 'normal'), 7)
  model = create_model(arch, tasks, WIDTHS, seed=0)
  scenes = render_scenes(range(2), 32, 32, seed=0)
  batch = {k: scenes[k] for k in ('image', 'label', 'depth', 'normal')}
  batch['image'] = np.random.default_rng(0).uniform(0, 1, batch['image'].shape).astype(np.float32)
  return Steps(model, optax.sgd(1.0), method), batch


def test_shared_mask_follows_task_specific():
  tasks = make_tasks(('semantic', 'depth', 'normal'), 7)
  steps = Steps(nnx.eval_shape(lambda: create_model('mtan', tasks, WIDTHS, seed=0)), optax.sgd(1.0), 'pcgrad')
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(steps._params)[0]]
  for path, shared in zip(paths, steps.shared):
    specific = any(path.startswith(f"['{p}") for p in ('encoder_att', 'decoder_att', 'pred_task', 'logsigma'))
    assert shared != specific, path
  assert sum(steps.shared) and not all(steps.shared)
  assert shared_mask({'pred_task1': 1, 'body': 2}, ('pred_task',)) == [True, False]


def test_per_task_gradients_equal_separate_backward_passes():
  """With SGD(lr=1), -update = gradient: per task k, the shared parameters must move by
  grad L_k exactly, and the task-specific ones by the sum of all tasks' gradients (each only
  has its own task's), from one forward and one vmapped backward pass."""
  steps, batch = _setup()
  steps.weighter = _OneTask(3)
  state = steps.init_state()

  @jax.jit
  def separate(params):
    """Each task's gradient from a backward pass of its own loss, and of their sum."""
    loss = lambda p: steps._forward(p, state.batch_stats, batch)[0]  # pylint: disable=protected-access
    return [jax.grad(lambda p, k=k: loss(p)[k])(params) for k in range(3)], jax.grad(lambda p: jnp.sum(loss(p)))(params)

  expected, total = separate(state.params)
  train_step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  for k in range(3):
    start = state.replace(weighting={**state.weighting, 'method': {'k': jnp.asarray(k, jnp.int32)}})
    new, metrics = train_step(start, batch)
    update = jax.tree.map(lambda a, b: a - b, state.params, new.params)
    for u, e, t, shared in zip(jax.tree.leaves(update), jax.tree.leaves(expected[k]),
                               jax.tree.leaves(total), steps.shared):
      want = e if shared else t
      # float32 rounding of two different programs, judged against the leaf's scale (a
      # separate backward pass sums in another order: ~1e-5 of the largest entry).
      np.testing.assert_allclose(u, want, rtol=2e-4, atol=max(1e-5, 1e-4 * np.abs(want).max()))
    np.testing.assert_allclose(metrics['task_weights'], np.eye(3)[k])
    assert metrics['grad_norms'].shape == (3,)
  chex.clear_trace_counter()


def test_all_ones_gradient_method_is_equal_weighting():
  steps, batch = _setup()
  state = steps.init_state()
  equal, _ = jax.jit(steps.train_step)(state, batch)
  steps.weighter = type('Ones', (weighting.GradientMethod,),
                        {'name': 'ones', 'weights': lambda self, g, l, s, k: (jnp.ones(3), s)})(3)
  ones, _ = jax.jit(steps.train_step)(state, batch)
  chex.assert_trees_all_close(ones.params, equal.params, rtol=1e-4, atol=1e-6)


def test_sequential_per_task_gradients_equal_vmapped_ones():
  steps, batch = _setup('pcgrad')
  state = steps.init_state()
  vmapped, m1 = jax.jit(steps.train_step)(state, batch)
  steps.per_task_grads = 'sequential'
  sequential, m2 = jax.jit(steps.train_step)(state, batch)
  chex.assert_trees_all_close(sequential.params, vmapped.params, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m2['task_weights'], m1['task_weights'], rtol=1e-4)
  with pytest.raises(ConfigError, match="per_task_grads='loop'"):
    Steps(nnx.eval_shape(lambda: create_model('split', make_tasks(('depth',), 7), WIDTHS, seed=0)),
          optax.sgd(1.0), 'pcgrad', per_task_grads='loop')


def test_gradient_methods_need_shared_parameters():
  class AllSpecific(SegNet):
    TASK_SPECIFIC = ('',)  # every parameter

  model = AllSpecific(make_tasks(('semantic',), 7), WIDTHS, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='has none'):
    Steps(model, optax.sgd(1.0), 'pcgrad')
  Steps(model, optax.sgd(1.0), 'equal')  # loss-based methods do not care


def _probe(tmp_path, devices, methods, *extra):
  out = tmp_path / f'weighting_{devices}{"_".join(extra).replace("-", "")}.npz'
  subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'weighting_probe.py'), '--devices',
                  str(devices), '--methods', ','.join(methods), '--out', str(out), *extra],
                 check=True, capture_output=True, timeout=1500, cwd=REPO,
                 env={**os.environ, 'PYTHONPATH': REPO})
  return dict(np.load(out))


# The multi-device equality is checked on three methods that stand for the rest: PCGrad (the
# Gram matrix of the per-task gradients and random numbers), Nash-MTL (an iterative solver with
# state), FAMO (a loss-based method with a learned state). Every method's formula has its own
# test file, and every method trains in the real step on one device below.
MULTI_DEVICE_METHODS = ('pcgrad', 'nash_mtl', 'famo')


@pytest.mark.slow
def test_every_method_trains_and_three_train_the_same_on_1_and_8_devices_with_fsdp(tmp_path):
  """Three float64 SGD steps per method (one trace each) lower the losses of every method;
  for MULTI_DEVICE_METHODS they give the same weights and parameters on 8 devices with FSDP
  (data-parallel batch, sharded parameters and per-task gradients) as on one: the per-task
  gradients the methods see are the global batch's. (Plain data parallelism against FSDP is
  tests/test_sharding.py's subject.) Parameters are float32; the only differences are conv
  biases before BatchNorm, whose gradient is 0 up to ~1e-17."""
  methods = [m for m in weighting.METHODS if m != 'uncertainty']  # segnet has no log-sigma
  one = _probe(tmp_path, 1, methods)
  for method in methods:
    losses = one[f'{method}/losses']
    assert np.all(np.isfinite(losses)) and losses[-1].sum() < losses[0].sum(), method
  other = _probe(tmp_path, 8, MULTI_DEVICE_METHODS, '--fsdp')
  assert int(other['devices']) == 8
  compared = [key for key in other if key != 'devices']
  assert {key.split('/')[0] for key in compared} == set(MULTI_DEVICE_METHODS)
  for key in compared:
    assert np.all(np.isfinite(one[key])), key
    np.testing.assert_allclose(other[key], one[key], rtol=1e-5, atol=1e-9, err_msg=key)


# Two architectures in the default tier (a per-task-branch model and one that mixes task
# features); the others, the ResNet-50 MTAN among them, in the slow tier.
@pytest.mark.parametrize('arch', ['split_wide', pytest.param('split_deep', marks=pytest.mark.slow),
                                  pytest.param('dense', marks=pytest.mark.slow), 'cross_stitch',
                                  pytest.param('mtan_resnet50', marks=pytest.mark.slow)])
def test_every_architecture_trains_with_a_gradient_method(arch):
  """Two PCGrad steps on each zoo architecture: shared and task-specific parameters both
  exist and move, the losses are finite, and the step traces once."""
  tasks = make_tasks(('semantic', 'depth'), 7)
  widths = (8, 8, 8, 8, 8) if arch == 'mtan_resnet50' else WIDTHS

  def make_model():
    if arch == 'mtan_resnet50':
      from mtan_jax.models.resnet_mtan import ResNetMTAN  # pylint: disable=g-import-not-at-top
      return ResNetMTAN(tasks, widths, rngs=nnx.Rngs(0), depth_blocks=(2, 2, 2, 2), head_hidden=8)
    return create_model(arch, tasks, widths, seed=0)

  steps = Steps(nnx.eval_shape(make_model), optax.adam(1e-3), 'pcgrad')
  assert any(steps.shared) and not all(steps.shared), arch
  state = jax.jit(lambda: steps.state_from_model(make_model()))()
  scenes = render_scenes(range(2), 32, 32, seed=0)
  batch = {k: scenes[k] for k in ('image', 'label', 'depth')}
  train_step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  new, metrics = train_step(state, batch)
  new, metrics = train_step(new, batch)
  chex.clear_trace_counter()
  assert np.all(np.isfinite(metrics['task_losses'])) and np.all(np.isfinite(metrics['task_weights']))
  moved = [not np.array_equal(b, a) for b, a in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]
  assert any(m for m, s in zip(moved, steps.shared) if s) and any(m for m, s in zip(moved, steps.shared) if not s)
