"""Checkpointer: round trips of the whole train state, and clear errors on mismatch."""

import jax
import numpy as np
import optax
import pytest

from mtan_jax.checkpointing import Checkpointer, abstract_like
from mtan_jax.errors import DataError
from mtan_jax.steps import Steps, create_model
from mtan_jax.tasks import make_tasks


def _state(tasks=('semantic', 'depth')):
  model = create_model('mtan', make_tasks(tasks, 7), (4, 8, 8, 8, 8), seed=0)
  return Steps(model, optax.adam(1e-3), 'dwa').init_state()


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
    ckpt.restore(abstract_like(_state(('semantic', 'depth', 'normal'))))
  assert '\n' not in str(info.value)
  ckpt.close()
