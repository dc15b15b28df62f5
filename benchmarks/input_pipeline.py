"""Images/s of the tf.data input pipeline alone (no model), per workload and CPU core count.

Every workload runs `mtan_jax.data.pipeline.train_batches` exactly as training does (load
in `tf.numpy_function`, the source's `decode`, augmentation and self-supervised targets in
the parallel map, batching, prefetch, numpy batches out) and only consumes the batches:

- `npy_cityscapes`: the MTAN authors' npy layout at 128x256 (`NpyDataset`, semantic
  label_7 + depth);
- `tfds_cityscapes`: our TFDS `cityscapes_mtan/128x256` (`CityscapesTfdsSource`, same
  targets);
- `pets_aux`: Oxford-IIIT Pet at 256x256 with every target: semantic, species, bbox, plus
  Canny edges, colorization (Lab) and denoising (Gaussian noise);
- `pets_aux_augment`: `pets_aux` with the random scale-crop + flip;
- `synthetic`: `SyntheticSource` 128x256 (semantic, depth, normal), measured after its
  in-memory cache is warm, so the rate excludes rendering.

Without `--data-dir-npy` / `--data-dir-tfds`, small fake copies in the real formats are
generated into a temporary directory (`mtan_jax.data.fake_data`: raw Cityscapes PNGs ->
the real `cityscapes_mtan` builder -> npy layout; pet JPEGs of about 500x375 -> TFDS's own
`oxford_iiit_pet` builder), and the measurement repeats epochs over them.

Each core count runs in its own worker process whose CPU affinity is restricted
(`os.sched_setaffinity`, like `taskset`) before anything is imported: TensorFlow sizes its
inter-op pool (where tf.data's parallel map runs) and tf.data's autotuning budget from the
schedulable CPUs, so the restriction has to be in place before TensorFlow starts. The worker
checks that TensorFlow's pool has as many threads as the mask has CPUs.

Timing per (workload, cores): a few untimed warm-up batches, then batches for `--seconds`
of timed time. Two steps paid once per epoch are left out of the rate and reported on their
own, in seconds per epoch: `train_batches()` itself (building and tracing the epoch's
tf.data graph) and the `next()` that finds the epoch exhausted (it deletes the spent tf.data
iterator, which can block for seconds with no CPU in use). A fake data set of a few batches
per epoch would pay them many times more often than a real one (Cityscapes: 92 batches of
32 per epoch), so the JSON also gives the rate with them included at this data set's epoch
length (`images_per_s_with_epoch_overheads`). Everything else, including each new epoch's
pipeline filling up, is timed. The goal column is the rate over 1,200 images/s, the fastest
training step expected on one H100 at 128x256.

A per-stage profile (`--stages`, on by default) times each stage of the selected
workloads alone on one core (record read, JPEG decode, resize, Canny, Lab, ...), in ms per
image; the full one-core pipeline's cost minus their sum estimates tf.data's own share
(hand-offs, casts, batching, copies; it can come out negative, since the separate calls each
pay a function dispatch that the fused map does not).

Run from the repository root, e.g. `python benchmarks/input_pipeline.py --cores 1,2`; see
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)
GOAL_IMAGES_PER_S = 1200.0
GOAL_NOTE = ('1,200 images/s: the fastest training step expected on one H100 at 128x256; the '
             'goal is for a 16-core host')
# Data seed of every run: the order and random augmentation are fixed by it.
SEED = 0
# TensorFlow's inter-op thread pool (tf.data's parallel map runs there) names its threads so.
TF_POOL_THREAD_NAME = 'tf_Compute'


@dataclasses.dataclass(frozen=True)
class Workload:
  """One input pipeline configuration.

  Attributes:
    name: workload name (a key of WORKLOADS).
    dataset: 'npy_cityscapes', 'tfds_cityscapes', 'pets' or 'synthetic'.
    image_size: (H, W) of the batches.
    keys: arrays each batch carries.
    transforms: keyword arguments of `mtan_jax.data.pipeline.Transforms`.
    description: one line for the output.
  """
  name: str
  dataset: str
  image_size: tuple[int, int]
  keys: tuple[str, ...]
  transforms: tuple[tuple[str, Any], ...]
  description: str


_PETS_KEYS = ('image', 'label', 'species', 'bbox', 'edges', 'ab', 'clean')
_PETS_TASKS = ('semantic', 'species', 'bbox', 'edges', 'colorization', 'denoising')
_AUX = (('edges', True), ('colorization', True), ('denoising', True))
WORKLOADS = {w.name: w for w in (
    Workload('npy_cityscapes', 'npy_cityscapes', (128, 256), ('image', 'label', 'depth'), (),
             'MTAN npy layout 128x256, semantic label_7 + depth'),
    Workload('tfds_cityscapes', 'tfds_cityscapes', (128, 256), ('image', 'label', 'depth'), (),
             'TFDS cityscapes_mtan/128x256, semantic label_7 + depth'),
    Workload('pets_aux', 'pets', (256, 256), _PETS_KEYS, _AUX,
             'Oxford-IIIT Pet 256x256: semantic, species, bbox + edges, colorization, denoising'),
    Workload('pets_aux_augment', 'pets', (256, 256), _PETS_KEYS, _AUX + (('augment', True),),
             'pets_aux + random scale-crop and flip'),
    Workload('synthetic', 'synthetic', (128, 256), ('image', 'label', 'depth', 'normal'), (),
             'SyntheticSource 128x256, semantic + depth + normal, cache warm'),
)}
# Fake examples generated per data set when no real copy is given.
DEFAULT_NUM_EXAMPLES = {'cityscapes': 256, 'pets': 128, 'synthetic': 256}
# Raw sizes of the fake data: real pet photos are about 500x375, so JPEG decoding costs what
# it does on the real data; Cityscapes' TFDS and npy copies are stored at 128x256 whatever
# the raw size, which only sets how long preparing them takes (real raw: 1024x2048).
PETS_RAW_SIZE = (375, 500)
CITYSCAPES_RAW_SIZE = (256, 512)


def _family(dataset: str) -> str:
  return 'cityscapes' if dataset.endswith('cityscapes') else dataset


# ----------------------------------------------------------------------------------------
# Machine facts
# ----------------------------------------------------------------------------------------

def affinity_cpus() -> list[int]:
  """CPUs this process may run on (the affinity mask, which containers restrict)."""
  if hasattr(os, 'sched_getaffinity'):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def _version(*names: str) -> str | None:
  """Installed version of the first distribution found among `names`, without importing it."""
  for name in names:
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  return None


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _busy_seconds(cpus: Sequence[int]) -> float | None:
  """CPU seconds `cpus` have spent busy since boot (Linux /proc/stat), or None elsewhere.

  Minus this process's own CPU time it tells how much other processes competed for the
  CPUs the pipeline was allowed to use, which on a shared machine moves the numbers a lot.
  """
  wanted = {f'cpu{c}' for c in cpus}
  busy = 0
  try:
    with open('/proc/stat', encoding='utf-8') as f:
      for line in f:
        fields = line.split()
        if fields and fields[0] in wanted:
          jiffies = [int(v) for v in fields[1:9]]
          # user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
          busy += sum(jiffies) - jiffies[3] - jiffies[4]
  except (OSError, ValueError):
    return None
  return busy / os.sysconf('SC_CLK_TCK')


def _thread_names() -> dict[str, int]:
  """Thread name -> count for this process (Linux), e.g. TensorFlow's pool threads."""
  counts: dict[str, int] = {}
  try:
    for tid in os.listdir('/proc/self/task'):
      with open(f'/proc/self/task/{tid}/comm', encoding='utf-8') as f:
        name = f.read().strip()
      counts[name] = counts.get(name, 0) + 1
  except OSError:
    return {}
  return counts


