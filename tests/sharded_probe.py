"""Runs a few sharded train steps on N fake CPU devices and saves what they produced.

Used by tests/test_sharding.py in a subprocess (the device count is fixed at JAX start-up):

  python tests/sharded_probe.py --devices 8 [--fsdp] [--dtype float64] --out result.npz
"""

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--devices', type=int, required=True)
  parser.add_argument('--fsdp', action='store_true')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  jax.config.update('jax_num_cpu_devices', args.devices)
  if args.dtype == 'float64':
    jax.config.update('jax_enable_x64', True)

  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtan_jax import sharding  # pylint: disable=g-import-not-at-top
  from mtan_jax.data.synthetic import render_scenes  # pylint: disable=g-import-not-at-top
  from mtan_jax.steps import Steps, create_model  # pylint: disable=g-import-not-at-top
  from mtan_jax.tasks import make_tasks  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == args.devices, jax.devices()
  keys = ('image', 'label', 'depth', 'normal')
  batch_size, num_steps = 8, args.steps
  tasks = make_tasks(('semantic', 'depth', 'normal'), 7)

  def make_model():
    # The task-stacked attention path (the accelerator default) must shard like the rest.
    return create_model('mtan', tasks, (4, 8, 8, 8, 8), seed=0, dtype=args.dtype, task_stacking='stacked')

  mesh = sharding.make_mesh()
  steps = Steps(nnx.eval_shape(make_model), optax.adam(1e-3), 'dwa')
  shapes = jax.eval_shape(lambda: steps.state_from_model(make_model()))
  # A tiny minimum size so that FSDP shards even this small model's kernels.
  shardings = sharding.state_shardings(shapes, mesh, args.fsdp, fsdp_min_size=64)
  if args.fsdp:
    sharding.configure_fsdp(steps, shardings, mesh)
  data = sharding.batch_sharding(mesh)
  scenes = dict(render_scenes(range(batch_size * num_steps), 32, 64, seed=0))
  # Noise images: the scenes' flat regions give max-pool windows with exactly equal values,
  # where rounding decides which position gets the gradient (PyTorch behaves the same).
  scenes['image'] = np.random.default_rng(0).uniform(0, 1, scenes['image'].shape).astype(np.float32)
  spec = {k: (scenes[k].shape[1:], scenes[k].dtype) for k in keys}
  compiled = sharding.compile_steps(
      steps, shapes, shardings, sharding.batch_spec(spec, batch_size, data),
      sharding.batch_spec({**spec, 'mask': ((), np.float32)}, batch_size, data), mesh)
  state = sharding.init_state(steps, make_model, shardings)
  losses = []
  for i in range(num_steps):
    batch = {k: scenes[k][i * batch_size:(i + 1) * batch_size] for k in keys}
    state, metrics = compiled.train_step(state, sharding.global_batch(batch, data, (0, batch_size), batch_size))
    losses.append(sharding.to_host(metrics['task_losses']))
  state = compiled.end_epoch(state)
  batch = {k: scenes[k][:batch_size] for k in keys}
  batch['mask'] = np.ones(batch_size, np.float32)
  stats = compiled.eval_step(state.params, state.batch_stats, sharding.global_batch(batch, data, (0, batch_size),
                                                                                     batch_size))
  # (3, 3, 4, 8): large enough and divisible by 8, so FSDP splits its output channels.
  kernel = state.params['encoder_block'][1]['conv']['kernel']
  out = {'losses': np.stack(losses), 'devices': jax.device_count(),
         'kernel_shape': np.array(kernel.shape),
         'kernel_shard_shape': np.array(kernel.addressable_shards[0].data.shape)}
  for prefix, tree in (('params', state.params), ('batch_stats', state.batch_stats),
                       ('weighting', state.weighting), ('eval', stats)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharding.to_host(tree)):
      out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  np.savez(args.out, **out)


if __name__ == '__main__':
  main()
