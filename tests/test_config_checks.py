"""Bad configs and malformed data fail before anything is compiled, as one clear line.

`mtan_jax.config_checks.check_config` on every shipped config and on many wrong ones (each
must name `config.<key>` and say what was expected); the same errors through
`train_and_evaluate` before any compilation; and malformed files in the real layouts the
loaders and the workdir readers read, each a one-line error naming the file.
"""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from conftest import tiny_config
from mtan_jax import report, runs, sharding
from mtan_jax.config_checks import check_config
from mtan_jax.data import make_sources
from mtan_jax.errors import ConfigError, DataError, MtanError
from mtan_jax.train import train_and_evaluate

# Replaced by tmp_path-based paths in `_config`.
TMP = '<tmp>'
# Marks a key to delete.
DELETE = object()


def _config(tmp_path, **overrides):
  """tiny_config with `overrides` set without ml_collections' type checks (so wrong types
  reach check_config as they would from a hand-edited JSON or a script), TMP expanded."""
  config = tiny_config()
  with config.ignore_type():
    for key, value in overrides.items():
      if value is DELETE:
        del config[key]
        continue
      if isinstance(value, str) and TMP in value:
        value = value.replace(TMP, str(tmp_path))
      config[key] = value
  return config


def _assert_one_line(message: str, *fragments: str) -> None:
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, f'{fragment!r} not in {message!r}'


# ------------------------------------------------------------------------- valid configs


def test_tiny_config_passes():
  check_config(tiny_config(), 1)
  check_config(tiny_config(batch_size=8, eval_batch_size=16), 8)


@pytest.mark.parametrize('variant', ['cityscapes', 'nyuv2', 'synthetic', 'runlocal'])
def test_every_mtan_variant_passes(variant, tmp_path):
  from configs import mtan  # pylint: disable=import-outside-toplevel
  config = mtan.get_config(variant)
  if config.dataset in ('cityscapes', 'nyuv2'):
    config.data_dir = str(tmp_path)
  check_config(config, 1)
  check_config(config, 2)


@pytest.mark.parametrize('variant', ['mtan,pcgrad,synthetic', 'split_wide,cagrad,runlocal',
                                     'stan,uncertainty,synthetic', 'cross_stitch,nash_mtl,nyuv2',
                                     'dense,famo,cityscapes', 'mtan_resnet50,upgrad,runlocal',
                                     'segnet,gradnorm,nyuv2', 'split_deep,dwa,synthetic'])
def test_zoo_configs_pass(variant, tmp_path):
  from configs import zoo  # pylint: disable=import-outside-toplevel
  config = zoo.get_config(variant)
  if config.dataset in ('cityscapes', 'nyuv2'):
    config.data_dir = str(tmp_path)
  check_config(config, 1)


def test_pets_and_single_task_configs_pass():
  from configs import pets, single_task  # pylint: disable=import-outside-toplevel
  for variant in pets.VARIANTS:
    check_config(pets.get_config(variant), 1)  # '' = TFDS's default data_dir
  for variant in ('synthetic_semantic', 'synthetic_depth', 'synthetic_normal'):
    check_config(single_task.get_config(variant), 1)


def test_optional_keys_may_be_absent():
  config = tiny_config()
  for key in ('nonfinite', 'log_grad_norms', 'deterministic', 'compilation_cache_dir',
              'preemption_exit_code', 'min_free_disk_mb'):
    if key in config:
      del config[key]
  check_config(config, 1)


def test_importing_does_not_import_tensorflow():
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  code = 'import mtan_jax.config_checks, sys; print("tensorflow" in sys.modules)'
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.stdout.strip() == 'False', result.stderr


# ------------------------------------------------------------------------- bad configs

