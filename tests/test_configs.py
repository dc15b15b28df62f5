"""Every config variant loads, and README.md documents every config key."""

import os
import re

import pytest

from conftest import REPO
from configs import mtan, single_task


@pytest.mark.parametrize('variant', [None, 'nyuv2', 'synthetic', 'runlocal'])
def test_mtan_variants(variant):
  c = mtan.get_config(variant)
  assert c.model == 'mtan' and c.num_epochs >= 1
  if variant == 'nyuv2':
    assert c.tasks == ('semantic', 'depth', 'normal') and c.num_classes == 13 and c.batch_size == 2
  if variant is None:
    # The reference's Cityscapes protocol.
    assert (c.tasks, c.num_classes, c.batch_size, c.lr, c.num_epochs) == (('semantic', 'depth'), 7, 8, 1e-4, 200)
    assert (c.lr_decay_every_epochs, c.lr_decay_factor, c.weighting, c.dwa_temperature) == (100, 0.5, 'dwa', 2.0)


@pytest.mark.parametrize('variant', ['semantic', 'depth', 'nyuv2_normal', 'synthetic_depth'])
def test_single_task_variants(variant):
  c = single_task.get_config(variant)
  assert c.model == 'segnet' and len(c.tasks) == 1 and c.tasks[0] == variant.split('_')[-1]


def test_unknown_variants_are_rejected():
  with pytest.raises(ValueError, match='unknown variant'):
    mtan.get_config('imagenet')
  with pytest.raises(ValueError, match='no surface normals'):
    single_task.get_config('normal')


def test_readme_documents_every_key():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    documented = set(re.findall(r'^\| `([a-z_]+)` \|', f.read(), flags=re.M))
  keys = set(mtan.get_config('runlocal').keys())
  assert keys - documented == set(), 'undocumented config keys'
  assert documented - keys == set(), 'README documents keys the config does not have'


@pytest.mark.parametrize('variant', [None, 'single', 'mtl_segnet', 'mtan', 'mtan_no_class', 'mtan_no_bbox',
                                     'mtan_colorization', 'mtan_edges', 'mtan_denoising'])
def test_pets_variants(variant):
  from configs import pets  # pylint: disable=import-outside-toplevel
  c = pets.get_config(variant)
  assert c.dataset == 'pets' and c.num_classes == 2 and c.image_size == (256, 256) and c.batch_size == 5
  assert c.tasks[0] == 'semantic' and set(c.keys()) == set(mtan.get_config('runlocal').keys())
  if len(c.tasks) > 1:
    assert c.weighting == 'fixed' and len(c.task_weights) == len(c.tasks)
    assert c.task_weights[:2] in ((0.7, 0.1), (0.7, 0.2))
  assert c.model == ('segnet' if variant in ('single', 'mtl_segnet') else 'mtan')
  with pytest.raises(ValueError, match='unknown variant'):
    pets.get_config('resnet')
