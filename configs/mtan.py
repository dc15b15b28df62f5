r"""MTAN (SegNet-MTAN) multi-task training, the MTAN reference's defaults.

Cityscapes, 7 classes + depth at 128x256 (MTAN authors' npy release), batch 8, Adam 1e-4
halved at epoch 100, 200 epochs, DWA with T = 2; the report averages the last 10 epochs:

  python scripts/train.py --config configs/mtan.py --config.data_dir=/data/cityscapes128 \
      --workdir runs/mtan_cityscapes

Variants (after the colon):
  :nyuv2      NYUv2 13 classes + depth + normals at 288x384, batch 2 (--config.data_dir=...).
  :synthetic  the full-size model on the built-in synthetic street scenes (no download).
  :runlocal   tiny widths, 64x128 synthetic scenes, a few hundred steps: a smoke run that
              trains for real in minutes on a laptop CPU.

Any key can be overridden, e.g. --config.weighting=uncertainty --config.num_epochs=50.
Every key is documented in README.md.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for variant `arg` (None: Cityscapes)."""
  c = ml_collections.ConfigDict()
  # Model.
  c.model = 'mtan'
  c.tasks = ('semantic', 'depth')
  c.num_classes = 7
  c.widths = (64, 128, 256, 512, 512)
  c.dtype = 'float32'
  c.task_stacking = 'auto'
  c.head_hidden = 256
  c.encoder_init = ''
  # Data.
  c.dataset = 'cityscapes'
  c.data_dir = ''
  c.label_dir = 'label_7'
  c.image_size = (128, 256)
  c.train_split = 'train'
  c.val_split = 'val'
  # Augmentation (the reference's NYUv2 option; off as in the paper).
  c.augment = False
  c.augment_scales = (1.0, 1.2, 1.5)
  c.augment_flip = True
  # Self-supervised auxiliary targets (used when 'edges' / 'denoising' are in tasks).
  c.noise_sigma = 2.0
  c.edge_sigma = 1.0
  c.edge_low = 0.1
  c.edge_high = 0.2
  c.synthetic_train_size = 2975
  c.synthetic_val_size = 500
  # Optimisation.
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_epochs = 200
  c.lr = 1e-4
  c.lr_decay_every_epochs = 100
  c.lr_decay_factor = 0.5
  c.weighting = 'dwa'
  c.dwa_temperature = 2.0
  c.task_weights = ()
  c.weighting_params = ''
  c.per_task_grads = 'vmap'
  c.seed = 0
  # Faults and reproducibility (README: "Interruptions, faults and bad input").
  c.nonfinite = 'stop'
  c.log_grad_norms = True
  c.deterministic = False
  c.compilation_cache_dir = ''
  c.preemption_exit_code = 75
  c.min_free_disk_mb = 0
  # Devices and processes (README: "Many devices and many hosts").
  c.fsdp = False
  c.fsdp_min_size = 2 ** 14
  c.distributed = 'auto'
  c.coordinator_address = ''
  c.num_processes = 0
  c.process_id = -1
  # Logging, checkpoints, evaluation.
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_epochs = 1
  c.report_last_epochs = 10
  c.single_task_baselines = ''
  c.progress_bar = True
  c.tensorboard = True
  c.vis_images = 4

  if arg in (None, '', 'cityscapes'):
    return c
  if arg == 'nyuv2':
    c.dataset = 'nyuv2'
    c.tasks = ('semantic', 'depth', 'normal')
    c.num_classes = 13
    c.label_dir = 'label'
    c.image_size = (288, 384)
    c.batch_size = 2
    c.eval_batch_size = 2
    return c
  if arg == 'synthetic':
    c.dataset = 'synthetic'
    c.synthetic_train_size = 2000
    c.synthetic_val_size = 300
    c.num_epochs = 40
    c.lr_decay_every_epochs = 20
    return c
  if arg == 'runlocal':
    c.dataset = 'synthetic'
    c.tasks = ('semantic', 'depth', 'normal')
    c.widths = (16, 32, 32, 64, 64)
    c.image_size = (64, 128)
    c.synthetic_train_size = 384
    c.synthetic_val_size = 64
    c.batch_size = 8
    c.eval_batch_size = 16
    c.num_epochs = 8
    c.lr = 1e-3
    c.lr_decay_every_epochs = 6
    c.log_every_steps = 12
    c.checkpoint_every_steps = 48
    c.report_last_epochs = 3
    return c
  raise ValueError(f'unknown variant {arg!r} of configs/mtan.py; expected one of '
                   'cityscapes, nyuv2, synthetic, runlocal')