# (id, overrides, num_devices, error, key named in the message, fragment of the message).
BAD_CONFIGS = [
    # Model.
    ('model_unknown', {'model': 'unet'}, 1, ConfigError, 'model', "unknown config.model='unet'"),
    ('model_type', {'model': 3}, 1, ConfigError, 'model', 'expected one of mtan, segnet'),
    ('tasks_empty', {'tasks': ()}, 1, ConfigError, 'tasks', 'config.tasks is empty'),
    ('tasks_twice', {'tasks': ('semantic', 'semantic')}, 1, ConfigError, 'tasks', 'names a task twice'),
    ('tasks_unknown', {'tasks': ('semantic', 'colour')}, 1, ConfigError, 'tasks', "unknown task 'colour'"),
    ('tasks_type', {'tasks': ('semantic', 1)}, 1, ConfigError, 'tasks', 'expected a tuple of task names'),
    ('num_classes_type', {'num_classes': '7'}, 1, ConfigError, 'num_classes', "config.num_classes='7'"),
    ('num_classes_one', {'num_classes': 1}, 1, ConfigError, 'num_classes', 'expected at least 2 classes'),
    ('widths_four', {'widths': (4, 8, 8, 8)}, 1, ConfigError, 'widths', 'expected 5 positive channel widths'),
    ('widths_zero', {'widths': (4, 8, 0, 8, 8)}, 1, ConfigError, 'widths', 'config.widths=(4, 8, 0, 8, 8)'),
    ('widths_type', {'widths': 'wide'}, 1, ConfigError, 'widths', "config.widths='wide'"),
    ('dtype', {'dtype': 'float16'}, 1, ConfigError, 'dtype', "unknown config.dtype='float16'"),
    ('task_stacking', {'task_stacking': 'sometimes'}, 1, ConfigError, 'task_stacking', 'expected one of auto'),
    ('head_hidden', {'head_hidden': 0}, 1, ConfigError, 'head_hidden', 'expected a positive integer'),
    ('uncertainty_segnet', {'model': 'segnet', 'weighting': 'uncertainty'}, 1, ConfigError, 'model',
     'has none'),
    ('image_level_on_dense', {'model': 'dense', 'dataset': 'pets', 'data_dir': '', 'num_classes': 2,
                              'tasks': ('semantic', 'species')}, 1, ConfigError, 'model', 'per-pixel heads only'),
    # Data.
    ('image_size_32', {'image_size': (48, 64)}, 1, ConfigError, 'image_size', 'is not divisible by 32'),
    ('image_size_one', {'image_size': (32,)}, 1, ConfigError, 'image_size', 'two positive integers'),
    ('image_size_floats', {'image_size': [32.0, 64.0]}, 1, ConfigError, 'image_size', 'two positive integers'),
    ('dataset_unknown', {'dataset': 'imagenet'}, 1, ConfigError, 'dataset', "unknown config.dataset='imagenet'"),
    ('data_dir_empty', {'dataset': 'cityscapes', 'data_dir': ''}, 1, ConfigError, 'data_dir',
     'needs --config.data_dir'),
    ('data_dir_missing', {'dataset': 'nyuv2', 'data_dir': '/nonexistent/nyu', 'num_classes': 13}, 1,
     DataError, 'data_dir', 'does not exist or is not a directory'),
    ('data_dir_file', {'dataset': 'nyuv2', 'data_dir': f'{TMP}/file.txt', 'num_classes': 13}, 1,
     DataError, 'data_dir', 'does not exist or is not a directory'),
    ('data_dir_type', {'data_dir': 5}, 1, ConfigError, 'data_dir', 'config.data_dir=5'),
    ('label_dir_classes', {'dataset': 'cityscapes', 'data_dir': TMP, 'label_dir': 'label_19',
                           'tasks': ('semantic', 'depth')}, 1, ConfigError, 'num_classes',
     'set --config.num_classes=19'),
    ('label_dir_type', {'label_dir': None}, 1, ConfigError, 'label_dir', 'config.label_dir=None'),
    ('dataset_lacks_task', {'dataset': 'cityscapes', 'data_dir': TMP}, 1, ConfigError, 'tasks',
     'has no targets for normal'),
    ('synthetic_no_species', {'tasks': ('semantic', 'species')}, 1, ConfigError, 'tasks',
     'has no targets for species'),
    ('synthetic_classes', {'num_classes': 13}, 1, ConfigError, 'num_classes', 'set --config.num_classes=7'),
    ('tfds_resolution', {'dataset': 'cityscapes_tfds', 'data_dir': TMP, 'tasks': ('semantic', 'depth')}, 1,
     ConfigError, 'image_size', 'cityscapes_tfds is prepared at 128x256 or 256x512'),
    ('train_split', {'train_split': ''}, 1, ConfigError, 'train_split', "expected a split name"),
    ('augment_type', {'augment': 'yes'}, 1, ConfigError, 'augment', 'expected True or False'),
    ('augment_scales_small', {'augment_scales': (0.5, 1.0)}, 1, ConfigError, 'augment_scales', 'scales >= 1'),
    ('augment_scales_empty', {'augment_scales': ()}, 1, ConfigError, 'augment_scales', 'one or more'),
    ('noise_sigma', {'noise_sigma': 0.0}, 1, ConfigError, 'noise_sigma', 'expected > 0'),
    ('noise_sigma_type', {'noise_sigma': 'low'}, 1, ConfigError, 'noise_sigma', 'expected a finite number'),
    ('edge_thresholds', {'edge_low': 0.3, 'edge_high': 0.2}, 1, ConfigError, 'edge_low',
     'expected 0 <= edge_low <= edge_high'),
    ('edge_sigma', {'edge_sigma': -1.0}, 1, ConfigError, 'edge_sigma', 'expected > 0'),
    ('synthetic_size_zero', {'synthetic_val_size': 0}, 1, ConfigError, 'synthetic_val_size',
     'a positive number of scenes'),
    ('synthetic_fewer_than_batch', {'synthetic_train_size': 2}, 1, ConfigError, 'synthetic_train_size',
     'fewer than config.batch_size=4'),
    # Optimisation.
    ('batch_size_zero', {'batch_size': 0}, 1, ConfigError, 'batch_size', 'config.batch_size=0'),
    ('batch_size_devices', {'batch_size': 6}, 4, ConfigError, 'batch_size',
     'config.batch_size=6 is not divisible by the 4 devices'),
    ('eval_batch_size_devices', {'eval_batch_size': 6}, 4, ConfigError, 'eval_batch_size', 'not divisible by'),
    ('batch_size_float', {'batch_size': 4.0}, 1, ConfigError, 'batch_size', 'config.batch_size=4.0; expected'),
    ('batch_size_bool', {'batch_size': True}, 1, ConfigError, 'batch_size', 'config.batch_size=True'),
    ('batch_size_none', {'batch_size': None}, 1, ConfigError, 'batch_size', 'config.batch_size=None'),
    ('num_epochs', {'num_epochs': -1}, 1, ConfigError, 'num_epochs', 'expected a positive integer'),
    ('lr_zero', {'lr': 0.0}, 1, ConfigError, 'lr', 'expected a learning rate > 0'),
    ('lr_nan', {'lr': float('nan')}, 1, ConfigError, 'lr', 'config.lr=nan'),
    ('lr_string', {'lr': '1e-3'}, 1, ConfigError, 'lr', "config.lr='1e-3'"),
    ('lr_decay_every', {'lr_decay_every_epochs': -1}, 1, ConfigError, 'lr_decay_every_epochs', '>= 0'),
    ('lr_decay_factor_zero', {'lr_decay_factor': 0.0}, 1, ConfigError, 'lr_decay_factor', 'in (0, 1]'),
    ('lr_decay_factor_big', {'lr_decay_factor': 1.5}, 1, ConfigError, 'lr_decay_factor', 'in (0, 1]'),
    ('weighting_unknown', {'weighting': 'magic'}, 1, ConfigError, 'weighting', "unknown config.weighting='magic'"),
    ('weighting_none', {'weighting': None}, 1, ConfigError, 'weighting', 'unknown config.weighting=None'),
    ('dwa_temperature', {'dwa_temperature': 0.0}, 1, ConfigError, 'dwa_temperature', 'a temperature > 0'),
    ('task_weights_unused', {'task_weights': (1.0, 1.0, 1.0)}, 1, ConfigError, 'task_weights',
     'only used with config.weighting=fixed'),
    ('fixed_without_weights', {'weighting': 'fixed'}, 1, ConfigError, 'task_weights', 'has 0 weights'),
    ('fixed_negative', {'weighting': 'fixed', 'task_weights': (1.0, -1.0, 1.0)}, 1, ConfigError,
     'task_weights', 'expected non-negative weights'),
    ('task_weights_type', {'weighting': 'fixed', 'task_weights': ('a', 'b', 'c')}, 1, ConfigError,
     'task_weights', 'one finite weight >= 0 per task'),
    ('weighting_params_unknown', {'weighting': 'cagrad', 'weighting_params': 'c=0.4'}, 1, ConfigError,
     'weighting_params', "cagrad has no hyper-parameter 'c'"),
    ('weighting_params_syntax', {'weighting': 'cagrad', 'weighting_params': 'calpha'}, 1, ConfigError,
     'weighting_params', 'is not name=value'),
    ('weighting_params_type', {'weighting_params': 5}, 1, ConfigError, 'weighting_params',
     'expected "name=value,..." or a dict'),
    ('weighting_params_range', {'weighting': 'cagrad', 'weighting_params': 'calpha=-1'}, 1, ConfigError,
     'weighting_params', 'expected a number >= 0'),
    ('per_task_grads', {'per_task_grads': 'parallel'}, 1, ConfigError, 'per_task_grads',
     "unknown config.per_task_grads='parallel'"),
    ('seed_negative', {'seed': -1}, 1, ConfigError, 'seed', 'expected an integer in [0,'),
    ('seed_string', {'seed': '0'}, 1, ConfigError, 'seed', "config.seed='0'"),
    ('missing_key', {'lr': DELETE}, 1, ConfigError, 'lr', 'config.lr is missing'),
    # Faults and reproducibility.
    ('nonfinite', {'nonfinite': 'ignore'}, 1, ConfigError, 'nonfinite', "unknown config.nonfinite='ignore'"),
    ('deterministic', {'deterministic': 'true'}, 1, ConfigError, 'deterministic', 'expected True or False'),
    ('log_grad_norms', {'log_grad_norms': 1}, 1, ConfigError, 'log_grad_norms', 'expected True or False'),
    ('compilation_cache_dir_type', {'compilation_cache_dir': 5}, 1, ConfigError, 'compilation_cache_dir',
     'expected a directory path'),
    ('compilation_cache_dir_file', {'compilation_cache_dir': f'{TMP}/file.txt'}, 1, ConfigError,
     'compilation_cache_dir', 'exists and is not a directory'),
    ('preemption_exit_code_2', {'preemption_exit_code': 2}, 1, ConfigError, 'preemption_exit_code',
     'other than 2'),
    ('preemption_exit_code_big', {'preemption_exit_code': 300}, 1, ConfigError, 'preemption_exit_code',
     'in 1..255'),
    ('min_free_disk_mb', {'min_free_disk_mb': -1}, 1, ConfigError, 'min_free_disk_mb', 'an integer >= 0'),
    # Devices and processes.
    ('fsdp_string', {'fsdp': 'yes'}, 1, ConfigError, 'fsdp', "config.fsdp='yes'; expected True or False"),
    ('fsdp_min_size', {'fsdp_min_size': -1}, 1, ConfigError, 'fsdp_min_size', 'an integer >= 0'),
    ('distributed', {'distributed': 'maybe'}, 1, ConfigError, 'distributed', "unknown config.distributed='maybe'"),
    ('coordinator_address', {'coordinator_address': 'localhost'}, 1, ConfigError, 'coordinator_address',
     'expected host:port'),
    ('coordinator_off', {'coordinator_address': 'h:1234', 'distributed': 'off'}, 1, ConfigError,
     'coordinator_address', "config.distributed='off'"),
    ('process_id_range', {'num_processes': 2, 'process_id': 2}, 1, ConfigError, 'process_id',
     'expected 0 <= process_id < num_processes'),
    ('process_id_negative', {'process_id': -2}, 1, ConfigError, 'process_id', 'an integer >= -1'),
    ('num_processes', {'num_processes': -1}, 1, ConfigError, 'num_processes', 'an integer >= 0'),
    # Logging, checkpoints, evaluation.
    ('log_every_steps', {'log_every_steps': 0}, 1, ConfigError, 'log_every_steps', 'a positive integer'),
    ('checkpoint_every_steps', {'checkpoint_every_steps': 'often'}, 1, ConfigError, 'checkpoint_every_steps',
     "config.checkpoint_every_steps='often'"),
    ('keep_checkpoints', {'keep_checkpoints': 0}, 1, ConfigError, 'keep_checkpoints', 'a positive integer'),
    ('eval_every_epochs', {'eval_every_epochs': 0}, 1, ConfigError, 'eval_every_epochs', 'a positive integer'),
    ('report_last_epochs', {'report_last_epochs': 0}, 1, ConfigError, 'report_last_epochs', 'a positive integer'),
    ('progress_bar', {'progress_bar': 1}, 1, ConfigError, 'progress_bar', 'expected True or False'),
    ('tensorboard', {'tensorboard': 'no'}, 1, ConfigError, 'tensorboard', 'expected True or False'),
    ('vis_images', {'vis_images': -1}, 1, ConfigError, 'vis_images', 'an integer >= 0'),
    ('baselines_json', {'single_task_baselines': '{"semantic": '}, 1, ConfigError, 'single_task_baselines',
     'not valid JSON'),
    ('baselines_missing', {'single_task_baselines': '/nonexistent/final_metrics.json'}, 1, ConfigError,
     'single_task_baselines', 'cannot read /nonexistent/final_metrics.json'),
    ('baselines_number', {'single_task_baselines': '{"semantic": {"miou": "high"}}'}, 1, ConfigError,
     'single_task_baselines', "semantic.miou='high' is not a number"),
    # Encoder init.
    ('encoder_init_missing', {'encoder_init': '/nonexistent/vgg16.npz'}, 1, DataError, 'encoder_init',
     'does not exist'),
    ('encoder_init_suffix', {'encoder_init': f'{TMP}/file.txt'}, 1, ConfigError, 'encoder_init',
     "suffix '.txt'"),
    ('encoder_init_widths', {'encoder_init': f'{TMP}/vgg16.npz'}, 1, ConfigError, 'widths',
     'VGG16 weights need config.widths=(64, 128, 256, 512, 512)'),
    ('encoder_init_model', {'encoder_init': f'{TMP}/vgg16.npz', 'model': 'dense',
                            'widths': (64, 128, 256, 512, 512)}, 1, ConfigError, 'encoder_init',
     'fit the SegNet encoder of mtan, segnet, split only'),
]


