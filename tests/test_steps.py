"""The jitted train step: it learns, it never retraces, and weights are data, not code."""

import chex
import jax
import numpy as np
import optax
import pytest

from mtan_jax.data.synthetic import render_scenes
from mtan_jax.steps import Steps, adam, create_model, lr_schedule, set_hyperparams
from mtan_jax.tasks import make_tasks
from mtan_jax.errors import ConfigError

WIDTHS = (4, 8, 8, 8, 8)


def _batch(n=4, h=32, w=64):
  scenes = render_scenes(range(n), h, w, seed=0)
  return {k: scenes[k] for k in ('image', 'label', 'depth', 'normal')}


def _steps(method, names=('semantic', 'depth', 'normal'), lr=3e-3):
  tasks = make_tasks(names, 7)
  model = create_model('mtan', tasks, WIDTHS, seed=0)
  return Steps(model, adam(lr), method)


@pytest.mark.parametrize('method', ['equal', 'dwa', 'uncertainty'])
def test_train_steps_lower_the_loss_on_a_fixed_batch(method):
  steps = _steps(method)
  train_step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  batch = jax.device_put(_batch())
  state = steps.init_state()
  losses = []
  for _ in range(12):
    state, metrics = train_step(state, batch)
    losses.append(np.asarray(metrics['task_losses']))
  losses = np.stack(losses)
  # Every task improves, not just the total.
  assert np.all(losses[-1] < losses[0]), losses[[0, -1]]
  assert int(state.step) == 12
  assert int(state.nonfinite_step) == -1
  chex.clear_trace_counter()


def test_changing_task_weights_and_epochs_never_retraces():
  steps = _steps('dwa')
  train_step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  end_epoch = jax.jit(chex.assert_max_traces(steps.end_epoch, n=1))
  batch = jax.device_put(_batch())
  state = steps.init_state()
  seen = []
  for _ in range(4):
    for _ in range(2):
      state, _ = train_step(state, batch)
    state = end_epoch(state)
    seen.append(np.asarray(state.weighting['weights']))
  # DWA moved the weights after two epochs, yet each function compiled exactly once.
  assert not np.allclose(seen[-1], 1.0)
  np.testing.assert_allclose(seen[-1].sum(), 3.0, rtol=1e-5)
  assert train_step._cache_size() == 1 and end_epoch._cache_size() == 1
  chex.clear_trace_counter()


def test_eval_step_uses_running_statistics_and_masks_padding():
  steps = _steps('equal')
  state = steps.init_state()
  batch = _batch()
  full = jax.jit(steps.eval_step)(state.params, state.batch_stats, {**batch, 'mask': np.ones(4, np.float32)})
  half = jax.jit(steps.eval_step)(state.params, state.batch_stats,
                                  {**batch, 'mask': np.array([1, 1, 0, 0], np.float32)})
  two = jax.jit(steps.eval_step)(state.params, state.batch_stats,
                                 {k: v[:2] for k, v in batch.items()} | {'mask': np.ones(2, np.float32)})
  np.testing.assert_allclose(half['semantic']['confusion'], two['semantic']['confusion'])
  np.testing.assert_allclose(half['depth']['abs_sum'], two['depth']['abs_sum'], rtol=1e-5)
  assert full['semantic']['confusion'].sum() > half['semantic']['confusion'].sum()
  # Evaluation does not touch BatchNorm statistics (they are not even an output).
  assert set(full) == {'semantic', 'depth', 'normal'}


