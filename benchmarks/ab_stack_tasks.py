"""A/B timing of MTAN's task-stacked attention path against the per-task loop.

Builds `MTAN(..., stack_tasks=True)` (A) and `MTAN(..., stack_tasks=False)` (B) from the same
seed, jits the project's train step for each (`mtan_jax.steps`, equal weighting,
`optax.adam(1e-4)`, float32), and times them on one random batch (`throughput.make_batch`)
in alternating windows A, B, A, B, ... so that load from other processes on a shared machine
hits both variants alike. Reports per variant: compile time (trace + lower + compile of the
train step), the median and range of images/s over windows, the A/B ratio, op counts of
the compiled HLO (a device-independent effect of the change), and per window how many CPU
cores other processes kept busy (/proc/stat minus this process), to judge contamination.

Run from the repository root:

  python benchmarks/ab_stack_tasks.py --workload tiny2 --workload tiny3 --out ab.json
  python benchmarks/ab_stack_tasks.py --workload wide --windows 3 --iters 1 --warmup 1

Workloads: tiny2 / tiny3 (widths 8,16,16,32,32 at 64x128, batch 8, semantic + depth
[+ normal]) and wide (full widths 64..512 at 64x128, batch 2, semantic + depth).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time

import jax
import optax
from flax import nnx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import Workload, make_batch  # pylint: disable=wrong-import-position
from mtan_jax import steps as mtan_steps  # pylint: disable=wrong-import-position
from mtan_jax.models.mtan import MTAN  # pylint: disable=wrong-import-position
from mtan_jax.tasks import make_tasks  # pylint: disable=wrong-import-position


TINY = (8, 16, 16, 32, 32)
FULL = (64, 128, 256, 512, 512)
# (workload, batch size): throughput.Workload carries the model and input shape.
WORKLOADS = {w.name: (w, b) for w, b in (
    (Workload('tiny2', ('semantic', 'depth'), 7, 64, 128, TINY), 8),
    (Workload('tiny3', ('semantic', 'depth', 'normal'), 7, 64, 128, TINY), 8),
    (Workload('wide', ('semantic', 'depth'), 7, 64, 128, FULL), 2),
)}
VARIANTS = {'stacked': True, 'loop': False}
# Opcodes that make no kernel and move no data of their own.
_FREE_OPS = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast'}
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.+?\s([a-z][a-z0-9\-]*)\(')


def hlo_op_counts(hlo_text: str) -> dict[str, int]:
  """Counts of ops in compiled HLO text.

  Returns:
    'entry_ops': instructions of the entry computation other than parameters, constants,
    tuples and bitcasts, i.e. roughly the kernels (GPU) / thunks (CPU) a step runs;
    'entry_<op>' for fusion, convolution, dot, custom-call, copy and transpose in the entry
    computation; 'all_convolution' / 'all_dot' counted in every computation (fused ones
    included).
  """
  entry = collections.Counter()
  everywhere = collections.Counter()
  in_entry = False
  for line in hlo_text.splitlines():
    if line.startswith('ENTRY '):
      in_entry = True
      continue
    if line.startswith('}'):
      in_entry = False
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    op = match.group(1)
    everywhere[op] += 1
    if in_entry:
      entry[op] += 1
  counts = {'entry_ops': sum(n for op, n in entry.items() if op not in _FREE_OPS)}
  for op in ('fusion', 'convolution', 'dot', 'custom-call', 'copy', 'transpose'):
    counts[f'entry_{op}'] = entry[op]
  counts['all_convolution'] = everywhere['convolution']
  counts['all_dot'] = everywhere['dot']
  return counts


def _cpu_seconds() -> tuple[float, float]:
  """(busy CPU seconds of the whole machine from /proc/stat, CPU seconds of this process)."""
  with open('/proc/stat') as f:
    fields = [int(v) for v in f.readline().split()[1:]]
  idle = fields[3] + fields[4]  # idle + iowait
  own = os.times()
  return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK'), own.user + own.system


class Variant:
  """One compiled train step (A or B) with its own donated state."""

  def __init__(self, workload: Workload, batch, stack_tasks: bool):
    tasks = make_tasks(workload.tasks, workload.num_classes)
    model = MTAN(tasks, workload.widths, rngs=nnx.Rngs(0), stack_tasks=stack_tasks)
    steps = mtan_steps.Steps(model, optax.adam(1e-4), 'equal')
    train_step = mtan_steps.jit_steps(steps)[0]
    self.state = steps.init_state()
    self.batch = batch
    start = time.perf_counter()
    self.compiled = train_step.lower(self.state, batch).compile()
    self.compile_s = time.perf_counter() - start
    self.hlo = hlo_op_counts(self.compiled.as_text())

  def run(self, iters: int) -> tuple[float, float]:
    """Runs `iters` steps; returns (seconds until the last one finished, CPU cores that other
    processes kept busy meanwhile, on average)."""
    busy0, own0 = _cpu_seconds()
    start = time.perf_counter()
    metrics = None
    for _ in range(iters):
      self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))
    seconds = time.perf_counter() - start
    busy1, own1 = _cpu_seconds()
    return seconds, max(0.0, (busy1 - busy0) - (own1 - own0)) / seconds


def measure(name: str, windows: int, iters: int, warmup: int) -> dict:
  """Builds both variants of workload `name` and times them in alternating windows."""
  workload, batch_size = WORKLOADS[name]
  batch = jax.device_put(make_batch(workload, batch_size))
  variants = {key: Variant(workload, batch, flag) for key, flag in VARIANTS.items()}
  for variant in variants.values():
    variant.run(warmup)
  rates = {key: [] for key in variants}
  others = {key: [] for key in variants}
  for _ in range(windows):
    for key, variant in variants.items():
      seconds, other = variant.run(iters)
      rates[key].append(batch_size * iters / seconds)
      others[key].append(other)
  result = {'workload': name, 'tasks': list(workload.tasks), 'widths': list(workload.widths),
            'height': workload.height, 'width': workload.width, 'batch_size': batch_size,
            'windows': windows, 'iters': iters, 'warmup': warmup}
  for key, variant in variants.items():
    result[key] = {'median_images_per_s': statistics.median(rates[key]),
                   'window_images_per_s': rates[key],
                   'window_other_processes_cpu_cores': others[key], 'compile_s': variant.compile_s,
                   'hlo': variant.hlo}
  result['speedup_stacked_over_loop'] = (result['stacked']['median_images_per_s']
                                         / result['loop']['median_images_per_s'])
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workload', action='append', choices=sorted(WORKLOADS),
                      help='repeatable; default: tiny2 and tiny3')
  parser.add_argument('--windows', type=int, default=7, help='timed windows per variant')
  parser.add_argument('--iters', type=int, default=10, help='train steps per window')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps after compiling')
  parser.add_argument('--out', help='write all results to this JSON file')
  args = parser.parse_args(argv)
  print(f'jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs', flush=True)
  results = []
  for name in args.workload or ['tiny2', 'tiny3']:
    r = measure(name, args.windows, args.iters, args.warmup)
    results.append(r)
    for key in VARIANTS:
      v = r[key]
      window = ', '.join(f'{x:.2f}' for x in v['window_images_per_s'])
      other = max(v['window_other_processes_cpu_cores'])
      print(f"{name} {key:7s}: median {v['median_images_per_s']:.3f} images/s "
            f"(windows: {window}; other processes up to {other:.2f} cores); "
            f"compile {v['compile_s']:.1f} s; HLO {v['hlo']}", flush=True)
    print(f"{name} stacked / loop: {r['speedup_stacked_over_loop']:.3f}x", flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'command': ' '.join(sys.argv), 'jax': jax.__version__,
                 'device': str(jax.devices()[0].device_kind), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
