"""End to end on generated data in the real layouts: TFDS Cityscapes, the pets tasks of the
second seed (every variant's config; all six tasks in one run), and self-supervised tasks with
augmentation (including exact resume)."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mtan_jax.checkpointing import Checkpointer
from mtan_jax.config_checks import check_config
from mtan_jax.data import fake_data
from mtan_jax.errors import ConfigError
from mtan_jax.train import train_and_evaluate

PET_TINY = {
    'widths': (4, 8, 8, 8, 8), 'image_size': (32, 32), 'batch_size': 4, 'eval_batch_size': 4,
    'num_epochs': 1, 'report_last_epochs': 1, 'log_every_steps': 1, 'checkpoint_every_steps': 100,
    'progress_bar': False, 'tensorboard': False, 'head_hidden': 8,
    'train_split': 'train[:12]', 'val_split': 'train[12:]',
}


@pytest.fixture(scope='module')
def pets_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('pets')
  fake_data.write_pets_raw(root / 'raw', num_trainval=18, num_test=4, size=(48, 64))
  fake_data.build_pets(root / 'raw', root / 'tfds')
  return str(root / 'tfds')


def _pets_config(variant, data_dir, **overrides):
  from configs import pets  # pylint: disable=import-outside-toplevel
  config = pets.get_config(variant)
  for key, value in {**PET_TINY, 'data_dir': data_dir, **overrides}.items():
    config[key] = value
  return config


def _final_params(workdir):
  ckpt = Checkpointer(str(workdir), async_save=False)
  state, _ = ckpt.restore_arrays(ckpt.latest_step())
  ckpt.close()
  return jax.tree.map(np.asarray, state)


# What each variant of configs/pets.py trains: (model, tasks, weighting, task weights).
PET_VARIANTS = {
    'single': ('segnet', ('semantic',), 'equal', ()),
    'mtl_segnet': ('segnet', ('semantic', 'species', 'bbox'), 'fixed', (0.7, 0.1, 0.2)),
    'mtan': ('mtan', ('semantic', 'species', 'bbox'), 'fixed', (0.7, 0.1, 0.2)),
    'mtan_no_class': ('mtan', ('semantic', 'bbox'), 'fixed', (0.7, 0.2)),
    'mtan_no_bbox': ('mtan', ('semantic', 'species'), 'fixed', (0.7, 0.1)),
    'mtan_colorization': ('mtan', ('semantic', 'species', 'bbox', 'colorization'), 'fixed', (0.7, 0.1, 0.2, 0.1)),
    'mtan_edges': ('mtan', ('semantic', 'species', 'bbox', 'edges'), 'fixed', (0.7, 0.1, 0.2, 0.1)),
    'mtan_denoising': ('mtan', ('semantic', 'species', 'bbox', 'denoising'), 'fixed', (0.7, 0.1, 0.2, 0.1)),
}
ALL_PET_TASKS = ('semantic', 'species', 'bbox', 'colorization', 'edges', 'denoising')


def test_every_pet_variant_is_a_valid_config(pets_dir):
  """Each variant's config passes the checks a run starts with and trains what the seed says
  (every task it uses is trained end to end, all at once, in the slow test below)."""
  from configs import pets  # pylint: disable=import-outside-toplevel
  assert set(PET_VARIANTS) == set(pets.VARIANTS)
  for variant, (model, tasks, method, weights) in PET_VARIANTS.items():
    config = _pets_config(variant, pets_dir)
    check_config(config, 1)
    assert (config.model, config.tasks, config.weighting) == (model, tasks, method), variant
    assert config.task_weights == pytest.approx(weights), variant


@pytest.mark.slow
def test_pets_trains_and_reports_all_six_tasks(pets_dir, tmp_path):
  """MTAN on every pets task at once: segmentation, species, head box and the three
  self-supervised tasks (colorization: every task sees the L channel; denoising: the noisy L)."""
  config = _pets_config('mtan', pets_dir, tasks=ALL_PET_TASKS, task_weights=(0.7, 0.1, 0.2, 0.1, 0.1, 0.1))
  summary = train_and_evaluate(config, str(tmp_path))
  assert set(summary['val']) == set(ALL_PET_TASKS)
  for task, values in summary['val'].items():
    assert all(np.isfinite(v) for v in values.values()), (task, values)
  assert 0 <= summary['val']['semantic']['fg_f1'] <= 1
  assert summary['val']['bbox']['l2_px'] > 0 and 0 <= summary['val']['bbox']['iou'] <= 1
  assert 0 <= summary['val']['species']['acc'] <= 1
  (kernel,) = jax.tree.leaves(_final_params(tmp_path)['params']['encoder_block']['0']['conv']['kernel'])
  assert kernel.shape[2] == 1


def test_pets_config_errors(pets_dir, tmp_path):
  with pytest.raises(ConfigError, match='task_weights'):
    train_and_evaluate(_pets_config('mtan', pets_dir, task_weights=(1.0,)), str(tmp_path))
  with pytest.raises(ConfigError, match='normal'):
    train_and_evaluate(_pets_config('mtan', pets_dir, tasks=('semantic', 'normal'),
                                    task_weights=(1.0, 1.0)), str(tmp_path))


@pytest.mark.slow
def test_pets_with_vgg16_encoder_init(pets_dir, tmp_path):
  # A fake torchvision-format VGG16 (as .npz): the run starts from its encoder convs.
  rng = np.random.default_rng(0)
  channels = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
  indices = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
  weights = {}
  for k, idx in enumerate(indices):
    weights[f'features.{idx}.weight'] = rng.normal(0, 0.05, (channels[k + 1], channels[k], 3, 3)).astype(np.float32)
    weights[f'features.{idx}.bias'] = rng.normal(0, 0.05, (channels[k + 1],)).astype(np.float32)
  np.savez(tmp_path / 'vgg16.npz', **weights)
  # The hard-shared SegNet with the three pets tasks (the seed's mtl_segnet variant): its
  # image-level heads train here, MTAN's in the six-task run.
  config = _pets_config('mtl_segnet', pets_dir, widths=(64, 128, 256, 512, 512), num_epochs=1,
                        train_split='train[:4]', val_split='train[12:16]',
                        encoder_init=str(tmp_path / 'vgg16.npz'))
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  assert set(summary['val']) == {'semantic', 'species', 'bbox'}
  assert all(np.isfinite(v) for values in summary['val'].values() for v in values.values())
  params = _final_params(tmp_path / 'run')['params']
  (kernel,) = jax.tree.leaves(params['encoder_block']['0']['conv']['kernel'])
  start = weights['features.0.weight'].transpose(2, 3, 1, 0)
  # One Adam step moves each weight by at most ~lr.
  assert np.abs(kernel - start).max() < 3 * config.lr


@pytest.mark.slow
def test_tfds_cityscapes_trains_end_to_end(tmp_path):
  from mtan_jax.data import cityscapes_tfds  # pylint: disable=import-outside-toplevel
  fake_data.write_cityscapes_raw(tmp_path / 'raw', num_train=8, num_val=3)
  cityscapes_tfds.prepare_dataset(tmp_path / 'raw', tmp_path / 'tfds', '128x256')
  config = tiny_config(dataset='cityscapes_tfds', data_dir=str(tmp_path / 'tfds'), tasks=('semantic', 'depth'),
                       num_classes=7, label_dir='label_7', image_size=(128, 256), num_epochs=2)
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  assert set(summary['val']) == {'semantic', 'depth'}
  assert all(np.isfinite(v) for t in summary['val'].values() for v in t.values())


@pytest.mark.slow
def test_self_supervised_tasks_with_augmentation_resume_exactly(tmp_path):
  # Augmentation and denoising noise are functions of (seed, epoch, index): a run resumed at
  # an epoch boundary ends bit-identical to an uninterrupted one.
  overrides = dict(tasks=('semantic', 'edges', 'colorization', 'denoising'), augment=True,
                   weighting='equal', checkpoint_every_steps=100)
  full = train_and_evaluate(tiny_config(num_epochs=2, **overrides), str(tmp_path / 'full'))
  train_and_evaluate(tiny_config(num_epochs=1, **overrides), str(tmp_path / 'resumed'))
  resumed = train_and_evaluate(tiny_config(num_epochs=2, **overrides), str(tmp_path / 'resumed'))
  assert set(full['val']) == {'semantic', 'edges', 'colorization', 'denoising'}
  assert full['val'] == resumed['val']
  a, b = _final_params(tmp_path / 'full'), _final_params(tmp_path / 'resumed')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # Colorization: the model's first conv sees one channel (L).
  (kernel,) = jax.tree.leaves(a['params']['encoder_block']['0']['conv']['kernel'])
  assert kernel.shape[2] == 1
