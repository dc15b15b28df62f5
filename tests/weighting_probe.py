"""Trains a few steps with each weighting method on N fake CPU devices and saves the results.

Used by tests/test_weighting_methods.py in subprocesses (the device count is fixed at JAX
start-up):

  python tests/weighting_probe.py --devices 8 [--fsdp] --methods pcgrad,mgda --out result.npz

A tiny hard-shared SegNet with three tasks (and MTAN for `--model mtan`), float64 and plain SGD so
that the parameters after the steps differ across device counts only by the rounding of the
gradients (Adam's first step would turn rounding of zero gradients into +-lr).
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
  parser.add_argument('--methods', required=True)
  parser.add_argument('--model', default='segnet')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--out', required=True)
  args = parser.parse_args()
  jax.config.update('jax_num_cpu_devices', args.devices)
  # float64, as tests/sharded_probe.py: in float32 the cross-device sums round differently
  # (~1e-7), and ReLU zeros make max-pool windows near-ties that this rounding flips, which a
  # few SGD steps amplify to ~1e-2. In float64 the flips vanish.
  jax.config.update('jax_enable_x64', True)

  import chex  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtan_jax import sharding  # pylint: disable=g-import-not-at-top
  from mtan_jax.data.synthetic import render_scenes  # pylint: disable=g-import-not-at-top
  from mtan_jax.steps import Steps, create_model  # pylint: disable=g-import-not-at-top
  from mtan_jax.tasks import make_tasks  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == args.devices, jax.devices()
  keys = ('image', 'label', 'depth', 'normal')
  batch_size = 8
  tasks = make_tasks(('semantic', 'depth', 'normal'), 7)
  scenes = dict(render_scenes(range(batch_size * args.steps), 32, 32, seed=0))
  scenes['image'] = np.random.default_rng(0).uniform(0, 1, scenes['image'].shape)
  mesh = sharding.make_mesh()
  data = sharding.batch_sharding(mesh)
  out = {'devices': np.array(jax.device_count())}

  def make_model():
    return create_model(args.model, tasks, (4, 8, 8, 8, 8), seed=0, dtype='float64',
                        task_stacking='stacked')

  for method in args.methods.split(','):
    fixed_weights = (0.5, 0.3, 0.2) if method == 'fixed' else ()
    steps = Steps(nnx.eval_shape(make_model), optax.sgd(0.05), method, task_weights=fixed_weights, seed=3)
    shapes = jax.eval_shape(lambda: steps.state_from_model(make_model()))  # pylint: disable=cell-var-from-loop
    shardings = sharding.state_shardings(shapes, mesh, args.fsdp, fsdp_min_size=64)
    if args.fsdp:
      sharding.configure_fsdp(steps, shardings, mesh)
    state = sharding.init_state(steps, make_model, shardings)
    # One trace for all steps: the method's state and the step key never retrace.
    train_step = jax.jit(chex.assert_max_traces(steps.train_step, n=1),
                         in_shardings=(shardings, data), out_shardings=(shardings, None),
                         donate_argnums=0)
    weights, losses = [], []
    for i in range(args.steps):
      batch = {k: scenes[k][i * batch_size:(i + 1) * batch_size] for k in keys}
      state, metrics = train_step(state, sharding.global_batch(batch, data, (0, batch_size), batch_size))
      weights.append(sharding.to_host(metrics['task_weights']))
      losses.append(sharding.to_host(metrics['task_losses']))
    chex.clear_trace_counter()
    out[f'{method}/weights'] = np.stack(weights)
    out[f'{method}/losses'] = np.stack(losses)
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharding.to_host(state.params)):
      out[f'{method}/params{jax.tree_util.keystr(path)}'] = np.asarray(leaf)
  np.savez(args.out, **out)


if __name__ == '__main__':
  main()
