"""`check_config`: every key of a training config checked before anything is built.

`train_and_evaluate` calls it once the device count is known and before it loads data,
builds a model or compiles a step, so that a typo or an out-of-range value costs a second
instead of a compile (minutes on a large model) or a failure hours into a run. Every problem
is one line naming the key as `config.<key>=<value>` and saying what was expected; a value
of an unexpected Python type (a string where an int belongs, None, a bool where a count
belongs) gets the same one-line `ConfigError`, never a TypeError traceback.

The lists of valid names and the deeper checks are the owning modules' own (`steps.MODELS`,
`weighting.check_method` / `make`, `tasks.make_tasks`, `data.check_dataset`,
`pipeline.transforms_from_config`, `report.load_baselines`, ...), so a new model, method,
task or dataset is accepted here as soon as it exists there. Only `data.check_dataset` may
touch the file system (`config.data_dir` must be a directory), plus `config.encoder_init`
and the `config.single_task_baselines` files, which are small or only stat'ed; no data file
is read. Importing this module does not import TensorFlow (a `cityscapes_tfds` config
imports it when checked, as its reader does anyway).

Keys added after configs/mtan.py's first release (`nonfinite`, `log_grad_norms`,
`deterministic`, `compilation_cache_dir`, `preemption_exit_code`, `min_free_disk_mb`) are
checked when present; every other key of configs/mtan.py is required.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np

from mtan_jax import distributed, report, steps, weighting
from mtan_jax.data import DATASETS, check_dataset
from mtan_jax.data.pipeline import transforms_from_config
from mtan_jax.errors import ConfigError, DataError, MtanError, one_line
from mtan_jax.models import segnet, vgg_init
from mtan_jax.tasks import make_tasks

_MISSING = object()
# Longest value quoted in a message; a long inline JSON or path list is cut.
_MAX_SHOWN = 120
# config.nonfinite: `steps.NONFINITE` where the step supports skipping bad batches.
_NONFINITE = getattr(steps, 'NONFINITE', ('stop', 'skip'))
# Exit status 2 is what scripts report a bad config or bad input with (`mtan_jax.cli`);
# a preempted run must be told apart from those.
_RESERVED_EXIT_CODE = 2
# Models without per-task log-sigma: `Steps` refuses uncertainty weighting for them.
_NO_LOGSIGMA = ('segnet',)
# Models whose heads are per-pixel only (baselines.Dense / CrossStitch, ResNetMTAN).
_DENSE_ONLY = ('dense', 'cross_stitch', 'mtan_resnet50')
# Models with SegNet's 13 encoder convs at `vgg_init.ENCODER_CONV_PATHS` (split_wide
# doubles the last width, split_deep doubles every conv, the others have no shared encoder).
_VGG_INIT_MODELS = ('mtan', 'segnet', 'split')
# What `vgg_init.load_vgg16` reads.
_VGG_SUFFIXES = ('.pth', '.pt', '.npz')
# Seeds go to jax.random.key and numpy generators, and are folded into int64 streams.
_MAX_SEED = 2 ** 32 - 1


def _show(value: Any) -> str:
  """A value as the message quotes it: lists as tuples, one line, at most _MAX_SHOWN chars."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, list):
    value = tuple(value)
  text = one_line(repr(value))
  return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + '...'


def _is_bool(value: Any) -> bool:
  return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not _is_bool(value)


def _is_number(value: Any) -> bool:
  """A finite int or float (not a bool); an int too large for a float is not."""
  if not (_is_int(value) or isinstance(value, (float, np.floating))):
    return False
  try:
    return math.isfinite(value)
  except OverflowError:
    return False


def _is_sequence(value: Any) -> bool:
  # A ConfigDict keeps tuples; a config read back from JSON or built by hand may hold lists.
  return isinstance(value, (tuple, list))