def machine_info(argv: Sequence[str]) -> dict[str, Any]:
  """What the numbers depend on: CPUs, load, versions, commit, command."""
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = None
  cpus = affinity_cpus()
  return {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': shlex.join(['python', 'benchmarks/input_pipeline.py', *argv]),
      'git_commit': commit,
      'os_cpu_count': os.cpu_count(),
      'affinity_cpu_count': len(cpus),
      'affinity_cpus': cpus,
      'cpu_model': _cpu_model(),
      'load_average_1_5_15_before': list(os.getloadavg()),
      'python': platform.python_version(),
      'platform': platform.platform(),
      'versions': {
          'tensorflow': _version('tensorflow', 'tensorflow-cpu', 'tf-nightly'),
          'tensorflow_datasets': _version('tensorflow-datasets', 'tfds-nightly'),
          'array_record': _version('array-record', 'array_record'),
          'numpy': _version('numpy'),
      },
  }


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------

def _use_this_checkout() -> None:
  # Measure this checkout's mtan_jax, also when the script runs as `python benchmarks/...`
  # (which puts benchmarks/, not the repository, on the path) or another copy is installed.
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def prepare_fake_data(workloads: Sequence[Workload], num_examples: dict[str, int],
                      root: str) -> dict[str, str]:
  """Generates the fake data sets the workloads need under `root`.

  Returns:
    {'npy': npy layout root, 'tfds': TFDS data dir} for what was generated.
  """
  _use_this_checkout()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from mtan_jax.data import fake_data  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()
  datasets = {w.dataset for w in workloads}
  dirs = {}
  tfds_dir = os.path.join(root, 'tfds')
  # TFDS prints its "Downloading and preparing" banners on stdout; keep the table readable.
  quiet = contextlib.redirect_stdout(io.StringIO())
  if datasets & {'npy_cityscapes', 'tfds_cityscapes'}:
    from mtan_jax.data import cityscapes_tfds  # pylint: disable=import-outside-toplevel
    n = num_examples['cityscapes']
    start = time.perf_counter()
    raw = fake_data.write_cityscapes_raw(os.path.join(root, 'cityscapes_raw'), n, 2, seed=SEED,
                                         size=CITYSCAPES_RAW_SIZE)
    with quiet:
      cityscapes_tfds.prepare_dataset(raw, tfds_dir, '128x256')
    dirs['tfds'] = tfds_dir
    if 'npy_cityscapes' in datasets:
      dirs['npy'] = os.path.join(root, 'cityscapes_npy')
      cityscapes_tfds.write_npy_layout(tfds_dir, dirs['npy'], '128x256')
    print(f'  fake Cityscapes: {n} train examples (raw {CITYSCAPES_RAW_SIZE[0]}x'
          f'{CITYSCAPES_RAW_SIZE[1]} PNGs -> cityscapes_mtan/128x256'
          f'{" -> npy layout" if "npy" in dirs else ""}) in {time.perf_counter() - start:.1f} s',
          flush=True)
  if 'pets' in datasets:
    n = num_examples['pets']
    start = time.perf_counter()
    raw = fake_data.write_pets_raw(os.path.join(root, 'pets_raw'), n, 2, seed=SEED,
                                   size=PETS_RAW_SIZE)
    with quiet:
      fake_data.build_pets(raw, tfds_dir)
    dirs['tfds'] = tfds_dir
    print(f'  fake Oxford-IIIT Pet: {n} train examples (JPEGs about {PETS_RAW_SIZE[1]}x'
          f'{PETS_RAW_SIZE[0]} -> oxford_iiit_pet array_record) in '
          f'{time.perf_counter() - start:.1f} s', flush=True)
  return dirs


