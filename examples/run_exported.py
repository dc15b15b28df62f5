"""Runs a model exported by `mtan_jax.export.export_model`, with JAX and NumPy only.

Usage:
  python examples/run_exported.py EXPORT_DIR [IMAGE.png|IMAGE.npy ...]

Without images it runs on a random batch of two. PNG/JPEG files need Pillow; .npy files
hold one image (H, W, C) or a batch (B, H, W, C), float in [0, 1] or uint8 in [0, 255].
Each input is resized to the export's resolution; a colorization model (one input channel)
gets the image's Lab lightness L / 100. The script prints each output's name, shape and value
range.

The export directory holds `export.json` (input spec, outputs, platforms), `model.jaxexport`
(the serialized evaluation-mode forward pass, `fn(variables, images) -> {task: prediction}`,
batch size symbolic) and `variables.npz` (the weights under '/'-joined keys). This script
deliberately does not import `mtan_jax`: it repeats the few lines of `load_exported` that
rebuild the nested variables dict from those keys, to show that an export needs nothing of
the training code.

An export written with `tf_saved_model=True` also holds a TensorFlow SavedModel:

  import tensorflow as tf
  model = tf.saved_model.load('EXPORT_DIR/saved_model')
  outputs = model.signatures['serving_default'](images=tf.constant(images))  # float32 (B, H, W, C)
  outputs['semantic'].numpy()  # one entry per task
"""

import json
import os
import sys

import jax
import numpy as np


def load(export_dir):
  """(run, metadata): run(images) -> {task: np.ndarray}, in export.json's output order."""
  with open(os.path.join(export_dir, 'export.json')) as f:
    metadata = json.load(f)
  with open(os.path.join(export_dir, 'model.jaxexport'), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  # variables.npz keys are paths such as 'params/encoder_block/0/conv/kernel': rebuild the
  # nested dict {'params': {...}, 'batch_stats': {...}} that the function takes.
  variables = {}
  with np.load(os.path.join(export_dir, 'variables.npz')) as npz:
    for key in npz.files:
      *parents, leaf = key.split('/')
      node = variables
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = npz[key]
  run = jax.jit(exported.call)
  names = [o['name'] for o in metadata['outputs']]

  def predict(images):
    out = run(variables, images)
    return {name: np.asarray(out[name]) for name in names}

  return predict, metadata


def lab_lightness(rgb):
  """sRGB (..., 3) in [0, 1] -> CIE Lab L / 100 (..., 1), D65, as the training pipeline."""
  linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  y = linear @ np.array([0.212671, 0.715160, 0.072169], np.float32)
  delta = 6.0 / 29.0
  f = np.where(y > delta ** 3, np.cbrt(y), y / (3.0 * delta * delta) + 4.0 / 29.0)
  return ((116.0 * f - 16.0) / 100.0)[..., None].astype(np.float32)


def read_images(path, height, width, channels):
  """One file -> float32 (B, height, width, channels) in [0, 1]."""
  if path.endswith('.npy'):
    images = np.load(path)
  else:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(path) as image:
      images = np.asarray(image.convert('RGB'))
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4:
    raise SystemExit(f'{path}: expected an image (H, W, C) or a batch (B, H, W, C), '
                     f'got shape {images.shape}')
  images = images / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
  if channels == 1 and images.shape[-1] == 3:
    images = lab_lightness(images)
  if images.shape[-1] != channels:
    raise SystemExit(f'{path}: expected {channels} channels, got {images.shape[-1]}')
  if images.shape[1:3] != (height, width):
    images = jax.image.resize(images, (images.shape[0], height, width, channels), 'bilinear')
  return np.clip(np.asarray(images, np.float32), 0.0, 1.0)


def main(argv):
  if len(argv) < 2:
    raise SystemExit(__doc__.split('\n\n')[1])
  export_dir, paths = argv[1], argv[2:]
  predict, metadata = load(export_dir)
  _, height, width, channels = metadata['input']['shape']
  if paths:
    images = np.concatenate([read_images(p, height, width, channels) for p in paths])
  else:
    images = np.random.default_rng(0).uniform(size=(2, height, width, channels)).astype(np.float32)
  print(f'{metadata.get("model_class", "model")} on {metadata["platforms"]}: '
        f'input {images.shape} ({metadata["input"]["channels"]})')
  for name, value in predict(images).items():
    print(f'{name}: shape {value.shape}, range [{value.min():.4g}, {value.max():.4g}]')


if __name__ == '__main__':
  main(sys.argv)