class _Config:
  """Reads keys of the config, raising a one-line ConfigError for a missing required one."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def get(self, key: str, default: Any = _MISSING) -> Any:
    try:
      value = self.config.get(key, _MISSING)
    except (AttributeError, TypeError):
      raise ConfigError(f'config is a {type(self.config).__name__}; expected an '
                        f'ml_collections.ConfigDict such as configs/mtan.py builds') from None
    if value is _MISSING:
      if default is _MISSING:
        raise ConfigError(f'config.{key} is missing; expected every key of configs/mtan.py '
                          f'(README.md documents each)')
      return default
    return value

  def has(self, key: str) -> bool:
    return self.config.get(key, _MISSING) is not _MISSING

  def int(self, key: str, low: int | None = 1, high: int | None = None,
          expected: str | None = None) -> int:
    """An int (not a bool) in [low, high]."""
    value = self.get(key)
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
      if expected is None:
        expected = {1: 'a positive integer', 0: 'an integer >= 0'}.get(low, f'an integer >= {low}')
      raise ConfigError(f'config.{key}={_show(value)}; expected {expected}')
    return int(value)

  def number(self, key: str, expected: str, low: float | None = None, high: float | None = None,
             low_open: bool = False) -> float:
    """A finite int or float (not a bool) in [low, high] ((low, high] with `low_open`)."""
    value = self.get(key)
    ok = _is_number(value)
    if ok and low is not None:
      ok = value > low if low_open else value >= low
    if ok and high is not None:
      ok = value <= high
    if not ok:
      raise ConfigError(f'config.{key}={_show(value)}; expected {expected}')
    return float(value)

  def bool(self, key: str) -> bool:
    value = self.get(key)
    if not _is_bool(value):
      raise ConfigError(f'config.{key}={_show(value)}; expected True or False')
    return bool(value)

  def str(self, key: str, expected: str = 'a string', nonempty: bool = False) -> str:
    value = self.get(key)
    if not isinstance(value, str) or (nonempty and not value.strip()):
      raise ConfigError(f'config.{key}={_show(value)}; expected {expected}')
    return value

  def choice(self, key: str, choices: Sequence[str]) -> str:
    value = self.get(key)
    if not isinstance(value, str) or value not in choices:
      raise ConfigError(f'unknown config.{key}={_show(value)}; expected one of {", ".join(choices)}')
    return value

  def ints(self, key: str, length: int, expected: str) -> tuple[int, ...]:
    """A tuple (or list) of `length` positive ints."""
    value = self.get(key)
    if (not _is_sequence(value) or len(value) != length
        or not all(_is_int(v) and v >= 1 for v in value)):
      raise ConfigError(f'config.{key}={_show(value)}; expected {expected}')
    return tuple(int(v) for v in value)

  @contextlib.contextmanager
  def about(self, key: str) -> Iterator[None]:
    """Turns a library's TypeError/ValueError on `key`'s value into a one-line ConfigError."""
    try:
      yield
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as exc:
      raise ConfigError(f'config.{key}={_show(self.get(key, None))} cannot be used '
                        f'({type(exc).__name__}: {one_line(exc)})') from None


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks every key of a training config for type and range, and the keys against each other.

  Args:
    config: the run's config (configs/mtan.py and its variants; README.md documents each key).
    num_devices: devices the global batch is split over (the mesh size).

  Raises:
    ConfigError: a value of the wrong type, out of range, unknown, or inconsistent with
      another key; the one-line message names `config.<key>=<value>` and what was expected.
    DataError: `config.data_dir`, `config.encoder_init` or a file named by
      `config.single_task_baselines` does not exist.
  """
  if not _is_int(num_devices) or num_devices < 1:
    raise ValueError(f'num_devices={num_devices!r}; expected a positive integer')
  try:
    _check(_Config(config), int(num_devices))
  except MtanError as exc:
    # The owning modules' messages are one line by design; a quoted library message might not be.
    if '\n' in str(exc):
      raise type(exc)(one_line(exc)) from None
    raise