def open_source(workload: Workload, data: dict[str, str], num_examples: dict[str, int]):
  """The indexable source of `workload` (imports TensorFlow for the TFDS ones)."""
  _use_this_checkout()
  # pylint: disable=import-outside-toplevel
  if workload.dataset == 'npy_cityscapes':
    from mtan_jax.data.npy import NpyDataset
    return NpyDataset(data['npy'], 'train', 'cityscapes', label_dir='label_7',
                      tasks=('semantic', 'depth'), num_classes=7)
  if workload.dataset == 'tfds_cityscapes':
    from mtan_jax.data.cityscapes_tfds import CityscapesTfdsSource
    return CityscapesTfdsSource(data['tfds'], 'train', '128x256', 'label_7',
                                ('semantic', 'depth'))
  if workload.dataset == 'pets':
    from mtan_jax.data.pets import PetsSource
    return PetsSource(data['tfds'], 'train', workload.image_size, _PETS_TASKS)
  from mtan_jax.data.pipeline import SyntheticSource
  return SyntheticSource(num_examples['synthetic'], *workload.image_size, seed=SEED)
  # pylint: enable=import-outside-toplevel


# ----------------------------------------------------------------------------------------
# Measurement (worker process)
# ----------------------------------------------------------------------------------------

def measure(workload: Workload, source, batch_size: int, seconds: float,
            warmup: int, cpus: Sequence[int]) -> dict[str, Any]:
  """Images/s of `train_batches` over `source`, epoch after epoch (see the module docstring).

  Two per-epoch costs are kept out of the rate and reported on their own, in seconds per
  epoch, so that they can be weighed against a real epoch's length: building the epoch's
  tf.data graph (`train_batches()` itself) and ending it (the `next()` that finds the epoch
  exhausted, where the spent tf.data iterator is deleted).
  """
  # pylint: disable=import-outside-toplevel
  from mtan_jax.data.pipeline import Transforms, example_shape, train_batches
  from mtan_jax.errors import DataError
  # pylint: enable=import-outside-toplevel
  if len(source) < batch_size:
    raise DataError(f'{workload.name}: {len(source)} examples, fewer than --batch-size '
                    f'{batch_size}; an epoch would have no batch')
  transforms = Transforms(**dict(workload.transforms))
  overheads: dict[str, list[float]] = {'setup': [], 'end': []}
  # Wall and CPU seconds spent in those per-epoch steps, subtracted from the timed window.
  excluded = [0.0, 0.0]

  def exclude(kind: str, wall0: float, cpu0: float) -> None:
    wall = time.perf_counter() - wall0
    overheads[kind].append(wall)
    excluded[0] += wall
    excluded[1] += time.process_time() - cpu0

  def batches():
    epoch = 0
    while True:
      wall0, cpu0 = time.perf_counter(), time.process_time()
      epoch_batches = train_batches(source, workload.keys, batch_size, epoch, SEED,
                                    transforms=transforms)
      exclude('setup', wall0, cpu0)
      while True:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
          batch = next(epoch_batches)
        except StopIteration:
          exclude('end', wall0, cpu0)
          break
        yield batch
      epoch += 1

  stream = batches()
  first = next(stream)
  h, w = workload.image_size
  for key in workload.keys:
    want = (batch_size, *example_shape(key, h, w, transforms.image_channels))
    if first[key].shape != want:
      raise DataError(f'{workload.name}: batch[{key!r}] has shape {first[key].shape}, '
                      f'expected {want}')
  for _ in range(warmup - 1):
    next(stream)
  excluded_before = list(excluded)
  epochs_before = len(overheads['setup'])
  busy, own = _busy_seconds(cpus), time.process_time()
  start = time.perf_counter()
  count = 0
  while True:
    next(stream)
    count += 1
    timed = time.perf_counter() - start - (excluded[0] - excluded_before[0])
    if timed >= seconds:
      break
  wall = time.perf_counter() - start
  own_cpu = time.process_time() - own
  other = None
  if busy is not None:
    other = max(0.0, (_busy_seconds(cpus) - busy) - own_cpu) / wall
  images_per_s = count * batch_size / timed
  batches_per_epoch = len(source) // batch_size
  # Means, not medians: the end-of-epoch stall comes in some epochs only, and every epoch
  # pays its expected value.
  per_epoch = _setup_mean(overheads['setup']) + _mean(overheads['end'])
  return {
      'images_per_s': images_per_s,
      'ms_per_batch': 1000.0 * timed / count,
      'ratio_to_goal': images_per_s / GOAL_IMAGES_PER_S,
      'batches': count,
      'timed_s': timed,
      'window_wall_s': wall,
      'epochs_started_while_timed': len(overheads['setup']) - epochs_before,
      'batches_per_epoch': batches_per_epoch,
      'epoch_setup_s': overheads['setup'],
      'epoch_end_s': overheads['end'],
      'epoch_overhead_s_mean': per_epoch,
      # The rate a run would see with epochs of this data set's length, overheads included.
      'images_per_s_with_epoch_overheads': (
          batches_per_epoch * batch_size / (batches_per_epoch * timed / count + per_epoch)),
      'warmup_batches': warmup,
      # The pipeline's own CPU use while batches were timed (overhead steps left out).
      'process_cpu_cores': (own_cpu - (excluded[1] - excluded_before[1])) / timed,
      'other_processes_cpu_cores': other,
      'num_examples': len(source),
  }


