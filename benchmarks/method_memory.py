r"""Planned peak device memory of the train step per weighting method, from compilation alone.

Compiles (never runs) the project's MTAN train step at a given size for each method and
reads XLA's memory analysis of the executable: arguments + outputs + temporaries - donated
aliases, the memory the step holds at once. Compiling needs no accelerator, so this answers
"does method X fit at batch B on a card of N GB" on any machine, for the backend it runs on
(CPU plans can differ from GPU ones: different fusion, no cuDNN workspaces):

  python benchmarks/method_memory.py --workload nyuv2 --batch 8 \
      --methods equal,pcgrad,nash_mtl,db_mtl,pcgrad:sequential --out results/mem.json

`METHOD:sequential` uses `per_task_grads='sequential'` (one task's backward pass at a time).
This module does not import TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from mtan_jax.steps import Steps, create_model
from mtan_jax.tasks import make_tasks
from throughput import WORKLOADS  # pylint: disable=import-error
# pylint: enable=wrong-import-position

TARGET_KEYS = {'semantic': ('label', np.int32, ()), 'depth': ('depth', np.float32, (1,)),
               'normal': ('normal', np.float32, (3,))}


def planned_peak(workload, batch: int, method: str) -> dict[str, Any]:
  """XLA's memory analysis of the compiled train step for `method` ('name[:sequential]')."""
  name, _, mode = method.partition(':')
  tasks = make_tasks(workload.tasks, workload.num_classes)

  def make():
    return create_model('mtan', tasks, workload.widths, seed=0, task_stacking='stacked')

  steps = Steps(nnx.eval_shape(make), optax.adam(1e-4), name, per_task_grads=mode or 'vmap',
                task_weights=(1.0,) * len(tasks) if name == 'fixed' else ())
  state = jax.eval_shape(lambda: steps.state_from_model(make()))
  h, w = workload.height, workload.width
  batch_spec = {'image': jax.ShapeDtypeStruct((batch, h, w, 3), np.float32)}
  for task in workload.tasks:
    key, dtype, tail = TARGET_KEYS[task]
    batch_spec[key] = jax.ShapeDtypeStruct((batch, h, w) + tail, dtype)
  start = time.perf_counter()
  compiled = jax.jit(steps.train_step, donate_argnums=0).lower(state, batch_spec).compile()
  analysis = compiled.memory_analysis()
  peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
          + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  return {'peak_bytes': int(peak), 'argument_bytes': int(analysis.argument_size_in_bytes),
          'temp_bytes': int(analysis.temp_size_in_bytes),
          'compile_s': round(time.perf_counter() - start, 1)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workload', choices=sorted(WORKLOADS), default='cityscapes')
  parser.add_argument('--widths', type=lambda s: tuple(int(v) for v in s.split(',')), default=None,
                      help='override the workload widths (tests)')
  parser.add_argument('--height', type=int, default=None)
  parser.add_argument('--width', type=int, default=None)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--methods', default='equal,pcgrad,nash_mtl,db_mtl,pcgrad:sequential')
  parser.add_argument('--out', help='write the results as JSON here')
  args = parser.parse_args(argv)
  workload = WORKLOADS[args.workload]
  changes = {k: v for k, v in (('widths', args.widths), ('height', args.height), ('width', args.width)) if v}
  if changes:
    import dataclasses  # pylint: disable=g-import-not-at-top
    workload = dataclasses.replace(workload, **changes)
  rows = {}
  for method in args.methods.split(','):
    rows[method] = planned_peak(workload, args.batch, method)
    print(f'{workload.name} batch {args.batch} {method}: {rows[method]["peak_bytes"] / 2 ** 30:.2f} GiB '
          f'(compiled in {rows[method]["compile_s"]} s)', flush=True)
  result = {'workload': workload.name, 'tasks': list(workload.tasks), 'image': [workload.height, workload.width],
            'widths': list(workload.widths), 'batch': args.batch, 'backend': jax.default_backend(),
            'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__, 'methods': rows}
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