def _check(c: _Config, num_devices: int) -> None:
  """The checks, in the order a reader of README's key table meets the keys, then across keys."""
  # --- Model ----------------------------------------------------------------------------
  model = c.choice('model', steps.MODELS)
  task_spec = c.get('tasks')
  if not (isinstance(task_spec, str) or (_is_sequence(task_spec)
                                         and all(isinstance(t, str) for t in task_spec))):
    raise ConfigError(f'config.tasks={_show(task_spec)}; expected a tuple of task names such as '
                      f"('semantic', 'depth')")
  num_classes = c.int('num_classes', low=1, expected='a positive number of semantic classes')
  widths = c.ints('widths', segnet.NUM_LEVELS,
                  f'{segnet.NUM_LEVELS} positive channel widths, e.g. {segnet.DEFAULT_WIDTHS}')
  c.choice('dtype', tuple(steps.DTYPES))
  c.choice('task_stacking', steps.TASK_STACKING)
  c.int('head_hidden')
  encoder_init = c.str('encoder_init', "a path to VGG16 weights, or '' for none")

  # --- Data ------------------------------------------------------------------------------
  dataset = c.choice('dataset', DATASETS)
  c.str('data_dir', "a directory path, or ''")
  c.str('label_dir', "a label folder name such as 'label_7', or ''")
  image_size = c.ints('image_size', 2, '(height, width): two positive integers, e.g. (128, 256)')
  if any(side % segnet.SIZE_MULTIPLE for side in image_size):
    raise ConfigError(f'config.image_size={image_size} is not divisible by {segnet.SIZE_MULTIPLE}: '
                      f'each side must be a multiple of {segnet.SIZE_MULTIPLE} (SegNet pools '
                      f'{segnet.NUM_LEVELS} times by 2), e.g. (128, 256) or (288, 384)')
  for key in ('train_split', 'val_split'):
    c.str(key, "a split name such as 'train'", nonempty=True)
  c.bool('augment')
  c.bool('augment_flip')
  scales = c.get('augment_scales')
  if not _is_sequence(scales) or not scales or not all(_is_number(s) for s in scales):
    raise ConfigError(f'config.augment_scales={_show(scales)}; expected one or more crop scales '
                      f'>= 1, e.g. (1.0, 1.2, 1.5)')
  for key in ('noise_sigma', 'edge_sigma', 'edge_low', 'edge_high'):
    c.number(key, 'a finite number')
  c.int('synthetic_train_size', expected='a positive number of scenes')
  c.int('synthetic_val_size', expected='a positive number of scenes')

  # --- Optimisation ----------------------------------------------------------------------
  batch_size = c.int('batch_size')
  eval_batch_size = c.int('eval_batch_size')
  c.int('num_epochs')
  c.number('lr', 'a learning rate > 0', low=0.0, low_open=True)
  c.int('lr_decay_every_epochs', low=0, expected='an integer >= 0 (0: constant learning rate)')
  c.number('lr_decay_factor', 'a factor in (0, 1]', low=0.0, high=1.0, low_open=True)
  if not isinstance(c.get('weighting'), str):
    raise ConfigError(f'unknown config.weighting={_show(c.get("weighting"))}; expected one of '
                      f'{", ".join(weighting.METHODS)}')
  method = weighting.check_method(c.get('weighting'))
  c.number('dwa_temperature', 'a temperature > 0', low=0.0, low_open=True)
  task_weights = c.get('task_weights')
  if not _is_sequence(task_weights) or not all(_is_number(w) for w in task_weights):
    raise ConfigError(f'config.task_weights={_show(task_weights)}; expected () or, with '
                      f'config.weighting=fixed, one finite weight >= 0 per task')
  c.choice('per_task_grads', steps.PER_TASK_GRADS)
  c.int('seed', low=0, high=_MAX_SEED, expected=f'an integer in [0, {_MAX_SEED}]')

  # --- Faults and reproducibility (optional: added after the first configs) --------------
  if c.has('nonfinite'):
    c.choice('nonfinite', _NONFINITE)
  for key in ('log_grad_norms', 'deterministic'):
    if c.has(key):
      c.bool(key)
  if c.has('compilation_cache_dir'):
    cache_dir = c.str('compilation_cache_dir', "a directory path, or '' for none")
    if cache_dir and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
      raise ConfigError(f'config.compilation_cache_dir={cache_dir!r} exists and is not a directory; '
                        f'expected a directory (created if missing)')
  if c.has('preemption_exit_code'):
    code = c.int('preemption_exit_code', low=1, high=255,
                 expected=f'an exit status in 1..255 other than {_RESERVED_EXIT_CODE} (reserved for '
                          f'bad config or input), e.g. 75')
    if code == _RESERVED_EXIT_CODE:
      raise ConfigError(f'config.preemption_exit_code={code}; expected an exit status in 1..255 other '
                        f'than {_RESERVED_EXIT_CODE}, which reports a bad config or input')
  if c.has('min_free_disk_mb'):
    c.int('min_free_disk_mb', low=0, expected='an integer >= 0 (MiB to leave free)')

  # --- Devices and processes -------------------------------------------------------------
  c.bool('fsdp')
  c.int('fsdp_min_size', low=0)
  mode = c.choice('distributed', distributed.MODES)
  address = c.str('coordinator_address', "'host:port', or '' to detect")
  if address:
    host, sep, port = address.strip().rpartition(':')
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
      raise ConfigError(f'config.coordinator_address={address!r}; expected host:port of process 0, '
                        f'e.g. 10.0.0.1:1234')
    if mode == 'off':
      raise ConfigError(f'config.coordinator_address={address!r} but config.distributed=\'off\'; '
                        f'expected distributed auto or on with a coordinator address')
  num_processes = c.int('num_processes', low=0, expected='an integer >= 0 (0: detect)')
  process_id = c.int('process_id', low=-1, expected='an integer >= -1 (-1: detect)')
  if num_processes and process_id >= num_processes:
    raise ConfigError(f'config.process_id={process_id} with config.num_processes={num_processes}; '
                      f'expected 0 <= process_id < num_processes (or -1 to detect)')

  # --- Logging, checkpoints, evaluation --------------------------------------------------
  for key in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'eval_every_epochs',
              'report_last_epochs'):
    c.int(key)
  baselines = c.str('single_task_baselines', "'', inline JSON or comma-separated "
                                             'final_metrics.json paths')
  c.bool('progress_bar')
  c.bool('tensorboard')
  c.int('vis_images', low=0, expected='an integer >= 0 (0 turns the grids off)')

  # --- Across keys -----------------------------------------------------------------------
  for key, size in (('batch_size', batch_size), ('eval_batch_size', eval_batch_size)):
    if size % num_devices:
      raise ConfigError(f'config.{key}={size} is not divisible by the {num_devices} devices; '
                        f'the batch is split evenly across devices')
  with c.about('tasks'):
    tasks = make_tasks(task_spec, num_classes, image_size=image_size)
  names = [t.name for t in tasks]
  with c.about('dataset'):
    check_dataset(c.config, [t.name for t in tasks if not t.self_supervised])
  if dataset == 'synthetic' and c.get('synthetic_train_size') < batch_size:
    raise ConfigError(f'config.synthetic_train_size={c.get("synthetic_train_size")} is fewer than '
                      f'config.batch_size={batch_size}; an epoch needs at least one full batch')
  with c.about('augment_scales'):
    transforms_from_config(c.config, names)
  image_level = [t.name for t in tasks if t.image_level]
  if model in _DENSE_ONLY and image_level:
    raise ConfigError(f'config.model={model!r} has per-pixel heads only, but config.tasks has the '
                      f'image-level {", ".join(image_level)}; expected mtan, segnet or split* for them')
  if method == 'uncertainty' and model in _NO_LOGSIGMA:
    raise ConfigError(f'config.weighting=uncertainty needs a model with per-task log-sigma; '
                      f'config.model={model!r} has none (every other model has it)')
  with c.about('task_weights'):
    weighting.check_weights(method, tuple(task_weights), names)
  with c.about('weighting_params'):
    weighting.make(method, len(tasks), c.get('weighting_params'))
  if encoder_init:
    _check_encoder_init(encoder_init, model, widths)
  with c.about('single_task_baselines'):
    report.load_baselines(baselines)


def _check_encoder_init(path: str, model: str, widths: tuple[int, ...]) -> None:
  """`config.encoder_init`: an existing VGG16 weights file a SegNet encoder of VGG widths takes."""
  if not os.path.isfile(path):
    what = 'is a directory' if os.path.isdir(path) else 'does not exist'
    raise DataError(f'config.encoder_init={path!r} {what}; expected a torchvision VGG16 state_dict '
                    f'(.pth) or an .npz of it')
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _VGG_SUFFIXES:
    raise ConfigError(f'config.encoder_init={path!r} has the suffix {suffix!r}; expected one of '
                      f'{", ".join(_VGG_SUFFIXES)} (torch.save state_dict or np.savez)')
  if model not in _VGG_INIT_MODELS:
    raise ConfigError(f'config.encoder_init={path!r} with config.model={model!r}: VGG16 weights fit '
                      f'the SegNet encoder of {", ".join(_VGG_INIT_MODELS)} only')
  if widths != tuple(vgg_init.VGG16_WIDTHS):
    raise ConfigError(f'config.widths={widths} with config.encoder_init: VGG16 weights need '
                      f'config.widths={tuple(vgg_init.VGG16_WIDTHS)}')