def _time_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], budget_s: float,
                min_calls: int = 3) -> dict[str, Any]:
  """Median wall time of `fn(x)` over `inputs` in turn, after one untimed call (tracing)."""
  fn(inputs[0])
  times = []
  deadline = time.perf_counter() + budget_s
  while len(times) < min_calls or time.perf_counter() < deadline:
    x = inputs[len(times) % len(inputs)]
    start = time.perf_counter()
    fn(x)
    times.append(time.perf_counter() - start)
  return {'ms_per_image': 1000.0 * statistics.median(times), 'calls': len(times)}


def profile_stages(workload: Workload, source, budget_s: float,
                   cache: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
  """Per-image cost of each stage of `workload` alone, one call at a time (one core).

  TensorFlow stages run as `tf.function`s on tensors the previous stages made, so each
  figure includes one function call's dispatch (tens of microseconds); `cache` shares the
  stages that two workloads have in common.
  """
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import tensorflow as tf
  from mtan_jax.data import aux_targets
  from mtan_jax.data.pipeline import Transforms
  # pylint: enable=import-outside-toplevel
  transforms = Transforms(**dict(workload.transforms))
  indices = list(range(min(len(source), 16)))
  stages: list[tuple[str, Callable[[], dict[str, Any]]]] = []

  def python_read(name, fn):
    stages.append((name, lambda: _time_calls(fn, indices, budget_s)))

  if workload.dataset == 'npy_cityscapes':
    dirs = {key: os.path.join(os.fspath(source.root), source.split, sub)
            for key, sub in (('image', 'image'), ('label', source.label_dir), ('depth', 'depth'))}
    load = lambda i: [np.load(os.path.join(d, f'{i}.npy')) for d in dirs.values()]
    loads = 'np.load x3 (image, label_7, depth), in numpy_function'
    python_read(loads, load)

    def checks():
      # NpyDataset[i] is np.load plus checks; the stages must not count the loads twice.
      timing = _time_calls(lambda i: source[i], indices, budget_s)
      return {**timing, 'ms_per_image': timing['ms_per_image'] - cache[loads]['ms_per_image']}
    stages.append(('NpyDataset value checks and casts (NpyDataset[i] minus the np.load x3)',
                   checks))
  elif workload.dataset == 'tfds_cityscapes':
    python_read('CityscapesTfdsSource[i] (array_record read, bytes to arrays), in '
                'numpy_function', lambda i: source[i])
  elif workload.dataset == 'synthetic':
    python_read('SyntheticSource[i] (cached scene), in numpy_function', lambda i: source[i])
  else:
    h, w = workload.image_size
    python_read('PetsSource[i] (array_record read, JPEG + PNG kept encoded), in numpy_function',
                lambda i: source[i])
    raws = [source[i] for i in indices]
    jpegs = [tf.constant(r['image']) for r in raws]
    decode_jpeg = tf.function(
        lambda b: tf.io.decode_image(b, channels=3, expand_animations=False))
    decoded = [decode_jpeg(b) for b in jpegs]
    resize = tf.function(lambda x: tf.clip_by_value(tf.image.resize(
        tf.image.convert_image_dtype(x, tf.float32), (h, w), antialias=True), 0.0, 1.0))
    images = [resize(x) for x in decoded]
    sizes = sorted({tuple(int(d) for d in x.shape[:2]) for x in decoded})
    trimap = tf.function(lambda b: tf.gather(
        tf.constant((-1, 1, 0, -1), tf.int32),
        tf.minimum(tf.cast(tf.image.resize(tf.io.decode_png(b, channels=1), (h, w),
                                           method='nearest')[..., 0], tf.int32), 3)))
    seed = tf.constant([SEED, 1], tf.int64)
    stages.append((f'decode JPEG ({sizes[0][1]}x{sizes[0][0]} .. {sizes[-1][1]}x{sizes[-1][0]})',
                   lambda: _time_calls(decode_jpeg, jpegs, budget_s)))
    stages.append((f'uint8 -> float, antialiased bilinear resize to {w}x{h}',
                   lambda: _time_calls(resize, decoded, budget_s)))
    stages.append(('trimap: decode PNG, nearest resize, labels',
                   lambda: _time_calls(trimap, [tf.constant(r['segmentation_mask'])
                                                for r in raws], budget_s)))
    if transforms.augment:
      # pylint: disable-next=import-outside-toplevel
      from mtan_jax.data import augment
      examples = [source.decode({k: tf.constant(v) for k, v in r.items()}) for r in raws]
      crop = tf.function(lambda e: augment.augment(e, seed, scales=transforms.scales,
                                                   flip=transforms.flip))
      stages.append(('augment: random scale-crop + flip (image, label, bbox)',
                     lambda: _time_calls(crop, examples, budget_s)))
    canny = tf.function(lambda x: aux_targets.canny_edges(
        x, sigma=transforms.edge_sigma, low=transforms.edge_low, high=transforms.edge_high))
    stages.append(('Canny edges (blur, Sobel, NMS, hysteresis loop)',
                   lambda: _time_calls(canny, images, budget_s)))
    lab = tf.function(lambda x: aux_targets.colorization(x))
    # The pipeline converts twice: the clean image (ab target) and the noisy one (L input).
    stages.append(('RGB -> Lab, x2 (ab target of the clean image, L of the noisy one)',
                   lambda: _twice(_time_calls(lab, images, budget_s))))
    noise = tf.function(lambda x: aux_targets.add_gaussian_noise(x, transforms.noise_sigma, seed))
    stages.append(('Gaussian noise (denoising input)',
                   lambda: _time_calls(noise, images, budget_s)))

  rows = []
  for name, run in stages:
    if name not in cache:
      cache[name] = run()
    rows.append({'workload': workload.name, 'stage': name, **cache[name]})
  return rows


def _twice(timing: dict[str, Any]) -> dict[str, Any]:
  return {**timing, 'ms_per_image': 2 * timing['ms_per_image']}


def run_worker(spec_path: str) -> None:
  """Entry point of a worker process (its CPU affinity is already restricted).

  Reads the spec JSON written by `main`, measures, writes the result JSON next to it. Input
  errors are printed as one line starting with 'error:' (exit code 1).
  """
  with open(spec_path, encoding='utf-8') as f:
    spec = json.load(f)
  cores = spec['cores']
  cpus = affinity_cpus()
  _use_this_checkout()
  from mtan_jax.errors import MtanError  # pylint: disable=import-outside-toplevel
  try:
    result = _work(spec, cpus)
  except MtanError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  threads = _thread_names().get(TF_POOL_THREAD_NAME)
  result['tensorflow_pool_threads'] = threads
  result['tensorflow_sees_cores'] = (None if threads is None else threads == cores)
  with open(spec['result_path'], 'w', encoding='utf-8') as f:
    json.dump(result, f)
  if threads != cores:
    print(f'  WARNING: TensorFlow\'s pool has {threads} {TF_POOL_THREAD_NAME} threads, expected '
          f'{cores}: its thread count did not follow the CPU mask', flush=True)


def _work(spec: dict[str, Any], cpus: list[int]) -> dict[str, Any]:
  cores = spec['cores']
  if len(cpus) != cores:
    raise RuntimeError(f'worker runs on CPUs {cpus}, expected {cores}')
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  print(f'[{cores} core{"s" * (cores > 1)}, CPU {",".join(map(str, cpus))}] affinity '
        f'{len(cpus)} CPU(s), os.cpu_count()={os.cpu_count()}, tensorflow {tf.__version__}',
        flush=True)
  rows, stages, cache = [], [], {}
  for name in spec['workloads']:
    workload = WORKLOADS[name]
    start = time.perf_counter()
    source = open_source(workload, spec['data'], spec['num_examples'])
    if workload.dataset == 'synthetic':
      # Render every scene now: SyntheticSource caches them, training renders only once.
      for i in range(len(source)):
        source[i]  # pylint: disable=pointless-statement
    open_s = time.perf_counter() - start
    row = None
    if spec['measure']:
      row = {'workload': name, 'cores': cores, 'cpus': cpus, 'image_size': workload.image_size,
             'keys': workload.keys, 'transforms': dict(workload.transforms),
             'batch_size': spec['batch_size'], 'data': spec['data_kind'][workload.dataset],
             'source_open_s': open_s,
             **measure(workload, source, spec['batch_size'], spec['seconds'], spec['warmup'],
                       cpus)}
      rows.append(row)
      print(f'  {name}: {row["images_per_s"]:.1f} images/s, {row["ms_per_batch"]:.1f} ms per '
            f'batch ({row["batches"]} batches, pipeline used {row["process_cpu_cores"]:.2f} '
            f'cores, others {_fmt(row["other_processes_cpu_cores"], ".2f")}; per epoch: setup '
            f'{_setup_mean(row["epoch_setup_s"]):.2f} s, end {_mean(row["epoch_end_s"]):.2f} s)',
            flush=True)
    if spec['stages']:
      budget = spec['stage_budget_s']
      found = profile_stages(workload, source, budget, cache)
      total = sum(s['ms_per_image'] for s in found)
      stages.extend(found)
      if row is not None and cores == 1:
        full = 1000.0 / row['images_per_s']
        # What the pipeline costs beyond its stages: tf.data's hand-offs, casts, batching
        # and copies. Negative when one fused map runs the ops cheaper than the separate
        # calls above do (each pays a function dispatch).
        stages.append({'workload': name, 'stage': 'difference: full pipeline - sum of stages '
                       '(tf.data hand-off, casts, batching, copies to numpy)',
                       'ms_per_image': full - total, 'calls': None})
        stages.append({'workload': name, 'stage': 'full pipeline on 1 core (measured above)',
                       'ms_per_image': full, 'calls': None})
      print(f'  {name}: stages profiled ({total:.2f} ms per image in stages)', flush=True)
  return {'rows': rows, 'stages': stages, 'tensorflow': tf.__version__}


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------

_WORKER_BOOTSTRAP = ('import os, runpy\n'
                     'os.sched_setaffinity(0, {cpus!r})\n'
                     'runpy.run_path({script!r})["run_worker"]({spec!r})\n')


def run_in_worker(cores: int, spec: dict[str, Any], tmp: str) -> dict[str, Any]:
  """Runs `run_worker` in a fresh Python restricted to the first `cores` CPUs of the mask.

  The mask is set before Python imports anything (a `taskset` in effect), so TensorFlow and
  numpy size their thread pools to it. The worker's output lines are printed as they come.
  """
  cpus = affinity_cpus()[:cores]
  spec = {**spec, 'cores': cores, 'result_path': os.path.join(tmp, f'result-{cores}.json')}
  spec_path = os.path.join(tmp, f'spec-{cores}.json')
  with open(spec_path, 'w', encoding='utf-8') as f:
    json.dump(spec, f)
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  code = _WORKER_BOOTSTRAP.format(cpus=set(cpus), script=SCRIPT, spec=spec_path)
  with tempfile.TemporaryFile('w+', encoding='utf-8', errors='replace') as err:
    with subprocess.Popen([sys.executable, '-c', code], cwd=REPO_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=err) as proc:
      for line in proc.stdout:
        print(line, end='', flush=True)
    if proc.returncode != 0:
      err.seek(0)
      lines = [l.strip() for l in err.read().splitlines() if l.strip()]
      errors = [l for l in lines if l.startswith('error:')]
      last = errors[-1][len('error:'):].strip() if errors else (lines[-1] if lines else '')
      raise SystemExit(f'error: the {cores}-core worker failed (exit code {proc.returncode}): '
                       f'{last}')
  with open(spec['result_path'], encoding='utf-8') as f:
    return json.load(f)


def _fmt(value: float | None, spec: str) -> str:
  return 'n/a' if value is None else format(value, spec)


def _mean(values: Sequence[float]) -> float:
  return statistics.fmean(values) if values else 0.0


def _setup_mean(setups: Sequence[float]) -> float:
  """Mean epoch set-up time without the first epoch's, which pays one-off imports."""
  return _mean(setups[1:] or setups)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Markdown table: one row per (workload, cores)."""
  lines = ['| workload | cores | images/s | ms per batch | vs goal 1,200 images/s | '
           'per epoch: setup + end (s) | pipeline CPU (cores) | other processes (cores) |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["workload"]} | {r["cores"]} | {r["images_per_s"]:.1f} | '
                 f'{r["ms_per_batch"]:.1f} | {r["ratio_to_goal"]:.3f}x | '
                 f'{_setup_mean(r["epoch_setup_s"]):.2f} + {_mean(r["epoch_end_s"]):.2f} | '
                 f'{r["process_cpu_cores"]:.2f} | {_fmt(r["other_processes_cpu_cores"], ".2f")} |')
  return '\n'.join(lines)


def format_stages(stages: Sequence[dict[str, Any]]) -> str:
  """Markdown table of the per-stage profile."""
  lines = ['| workload | stage | ms per image (1 core) |', '|---|---|---|']
  for s in stages:
    lines.append(f'| {s["workload"]} | {s["stage"]} | {s["ms_per_image"]:.2f} |')
  return '\n'.join(lines)


class _OneLineParser(argparse.ArgumentParser):
  """Reports bad arguments in one line (no usage block), exit code 2."""

  def error(self, message: str):
    self.exit(2, f'{self.prog}: error: {" ".join(message.split())}\n')


def _positive(kind: type, what: str) -> Callable[[str], Any]:
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not value > 0:
      raise argparse.ArgumentTypeError(f'expected a positive {what}, got {text!r}')
    return value
  return parse


def _workload_list(text: str) -> tuple[str, ...]:
  names = tuple(dict.fromkeys(v.strip() for v in text.split(',') if v.strip()))
  unknown = [n for n in names if n not in WORKLOADS]
  if not names or unknown:
    raise argparse.ArgumentTypeError(f'unknown workload {",".join(unknown) or repr(text)}; '
                                     f'expected a comma list of {", ".join(WORKLOADS)}')
  return names


def _cores_list(text: str) -> tuple[int, ...]:
  try:
    values = tuple(dict.fromkeys(int(v) for v in text.split(',') if v.strip()))
  except ValueError:
    values = ()
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'expected a comma list of positive integers, got {text!r}')
  return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses and checks the command line; bad arguments exit with one line and code 2."""
  available = len(affinity_cpus())
  parser = _OneLineParser(
      prog='input_pipeline.py',
      description='Images/s of the tf.data input pipeline alone (no model), per workload and '
                  'number of CPU cores.')
  parser.add_argument('--workloads', type=_workload_list, default=tuple(WORKLOADS),
                      help=f'comma list of {", ".join(WORKLOADS)} (default: all)')
  parser.add_argument('--data-dir-npy', metavar='DIR',
                      help='MTAN Cityscapes npy root (with train/image, train/label_7, '
                           'train/depth) for npy_cityscapes; default: generate fake data')
  parser.add_argument('--data-dir-tfds', metavar='DIR',
                      help='TFDS data dir holding cityscapes_mtan/128x256 and/or '
                           'oxford_iiit_pet in array_record format, for tfds_cityscapes and '
                           'the pets workloads; default: generate fake data')
  parser.add_argument('--num-examples', type=_positive(int, 'integer'),
                      help='fake examples per data set (default: '
                           + ', '.join(f'{k} {v}' for k, v in DEFAULT_NUM_EXAMPLES.items())
                           + '); also the SyntheticSource size')
  parser.add_argument('--batch-size', type=_positive(int, 'integer'), default=32,
                      help='examples per batch (default %(default)s)')
  parser.add_argument('--seconds', type=_positive(float, 'number'), default=10.0,
                      help='timed seconds per (workload, cores) (default %(default)s)')
  parser.add_argument('--warmup', type=_positive(int, 'integer'), default=3,
                      help='untimed batches first (default %(default)s)')
  parser.add_argument('--cores', type=_cores_list, default=(available,),
                      help='comma list of CPU counts, each in its own process restricted to '
                           f'that many CPUs (default: all {available})')
  parser.add_argument('--stages', action=argparse.BooleanOptionalAction, default=True,
                      help='also time each pipeline stage alone on one core (default on)')
  parser.add_argument('--out', metavar='FILE',
                      help='JSON results (default benchmarks/results/cpu-<N>core-'
                           'input-pipeline.json, N = CPUs this process may use)')
  args = parser.parse_args(argv)
  if not hasattr(os, 'sched_setaffinity'):
    parser.error('this benchmark restricts CPUs with os.sched_setaffinity, which this '
                 'platform lacks (Linux only)')
  too_many = [c for c in args.cores if c > available]
  if too_many:
    parser.error(f'--cores {",".join(map(str, too_many))}: this process may run on only '
                 f'{available} CPU(s) ({affinity_cpus()})')
  for flag, path in (('--data-dir-npy', args.data_dir_npy),
                     ('--data-dir-tfds', args.data_dir_tfds)):
    if path is not None and not os.path.isdir(path):
      parser.error(f'{flag} {path}: not a directory')
  families = {_family(WORKLOADS[n].dataset) for n in args.workloads}
  args.num_examples = {k: args.num_examples or v for k, v in DEFAULT_NUM_EXAMPLES.items()}
  for family in sorted(families):
    fake = (family == 'synthetic' or (family == 'pets' and not args.data_dir_tfds) or
            (family == 'cityscapes' and not (args.data_dir_tfds and args.data_dir_npy)))
    if fake and args.num_examples[family] < args.batch_size:
      parser.error(f'--num-examples {args.num_examples[family]} for {family} is below '
                   f'--batch-size {args.batch_size}: an epoch would have no batch')
  if args.out is None:
    args.out = os.path.join(REPO_ROOT, 'benchmarks', 'results',
                            f'cpu-{available}core-input-pipeline.json')
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints the tables and writes the JSON report.

  Args:
    argv: command-line arguments (default: sys.argv[1:]).

  Returns:
    The report: `environment` (CPU counts, versions, load, command); `settings`; `results`,
    one row per (workload, cores) with images_per_s, ms_per_batch, ratio_to_goal (all
    without the per-epoch steps), epoch_setup_s and epoch_end_s (every epoch's, warm-up
    included), images_per_s_with_epoch_overheads, process_cpu_cores (the worker's CPU time
    over the timed time), other_processes_cpu_cores (other processes' load on the worker's
    CPUs), tensorflow_pool_threads and more; `stages`, the per-stage profile on one core.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  env = machine_info(argv)
  versions = env['versions']
  print(f'os.cpu_count()={env["os_cpu_count"]}, affinity: {env["affinity_cpu_count"]} CPU(s) '
        f'{env["affinity_cpus"]} ({env["cpu_model"]}); tensorflow {versions["tensorflow"]}, '
        f'tensorflow-datasets {versions["tensorflow_datasets"]}, numpy {versions["numpy"]}; '
        f'load average {", ".join(f"{v:.2f}" for v in env["load_average_1_5_15_before"])}',
        flush=True)
  workloads = [WORKLOADS[n] for n in args.workloads]
  with tempfile.TemporaryDirectory(prefix='input_pipeline_') as tmp:
    data = {'npy': args.data_dir_npy, 'tfds': args.data_dir_tfds}
    need_fake = [w for w in workloads
                 if (w.dataset == 'npy_cityscapes' and not args.data_dir_npy)
                 or (w.dataset in ('tfds_cityscapes', 'pets') and not args.data_dir_tfds)]
    fake = {}
    if need_fake:
      print('generating fake data ...', flush=True)
      fake = prepare_fake_data(need_fake, args.num_examples, os.path.join(tmp, 'data'))
    data = {k: v or fake.get(k) for k, v in data.items()}
    data_kind = {
        'npy_cityscapes': args.data_dir_npy or 'fake',
        'tfds_cityscapes': args.data_dir_tfds or 'fake',
        'pets': args.data_dir_tfds or 'fake',
        'synthetic': 'synthetic (rendered, cached in RAM before timing)',
    }
    spec = {'workloads': list(args.workloads), 'data': data, 'data_kind': data_kind,
            'num_examples': args.num_examples, 'batch_size': args.batch_size,
            'seconds': args.seconds, 'warmup': args.warmup, 'measure': True,
            # Long enough for stable medians, short enough not to dominate a run.
            'stage_budget_s': max(0.2, min(2.0, args.seconds / 5))}
    rows, stages, pool_threads = [], [], {}
    for cores in args.cores:
      result = run_in_worker(cores, {**spec, 'stages': args.stages and cores == 1}, tmp)
      rows.extend(result['rows'])
      stages.extend(result['stages'])
      pool_threads[cores] = result['tensorflow_pool_threads']
    if args.stages and 1 not in args.cores:
      stages = run_in_worker(1, {**spec, 'stages': True, 'measure': False}, tmp)['stages']
  for row in rows:
    row['tensorflow_pool_threads'] = pool_threads[row['cores']]
  env['load_average_1_5_15_after'] = list(os.getloadavg())
  report = {
      'environment': env,
      'settings': {'workloads': list(args.workloads), 'cores': list(args.cores),
                   'batch_size': args.batch_size, 'seconds': args.seconds,
                   'warmup_batches': args.warmup, 'seed': SEED,
                   'num_examples_fake': args.num_examples, 'data': data_kind,
                   'fake_raw_sizes': {'pets': PETS_RAW_SIZE, 'cityscapes': CITYSCAPES_RAW_SIZE},
                   'goal_images_per_s': GOAL_IMAGES_PER_S, 'goal_note': GOAL_NOTE,
                   'stage_budget_s': spec['stage_budget_s'] if args.stages else None},
      'workloads': {w.name: w.description for w in workloads},
      'results': rows,
      'stages': stages,
  }
  print()
  print(format_table(rows))
  print(f'goal: {GOAL_NOTE}; this run had at most {max(args.cores)} core(s)')
  print('images/s leave out two steps paid once per epoch (means in the table; setup '
        'without the first epoch\'s): setup, '
        'building the tf.data graph in train_batches(); end, the next() that finds the epoch '
        'exhausted and deletes the tf.data iterator')
  print('TensorFlow pool threads per worker: '
        + ', '.join(f'{c} core(s): {pool_threads[c]}' for c in args.cores))
  if stages:
    print()
    print(format_stages(stages))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
    f.write('\n')
  print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
