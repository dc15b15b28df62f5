"""Checkpointer: round trips of the whole train state, and clear errors on mismatch."""

import functools
import os

import jax
import numpy as np
import pytest
from flax import nnx

from mtan_jax.checkpointing import Checkpointer, abstract_like
from mtan_jax.errors import DataError
from mtan_jax.steps import Steps, adam, create_model
from mtan_jax.tasks import make_tasks


@functools.cache
def _state(tasks=('semantic', 'depth')):
  """A whole train state (built once, under one jit: eager initialisation compiles op by op)."""
  make_model = lambda: create_model('mtan', make_tasks(tasks, 7), (4, 8, 8, 8, 8), seed=0)
  steps = Steps(nnx.eval_shape(make_model), adam(1e-3), 'dwa')
  return jax.jit(lambda: steps.state_from_model(make_model()))()


def _abstract(tasks=('semantic', 'depth')):
  """The state's shapes without building it."""
  make_model = lambda: create_model('mtan', make_tasks(tasks, 7), (4, 8, 8, 8, 8), seed=0)
  steps = Steps(nnx.eval_shape(make_model), adam(1e-3), 'dwa')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                      jax.eval_shape(lambda: steps.state_from_model(make_model())))


def test_round_trip_is_exact_and_keeps_meta(tmp_path):
  state = _state()
  state = state.replace(step=state.step + 7)
  ckpt = Checkpointer(str(tmp_path), max_to_keep=2)
  ckpt.save(7, state, {'data': {'seed': 0}, 'history': [{'epoch': 1}]})
  ckpt.save(9, state, {'data': {'seed': 0}, 'history': []})
  ckpt.save(11, state, {'data': {'seed': 0}, 'history': []})
  ckpt.wait()
  assert ckpt.latest_step() == 11
  restored, meta = ckpt.restore(abstract_like(_state()), step=9)
  assert meta == {'data': {'seed': 0}, 'history': []}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(Exception):
    ckpt.restore(abstract_like(_state()), step=7)  # pruned by max_to_keep=2
  ckpt.close()


def test_restoring_into_another_model_is_one_clear_line(tmp_path):
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(), {'data': {}, 'history': []})
  with pytest.raises(DataError, match='does not match this model') as info:
    ckpt.restore(_abstract(('semantic', 'depth', 'normal')))
  assert '\n' not in str(info.value)
  ckpt.close()


def _corrupt(step_dir):
  """Truncates every array data file of a checkpoint, as a damaged disk would."""
  hit = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      if os.sep + 'd' + os.sep in path or name.startswith('manifest'):
        with open(path, 'r+b') as f:
          f.truncate(max(os.path.getsize(path) // 3, 1))
        hit += 1
  assert hit, f'no data files found under {step_dir}'


def test_an_unreadable_newest_checkpoint_is_reported_moved_aside_and_the_previous_used(tmp_path):
  state = _state()
  ckpt = Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, state.replace(step=state.step + step), {'data': {}, 'history': [step]})
  _corrupt(tmp_path / 'checkpoints' / '3')
  restored, meta, warnings = ckpt.restore_newest_readable(abstract_like(_state()))
  assert int(restored.step) == 2 and meta['history'] == [2]
  assert len(warnings) == 1 and 'checkpoint step 3' in warnings[0] and '\n' not in warnings[0]
  moved = [d for d in os.listdir(tmp_path / 'checkpoints') if d.startswith('unreadable_3_')]
  assert moved and ckpt.latest_step() == 2
  # The run can write step 3 again.
  ckpt.save(3, state, {'data': {}, 'history': []})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  ckpt.close()


def test_no_readable_checkpoint_and_another_model_are_one_line(tmp_path):
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, _state(), {'data': {}, 'history': []})
  with pytest.raises(DataError, match='does not match this model'):
    ckpt.restore_newest_readable(_abstract(('semantic', 'depth', 'normal')))
  assert ckpt.latest_step() == 1  # a mismatch is not damage: nothing is moved
  _corrupt(tmp_path / 'checkpoints' / '1')
  with pytest.raises(DataError, match='no readable checkpoint') as info:
    ckpt.restore_newest_readable(abstract_like(_state()))
  assert '\n' not in str(info.value)
  ckpt.close()
