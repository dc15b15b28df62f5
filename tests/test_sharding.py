"""Data parallelism: shardings, per-process rows, AOT-compiled steps, and equal results on 1, 2
and 8 devices (fake CPU devices in subprocesses, since the device count is fixed at start-up)."""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import REPO
from mtan_jax import sharding
from mtan_jax.steps import Steps, create_model
from mtan_jax.tasks import make_tasks

WIDTHS = (4, 8, 8, 8, 8)


def test_fsdp_spec_splits_the_largest_divisible_axis():
  assert sharding.fsdp_spec((3, 3, 64, 128), 8, min_size=1) == P(None, None, None, 'data')
  assert sharding.fsdp_spec((3, 3, 512, 12), 8, min_size=1) == P(None, None, 'data', None)
  # Equal sizes: the later (output-channel) axis.
  assert sharding.fsdp_spec((64, 64), 8, min_size=1) == P(None, 'data')
  # Too small, nothing divisible, or one device: replicated.
  assert sharding.fsdp_spec((512,), 8, min_size=1024) == P()
  assert sharding.fsdp_spec((3, 3, 3, 7), 2, min_size=1) == P()
  assert sharding.fsdp_spec((3, 3, 64, 128), 1, min_size=1) == P()


def _steps_and_shapes():
  tasks = make_tasks(('semantic', 'depth'), 7)
  make_model = lambda: create_model('mtan', tasks, WIDTHS, seed=0)
  steps = Steps(nnx.eval_shape(make_model), optax.adam(1e-3), 'dwa')
  return steps, make_model, jax.eval_shape(lambda: steps.state_from_model(make_model()))


def test_state_shardings_replicate_or_shard_every_array():
  steps, _, shapes = _steps_and_shapes()
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.size == jax.device_count()
  replicated = sharding.state_shardings(shapes, mesh)
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))
  # Adam's moments follow the parameters' layout.
  fsdp = sharding.state_shardings(shapes, mesh, fsdp=True, fsdp_min_size=1)
  params = jax.tree.leaves(fsdp.params)
  mu = jax.tree.leaves(fsdp.opt_state[0].mu)
  assert [s.spec for s in params] == [s.spec for s in mu]
  del steps


def test_process_rows_of_a_single_process_cover_the_batch():
  mesh = sharding.make_mesh()
  assert sharding.process_rows(sharding.batch_sharding(mesh), 4 * mesh.size) == (0, 4 * mesh.size)


def test_state_is_built_in_place_and_compiled_steps_reject_other_shapes():
  steps, make_model, shapes = _steps_and_shapes()
  mesh = sharding.make_mesh()
  shardings = sharding.state_shardings(shapes, mesh)
  state = sharding.init_state(steps, make_model, shardings)
  # The state built under jit is the eagerly built model's (XLA may fuse the initialiser's
  # scaling differently: last-bit differences).
  eager = nnx.split(make_model(), nnx.Param, nnx.BatchStat)[1]
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(eager)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  data = sharding.batch_sharding(mesh)
  spec = {'image': ((32, 64, 3), np.float32), 'label': ((32, 64), np.int32),
          'depth': ((32, 64, 1), np.float32)}
  compiled = sharding.compile_steps(steps, shapes, shardings, sharding.batch_spec(spec, 2, data),
                                    sharding.batch_spec({**spec, 'mask': ((), np.float32)}, 2, data), mesh)
  memory = compiled.memory['train_step']
  assert memory is not None and memory['temp'] > 0 and memory['argument'] > 0
  assert 'train_step: compiled in' in compiled.describe()
  rng = np.random.default_rng(0)
  batch = {'image': rng.uniform(size=(2, 32, 64, 3)).astype(np.float32),
           'label': rng.integers(0, 7, (2, 32, 64)).astype(np.int32),
           'depth': rng.uniform(0.1, 1, (2, 32, 64, 1)).astype(np.float32)}
  state, metrics = compiled.train_step(state, sharding.global_batch(batch, data, (0, 2), 2))
  assert np.isfinite(sharding.to_host(metrics['loss']))
  # A compiled executable never retraces: a batch of another size is an error, not a new compile.
  bigger = {k: np.concatenate([v, v]) for k, v in batch.items()}
  with pytest.raises((TypeError, ValueError)):
    compiled.train_step(state, sharding.global_batch(bigger, data, (0, 4), 4))


def _probe(tmp_path, devices, *extra):
  out = tmp_path / f'probe_{devices}{"_".join(extra).replace("-", "")}.npz'
  # XLA's optimisations on, as in training (conftest turns them off for speed): with them off,
  # one kernel entry of the 8-device FSDP run differed from the 1-device run by 7e-5 relative.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_DISABLE_MOST_OPTIMIZATIONS'}
  subprocess.run([sys.executable, os.path.join(REPO, 'tests', 'sharded_probe.py'), '--devices', str(devices),
                  '--out', str(out), *extra], check=True, capture_output=True, timeout=900,
                 cwd=REPO, env={**env, 'PYTHONPATH': REPO})
  return dict(np.load(out))


def assert_same_training(a, b):
  """Every parameter, statistic, weighting array and eval sum equal up to rounding."""
  for key in a:
    if not key.startswith(('params', 'batch_stats', 'weighting', 'eval', 'losses')):
      continue
    if key.endswith("['hist']"):
      # Angle histogram counts: an angle on a bin edge may land on either side.
      assert np.abs(a[key] - b[key]).sum() <= 4, key
      continue
    # Metric sums are accumulated in float32 whatever the compute dtype.
    rtol = 1e-5 if key.startswith('eval') else 2e-6
    np.testing.assert_allclose(b[key], a[key], rtol=rtol, atol=1e-7, err_msg=key)


@pytest.mark.slow
def test_training_is_the_same_on_1_2_and_8_devices_and_with_fsdp(tmp_path):
  """Three Adam steps, an epoch end and an eval step, computed in float64.

  float64, because in float32 the result is *not* bit-identical across device counts: the
  cross-device sums round differently (~1e-7), and Adam's first update, lr * g / (|g| + eps),
  turns that rounding in gradients that are zero in exact arithmetic (conv biases before
  BatchNorm) into +-lr. In float64 those gradients are ~1e-17, far below eps.
  """
  one = _probe(tmp_path, 1, '--dtype', 'float64')
  for devices, extra in ((2, ()), (8, ()), (8, ('--fsdp',))):
    other = _probe(tmp_path, devices, '--dtype', 'float64', *extra)
    assert int(other['devices']) == devices
    assert_same_training(one, other)
    shard = int(np.prod(other['kernel_shard_shape'])) * (devices if extra else 1)
    # Replicated: every device holds the whole kernel; FSDP: an eighth of it.
    assert shard == int(np.prod(one['kernel_shape']))
