"""Shared test settings: a tiny, fast training config and a quiet TensorFlow."""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def tiny_config(**overrides):
  """configs/mtan.py:runlocal shrunk to seconds: 32x64 scenes, widths 4..8, 3 epochs of 4 steps."""
  from configs import mtan  # pylint: disable=g-import-not-at-top
  config = mtan.get_config('runlocal')
  config.widths = (4, 8, 8, 8, 8)
  config.image_size = (32, 64)
  config.synthetic_train_size = 16
  config.synthetic_val_size = 6
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_epochs = 3
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.report_last_epochs = 2
  config.progress_bar = False
  config.tensorboard = False
  config.weighting = 'dwa'
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture
def config_factory():
  return tiny_config