@pytest.mark.parametrize('overrides, num_devices, error, key, fragment',
                         [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_key(tmp_path, overrides, num_devices, error, key, fragment):
  (tmp_path / 'file.txt').write_text('not a directory')
  (tmp_path / 'vgg16.npz').write_bytes(b'')
  with pytest.raises(error) as info:
    check_config(_config(tmp_path, **overrides), num_devices)
  _assert_one_line(str(info.value), f'config.{key}', fragment)


def test_there_are_many_distinct_bad_configs():
  assert len(BAD_CONFIGS) >= 35
  assert len({case[0] for case in BAD_CONFIGS}) == len(BAD_CONFIGS)


# ----------------------------------------------------------- through train_and_evaluate

THROUGH_TRAIN = ['batch_size_zero', 'image_size_32', 'weighting_unknown', 'fsdp_string',
                 'lr_decay_factor_big', 'preemption_exit_code_2']


@pytest.mark.parametrize('name', THROUGH_TRAIN)
def test_train_and_evaluate_refuses_before_compiling(name, tmp_path, monkeypatch):
  (case,) = [c for c in BAD_CONFIGS if c[0] == name]
  _, overrides, _, error, key, fragment = case

  def must_not_run(*args, **kwargs):
    raise AssertionError('compiled or initialised a state for a config that check_config refuses')

  monkeypatch.setattr(sharding, 'compile_steps', must_not_run)
  monkeypatch.setattr(sharding, 'init_state', must_not_run)
  with pytest.raises(error) as info:
    train_and_evaluate(_config(tmp_path, **overrides), str(tmp_path / 'run'))
  _assert_one_line(str(info.value), f'config.{key}', fragment)
  # The same error check_config gives for this process's devices.
  with pytest.raises(error) as direct:
    check_config(_config(tmp_path, **overrides), sharding.make_mesh().size)
  assert str(info.value) == str(direct.value)


# ------------------------------------------------------------------ malformed data files

H, W, N = 32, 64, 4


def _write_npy_layout(root: pathlib.Path, layout: str = 'cityscapes', n: int = N,
                      size: tuple[int, int] = (H, W), splits=('train', 'val')) -> pathlib.Path:
  """The MTAN authors' npy layout: <root>/{train,val}/{image,label_7|label,depth[,normal]}/<i>.npy."""
  rng = np.random.default_rng(0)
  h, w = size
  label_dir, classes = ('label_7', 7) if layout == 'cityscapes' else ('label', 13)
  for split in splits:
    for i in range(n):
      arrays = {'image': rng.uniform(size=(h, w, 3)).astype(np.float32),
                label_dir: rng.integers(-1, classes, size=(h, w)).astype(np.float32),
                'depth': rng.uniform(0, 0.4, size=(h, w, 1)).astype(np.float32)}
      if layout == 'nyuv2':
        normal = rng.normal(size=(h, w, 3))
        arrays['normal'] = (normal / np.linalg.norm(normal, axis=-1, keepdims=True)).astype(np.float32)
      for key, array in arrays.items():
        (root / split / key).mkdir(parents=True, exist_ok=True)
        np.save(root / split / key / f'{i}.npy', array)
  return root


def _npy_config(root: pathlib.Path, layout: str = 'cityscapes'):
  tasks = ('semantic', 'depth') if layout == 'cityscapes' else ('semantic', 'depth', 'normal')
  return tiny_config(dataset=layout, data_dir=str(root), tasks=tasks,
                     num_classes=7 if layout == 'cityscapes' else 13,
                     label_dir='label_7' if layout == 'cityscapes' else 'label')


def _truncate(path: pathlib.Path) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _resave(path: pathlib.Path, change) -> None:
  np.save(path, change(np.load(path)))


def _set_pixel(value):
  def change(array):
    array = array.copy()
    array.flat[17] = value
    return array
  return change


# (id, layout, corrupt(root), file or directory named in the message (relative to the
# root), fragment of the message, whether only reading the example finds it).
BAD_NPY = [
    ('missing_split', 'cityscapes', lambda r: shutil.rmtree(r / 'val'), 'val',
     "split directory 'val' not found", False),
    ('missing_target_dir', 'cityscapes', lambda r: shutil.rmtree(r / 'train' / 'depth'), 'train/depth',
     "subdirectory 'depth' not found", False),
    ('file_counts_differ', 'cityscapes', lambda r: os.remove(r / 'train' / 'depth' / f'{N - 1}.npy'),
     'train/depth', f'{N - 1} .npy files but', False),
    ('numbering_gap', 'cityscapes', lambda r: os.remove(r / 'val' / 'label_7' / '1.npy'), 'val/label_7/1.npy',
     'file missing', False),
    ('not_numbered', 'cityscapes', lambda r: shutil.copy(r / 'train' / 'image' / '0.npy',
                                                         r / 'train' / 'image' / 'img_0.npy'),
     'train/image/img_0.npy', 'expected {i}.npy', False),
    ('leading_zero', 'cityscapes', lambda r: os.rename(r / 'train' / 'depth' / '1.npy',
                                                       r / 'train' / 'depth' / '01.npy'),
     'train/depth/01.npy', 'without leading zeros', False),
    ('truncated', 'cityscapes', lambda r: _truncate(r / 'train' / 'image' / '2.npy'), 'train/image/2.npy',
     'file truncated or corrupt', False),
    ('text_file', 'cityscapes', lambda r: (r / 'val' / 'label_7' / '3.npy').write_text('0 1 2\n3 4 5\n'),
     'val/label_7/3.npy', 'not a valid .npy file', False),
    ('empty_file', 'nyuv2', lambda r: (r / 'train' / 'normal' / '0.npy').write_bytes(b''),
     'train/normal/0.npy', 'not a valid .npy file', False),
    ('directory_as_file', 'cityscapes', lambda r: (os.remove(r / 'train' / 'depth' / '2.npy'),
                                                   (r / 'train' / 'depth' / '2.npy').mkdir()),
     'train/depth/2.npy', 'cannot open file', False),
    ('wrong_shape', 'cityscapes', lambda r: np.save(r / 'train' / 'depth' / '1.npy', np.zeros((H, W))),
     'train/depth/1.npy', f'depth shape ({H}, {W}), expected ({H}, {W}, 1)', False),
    ('wrong_dtype_bool', 'cityscapes', lambda r: np.save(r / 'val' / 'label_7' / '0.npy',
                                                         np.zeros((H, W), bool)),
     'val/label_7/0.npy', 'label dtype bool, expected a float or integer array', False),
    ('wrong_dtype_object', 'nyuv2', lambda r: np.save(r / 'train' / 'depth' / '3.npy',
                                                      np.empty((H, W, 1), object), allow_pickle=True),
     'train/depth/3.npy', 'depth dtype object', False),
    ('size_not_32', 'cityscapes', lambda r: (shutil.rmtree(r), _write_npy_layout(r, size=(40, 64))),
     'train/image/0.npy', 'image size (H, W) = (40, 64)', False),
    ('train_val_sizes_differ', 'cityscapes', lambda r: (shutil.rmtree(r / 'val'),
                                                        _write_npy_layout(r, size=(64, 128), splits=('val',))),
     '', f'train images are ({H}, {W}) but val images are (64, 128)', False),
    ('nan_depth', 'nyuv2', lambda r: _resave(r / 'train' / 'depth' / '0.npy', _set_pixel(np.nan)),
     'train/depth/0.npy', 'depth value nan at', True),
    ('label_out_of_range', 'cityscapes', lambda r: _resave(r / 'train' / 'label_7' / '0.npy', _set_pixel(9)),
     'train/label_7/0.npy', 'label value 9 at', True),
    ('label_255', 'nyuv2', lambda r: _resave(r / 'train' / 'label' / '0.npy', _set_pixel(255)),
     'train/label/0.npy', 'MTAN marks ignored pixels with -1', True),
    ('label_fraction', 'cityscapes', lambda r: _resave(r / 'train' / 'label_7' / '0.npy', _set_pixel(2.5)),
     'train/label_7/0.npy', 'expected integral class indices', True),
    ('image_0_255', 'cityscapes', lambda r: _resave(r / 'train' / 'image' / '0.npy', lambda a: a * 255),
     'train/image/0.npy', 'divide by 255', True),
    ('negative_depth', 'cityscapes', lambda r: _resave(r / 'train' / 'depth' / '0.npy', _set_pixel(-1.0)),
     'train/depth/0.npy', 'expected depth >= 0', True),
    ('normal_not_unit', 'nyuv2', lambda r: _resave(r / 'train' / 'normal' / '0.npy', lambda a: a * 3),
     'train/normal/0.npy', 'expected unit vectors', True),
]


@pytest.mark.parametrize('layout, corrupt, named, fragment, lazy', [case[1:] for case in BAD_NPY],
                         ids=[case[0] for case in BAD_NPY])
def test_malformed_npy_layout_is_one_line_naming_the_file(tmp_path, layout, corrupt, named, fragment, lazy):
  root = _write_npy_layout(tmp_path / 'data', layout)
  config = _npy_config(root, layout)
  tasks = list(config.tasks)
  check_config(config, 1)
  make_sources(config, tasks)  # the intact tree loads
  corrupt(root)
  with pytest.raises(DataError) as info:
    train, _ = make_sources(config, tasks)
    assert lazy, 'construction, which reads only .npy headers, should have refused this tree'
    train[0]
  _assert_one_line(str(info.value), str(root / named) if named else str(root), fragment)


def test_malformed_npy_fails_through_train_before_compiling(tmp_path, monkeypatch):
  root = _write_npy_layout(tmp_path / 'data')
  _truncate(root / 'val' / 'depth' / '1.npy')
  monkeypatch.setattr(sharding, 'compile_steps', lambda *a, **k: pytest.fail('compiled'))
  with pytest.raises(DataError) as info:
    train_and_evaluate(_npy_config(root), str(tmp_path / 'run'))
  _assert_one_line(str(info.value), str(root / 'val' / 'depth' / '1.npy'), 'file truncated')


def _workdir(tmp_path) -> pathlib.Path:
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / runs.CONFIG_FILE).write_text(tiny_config().to_json())
  (workdir / runs.HISTORY_FILE).write_text(json.dumps(
      [{'epoch': 1, 'step': 4, 'val': {'semantic': {'miou': 0.5}}, 'train': {'semantic': {'loss': 1.0}}}]))
  (workdir / runs.METRICS_FILE).write_text('{"step": 2, "train/loss": 1.0}\n{"step": 4, "train/loss": 0.5}\n')
  return workdir


# (id, file, content written into it, reader, fragment of the message).
BAD_WORKDIR = [
    ('config_truncated', runs.CONFIG_FILE, b'{"model": "mtan", "tasks": ["sem', runs.load_config, 'is unreadable'),
    ('config_not_utf8', runs.CONFIG_FILE, b'\xff\xfe{"model": 1}', runs.load_config, 'is unreadable'),
    ('config_list', runs.CONFIG_FILE, b'["model", "tasks"]', runs.load_config, 'is not a training config'),
    ('history_corrupt', runs.HISTORY_FILE, b'[{"epoch": 1, "val": ', runs.read_history, 'is unreadable'),
    ('history_not_list', runs.HISTORY_FILE, b'{"epoch": 1}', runs.read_history,
     'holds dict; expected a list of per-epoch records'),
    ('history_record_type', runs.HISTORY_FILE, b'[1, 2]', runs.read_history, 'record 0 is'),
    ('history_metric_type', runs.HISTORY_FILE, b'[{"epoch": 1, "val": {"semantic": {"miou": "high"}}}]',
     runs.read_history, 'record 0 has val='),
    ('metrics_corrupt_line', runs.METRICS_FILE, b'{"step": 2, "x": 1}\n{"st\n{"step": 4, "x": 1}\n',
     runs.read_scalars, ':2 is not a JSON record with a step'),
    ('metrics_not_number', runs.METRICS_FILE, b'{"step": 2, "train/loss": "abc"}\n', runs.read_scalars,
     "train/loss='abc' is not a number"),
    ('metrics_not_utf8', runs.METRICS_FILE, b'{"step": 2, "x": 1}\n\xff\xfe\n', runs.read_scalars,
     'is not UTF-8 text'),
]


@pytest.mark.parametrize('name, content, reader, fragment', [case[1:] for case in BAD_WORKDIR],
                         ids=[case[0] for case in BAD_WORKDIR])
def test_malformed_workdir_file_is_one_line_naming_it(tmp_path, name, content, reader, fragment):
  workdir = _workdir(tmp_path)
  reader(str(workdir))  # the intact workdir reads
  (workdir / name).write_bytes(content)
  with pytest.raises(DataError) as info:
    reader(str(workdir))
  _assert_one_line(str(info.value), str(workdir / name), fragment)


@pytest.mark.parametrize('content, fragment', [
    (b'{"val": {"semantic": {"miou": 0.5', 'cannot read'),
    (b'\xff\xfe', 'cannot read'),
    (b'[1, 2]', 'cannot read'),
    (b'{"val": {"semantic": {"miou": null}}}', 'semantic.miou=None is not a number'),
    (b'{"val": {"semantic": [0.5]}}', 'expected {task: {metric: value}}'),
], ids=['truncated', 'not_utf8', 'list', 'null_metric', 'list_metrics'])
def test_unreadable_single_task_baselines(tmp_path, content, fragment):
  path = tmp_path / 'final_metrics.json'
  path.write_bytes(content)
  with pytest.raises(ConfigError) as info:
    report.load_baselines(str(path))
  _assert_one_line(str(info.value), str(path), fragment)
  # The run's config check reads them too, before anything is built.
  with pytest.raises(MtanError) as info:
    check_config(tiny_config(single_task_baselines=str(path)), 1)
  _assert_one_line(str(info.value), str(path), fragment)


def test_tfds_layouts_with_a_damaged_dataset_info(tmp_path):
  """cityscapes_tfds and pets: a corrupt dataset_info.json names the file (imports TFDS)."""
  from mtan_jax.data import cityscapes_tfds  # pylint: disable=import-outside-toplevel
  version_dir = tmp_path / 'city' / 'cityscapes_mtan' / '128x256' / str(cityscapes_tfds.CityscapesMtan.VERSION)
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text('{"fileFormat": ')
  config = tiny_config(dataset='cityscapes_tfds', data_dir=str(tmp_path / 'city'), tasks=('semantic', 'depth'),
                       image_size=(128, 256))
  check_config(config, 1)
  with pytest.raises(DataError) as info:
    make_sources(config, ['semantic', 'depth'])
  _assert_one_line(str(info.value), str(version_dir / 'dataset_info.json'), 'unreadable dataset info')

  pets_info = tmp_path / 'pets' / 'oxford_iiit_pet' / '4.0.0' / 'dataset_info.json'
  pets_info.parent.mkdir(parents=True)
  pets_info.write_text('{not json')
  config = tiny_config(dataset='pets', data_dir=str(tmp_path / 'pets'), tasks=('semantic', 'species'),
                       num_classes=2, image_size=(32, 32), train_split='train[:12]', val_split='train[12:]')
  check_config(config, 1)
  with pytest.raises(DataError) as info:
    make_sources(config, ['semantic', 'species'])
  _assert_one_line(str(info.value), str(pets_info), 'unreadable dataset info')
