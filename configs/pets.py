r"""The second seed's task family on Oxford-IIIT Pet (REFERENCE.md, "The second seed").

Pet segmentation (pet / background from the trimap, border ignored), species
classification and head-box regression at 256x256, batch 5, 30 epochs, fixed task weights
0.7 / 0.1 / 0.2, optionally from an ImageNet VGG16 encoder:

  python scripts/train.py --config configs/pets.py:mtan --config.data_dir=~/tensorflow_datasets \
      --config.encoder_init=/models/vgg16-397923af.pth --workdir runs/pets_mtan

The data is TFDS `oxford_iiit_pet` in array_record format (prepare it once with
`tfds build oxford_iiit_pet --file_format=array_record`). TFDS's test split has no head
boxes, so the default validation split is the last 10% of trainval (every metric is
measurable); `--config.val_split=test` evaluates segmentation and species on the test set.

Variants (after the colon), the seed's comparison:
  single            single-task SegNet, segmentation only.
  mtl_segnet        SegNet shared by the three tasks (hard sharing, no attention).
  mtan              MTL-Attention: MTAN, three tasks (the default).
  mtan_no_class     MTAN without species classification.
  mtan_no_bbox      MTAN without the head box.
  mtan_colorization MTAN + colorization (every task sees the L channel only).
  mtan_edges        MTAN + Canny edges.
  mtan_denoising    MTAN + denoising (every task sees the noisy image).

A removed task takes its weight with it (no renormalisation); an auxiliary task gets weight
0.1, a choice of ours (the seed does not give one). Every key is documented in README.md.
"""

import ml_collections

from configs import mtan as mtan_config

VARIANTS = ('single', 'mtl_segnet', 'mtan', 'mtan_no_class', 'mtan_no_bbox', 'mtan_colorization',
            'mtan_edges', 'mtan_denoising')
_WEIGHTS = {'semantic': 0.7, 'species': 0.1, 'bbox': 0.2, 'colorization': 0.1, 'edges': 0.1,
            'denoising': 0.1}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for variant `arg` (None: mtan)."""
  variant = arg or 'mtan'
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r} of configs/pets.py; expected one of '
                     f'{", ".join(VARIANTS)}')
  c = mtan_config.get_config()
  c.dataset = 'pets'
  c.data_dir = ''
  c.label_dir = ''
  c.num_classes = 2
  c.image_size = (256, 256)
  c.train_split = 'train[:90%]'
  c.val_split = 'train[90%:]'
  c.batch_size = 5
  c.eval_batch_size = 5
  c.num_epochs = 30
  c.lr = 1e-4
  c.lr_decay_every_epochs = 0
  c.report_last_epochs = 5
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500

  tasks = ['semantic', 'species', 'bbox']
  c.model = 'mtan'
  if variant == 'single':
    c.model, tasks = 'segnet', ['semantic']
  elif variant == 'mtl_segnet':
    c.model = 'segnet'
  elif variant == 'mtan_no_class':
    tasks.remove('species')
  elif variant == 'mtan_no_bbox':
    tasks.remove('bbox')
  elif variant.startswith('mtan_') and variant[5:] in _WEIGHTS:
    tasks.append(variant[5:])
  c.tasks = tuple(tasks)
  if len(tasks) == 1:
    c.weighting = 'equal'
    c.task_weights = ()
  else:
    c.weighting = 'fixed'
    c.task_weights = tuple(_WEIGHTS[t] for t in tasks)
  return c
