r"""Predicts images with a trained run and writes pictures of every task and attention mask.

  python scripts/predict.py --workdir runs/quickstart --input photos/ --output predictions/
  python scripts/predict.py --workdir runs/mtan --input street.png --output out/ \
      --mode pad --attention_layer dec0

`--input` is a PNG / JPEG / .npy file or a directory of them. `--mode resize` (default)
resizes to the training resolution; `--mode pad` keeps the native size, padded to a
multiple of 32 (dense tasks only). Per image it writes the segmentation in the data set's
colours and as an overlay, depth with a colour bar, normals, the other tasks' outputs, the
attention masks of `--attention_layer` per task (MTAN; enc0..enc4, dec0..dec4), a figure
with all of them, and the raw predictions (.npz). mtan_jax/predict.py documents each file.
Errors caused by the input are printed as one line (exit status 2).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top

from mtan_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory (config.json, checkpoints/).')
_INPUT = flags.DEFINE_string('input', None, 'An image (.png, .jpg, .npy) or a directory of images.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory for the pictures.')
_CHECKPOINT = flags.DEFINE_integer('checkpoint', None, 'Checkpoint step; default the newest.')
_MODE = flags.DEFINE_enum('mode', 'resize', ['resize', 'pad'],
                          'resize to the training size, or pad to a multiple of 32.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Images per jitted batch.')
_LAYER = flags.DEFINE_string('attention_layer', 'enc0', 'MTAN attention layer to draw: enc0..enc4, dec0..dec4.')
_PROGRESS = flags.DEFINE_bool('progress_bar', True, 'Show a progress bar for several images.')
flags.mark_flags_as_required(['workdir', 'input', 'output'])


def main():
  from mtan_jax.predict import predict_files  # pylint: disable=g-import-not-at-top
  written = predict_files(_WORKDIR.value, _INPUT.value, _OUTPUT.value, _CHECKPOINT.value,
                          _BATCH_SIZE.value, _MODE.value, _LAYER.value, _PROGRESS.value)
  figures = [p for p in written if p.endswith('_figure.png')]
  print(f'wrote {len(written)} files for {len(figures)} image(s) to {_OUTPUT.value}')


if __name__ == '__main__':
  cli.run(main)