def test_learning_rate_is_state_not_code():
  """Runs that differ only in their learning-rate schedule lower to the same program, and a
  rate written by `set_hyperparams` is the one the step uses: with Adam the first update
  moves every weight by about lr."""
  batch = jax.device_put(_batch())
  a, b = _steps('dwa', lr=1e-3), _steps('dwa', lr=0.5)
  b.tx = adam(0.5, decay_every_steps=10, decay_factor=0.1)
  lowered = [jax.jit(s.train_step).lower(s.init_state(), batch).as_text() for s in (a, b)]
  assert lowered[0] == lowered[1]

  train_step = jax.jit(chex.assert_max_traces(a.train_step, n=1))
  # Committed to the device, as a run's state is (set_hyperparams keeps each array's placement).
  state = jax.device_put(a.init_state(), jax.devices()[0])
  moved = {}
  for lr in (1e-3, 1e-2):
    start = state.replace(opt_state=set_hyperparams(state.opt_state, lr))
    new, _ = train_step(start, batch)
    kernel = lambda s: np.asarray(s.params['encoder_block'][1]['conv']['kernel'][...])
    moved[lr] = np.abs(kernel(new) - kernel(start)).max()
  assert moved[1e-3] == pytest.approx(1e-3, rel=0.05) and moved[1e-2] == pytest.approx(1e-2, rel=0.05)
  assert train_step._cache_size() == 1
  chex.clear_trace_counter()


def test_adam_with_steplr_is_torch_adam_with_steplr():
  """`adam` equals optax.adam on `lr_schedule` (torch's Adam + StepLR) step for step."""
  params = {'w': np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
  ours, theirs = adam(0.1, decay_every_steps=3, decay_factor=0.5), optax.adam(lr_schedule(0.1, 1, 3, 0.5))
  a, b = ours.init(params), theirs.init(params)
  for step in range(8):
    grads = {'w': np.cos(params['w'] * (step + 1))}
    ua, a = ours.update(grads, a, params)
    ub, b = theirs.update(grads, b, params)
    np.testing.assert_allclose(ua['w'], ub['w'], rtol=1e-6, err_msg=str(step))
  # lr 0.1 for steps 0-2, 0.05 for 3-5, 0.025 for 6-7: Adam's update is about lr in size.
  assert float(jax.numpy.abs(ua['w']).max()) < 0.03


def test_lr_schedule_is_torch_steplr():
  schedule = lr_schedule(1e-4, steps_per_epoch=10, decay_every_epochs=100, decay_factor=0.5)
  assert float(schedule(0)) == pytest.approx(1e-4)
  assert float(schedule(999)) == pytest.approx(1e-4)
  assert float(schedule(1000)) == pytest.approx(5e-5)
  assert float(schedule(1999)) == pytest.approx(5e-5)
  assert float(schedule(2000)) == pytest.approx(2.5e-5)


def test_uncertainty_needs_logsigma():
  tasks = make_tasks(('depth',), 7)
  model = create_model('segnet', tasks, WIDTHS, seed=0)
  with pytest.raises(ConfigError, match='uncertainty'):
    Steps(model, adam(1e-3), 'uncertainty')


def test_bfloat16_is_mixed_precision():
  """bf16 activations; float32 parameters, Adam state, BatchNorm statistics and losses."""
  tasks = make_tasks(('semantic', 'depth', 'normal'), 7)
  model = create_model('mtan', tasks, WIDTHS, seed=0, dtype='bfloat16')
  steps = Steps(model, adam(1e-3), 'uncertainty')
  state = steps.init_state()
  batch = jax.device_put(_batch())
  # Activations really are bf16 inside the network (shapes and dtypes only: nothing to run)...
  feats = jax.eval_shape(lambda p, s, x: steps.model(p, s, train=False).features(x),
                         state.params, state.batch_stats, batch['image'])
  assert feats.dec_last[-1].dtype == jax.numpy.bfloat16
  state, metrics = jax.jit(steps.train_step, donate_argnums=0)(state, batch)
  # ...while everything that is kept or reduced stays float32.
  for tree in (state.params, state.batch_stats, state.opt_state, state.weighting):
    for leaf in jax.tree.leaves(tree):
      if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
        assert leaf.dtype == jax.numpy.float32, leaf.dtype
  assert metrics['loss'].dtype == jax.numpy.float32
  assert metrics['task_losses'].dtype == jax.numpy.float32
  assert np.all(np.isfinite(np.asarray(metrics['task_losses'])))
  preds = jax.eval_shape(steps.predict, state.params, state.batch_stats, batch['image'])
  assert all(p.dtype == jax.numpy.float32 for p in preds)


def test_float64_needs_x64():
  tasks = make_tasks(('depth',), 7)
  if jax.config.jax_enable_x64:
    pytest.skip('x64 is on in this process')
  with pytest.raises(ConfigError, match='float64 needs 64-bit JAX'):
    create_model('mtan', tasks, WIDTHS, seed=0, dtype='float64')


def test_task_stacking_resolves_by_backend():
  from mtan_jax.steps import stack_tasks_for  # pylint: disable=g-import-not-at-top
  assert stack_tasks_for('auto', 'gpu') and stack_tasks_for('auto', 'tpu')
  assert not stack_tasks_for('auto', 'cpu')
  assert stack_tasks_for('stacked', 'cpu') and not stack_tasks_for('loop', 'gpu')
  with pytest.raises(ConfigError, match='config.task_stacking'):
    stack_tasks_for('fast')


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('mode', ['skip', 'stop'])
def test_a_nonfinite_step_is_not_applied_and_names_the_task(mode):
  tasks = make_tasks(('semantic', 'depth', 'normal'), 7)
  steps = Steps(create_model('mtan', tasks, WIDTHS, seed=0), adam(1e-3), 'dwa', nonfinite=mode)
  train_step = jax.jit(chex.assert_max_traces(steps.train_step, n=1))
  good = jax.device_put(_batch())
  bad = {**good, 'depth': good['depth'].at[0, 0, 0].set(np.nan)}  # only depth's loss breaks
  state, _ = train_step(steps.init_state(), good)
  after_bad, metrics = train_step(state, bad)
  assert not np.isfinite(float(metrics['task_losses'][1]))
  # Nothing but the step counter and the fault record moved.
  _assert_same((after_bad.params, after_bad.batch_stats, after_bad.opt_state, after_bad.weighting),
               (state.params, state.batch_stats, state.opt_state, state.weighting))
  assert (int(after_bad.step), int(after_bad.nonfinite_step), int(after_bad.nonfinite_task),
          int(after_bad.nonfinite_count)) == (2, 1, 1, 1)
  assert int(metrics['nonfinite_count']) == 1
  after_good, _ = train_step(after_bad, good)
  moved = not np.array_equal(np.asarray(jax.tree.leaves(after_good.params)[0]),
                             np.asarray(jax.tree.leaves(after_bad.params)[0]))
  # 'skip' goes on with the next batch; 'stop' freezes the state until the host stops the run.
  assert moved == (mode == 'skip')
  assert int(after_good.nonfinite_step) == 1 and int(after_good.nonfinite_count) == 1
  chex.clear_trace_counter()


def test_nonfinite_gradients_with_finite_losses_are_caught():
  tasks = make_tasks(('semantic', 'depth'), 7)
  steps = Steps(create_model('mtan', tasks, WIDTHS, seed=0), adam(1e-3), 'equal', nonfinite='skip')
  state = steps.init_state()
  # An Inf weight in the first convolution: with ReLU and BatchNorm the forward pass can stay
  # finite-looking in places, but its gradient does not; whatever breaks, nothing is applied.
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(np.inf)
  state = state.replace(params=jax.tree.unflatten(treedef, leaves))
  new, _ = jax.jit(steps.train_step)(state, jax.device_put(_batch()))
  assert int(new.nonfinite_count) == 1 and int(new.nonfinite_step) == 0
  _assert_same(new.params, state.params)


def test_per_task_gradient_norms_for_loss_based_methods_match_separate_gradients():
  tasks = make_tasks(('semantic', 'depth'), 7)
  steps = Steps(create_model('mtan', tasks, WIDTHS, seed=0), adam(1e-3), 'dwa')
  state = steps.init_state()
  batch = jax.device_put(_batch())
  norms = np.asarray(jax.jit(steps.task_grad_norms)(state.params, state.batch_stats, batch))

  @jax.jit
  def separate(params):
    """Each task's gradient from a backward pass of its own loss (one program for both)."""
    grads = [jax.grad(lambda p, k=k: steps._forward(p, state.batch_stats, batch)[0][k])(params)  # pylint: disable=protected-access
             for k in range(2)]
    return [steps.shared_params(g) for g in grads]

  for k, shared in enumerate(separate(state.params)):
    expected = np.sqrt(sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in shared))
    np.testing.assert_allclose(norms[k], expected, rtol=1e-4)
