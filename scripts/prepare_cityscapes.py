r"""Builds the cityscapes_mtan TFDS dataset from the raw Cityscapes packages.

  python scripts/prepare_cityscapes.py --manual_dir ~/cityscapes_raw \
      --data_dir ~/tensorflow_datasets --resolution 128x256 [--npy_out ~/cityscapes_npy]

The manual directory holds leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip and
disparity_trainvaltest.zip (or their extracted leftImg8bit/, gtFine/, disparity/ folders).
The dataset is written in array_record format so `CityscapesTfdsSource` can read it with
random access; --npy_out also writes MTAN's npy layout for `NpyDataset`. Problems with the
data are printed as one line (exit status 2).
"""

import argparse
import os
import sys

# Keep TensorFlow (used for PNG decoding and resizing) quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# Make `mtan_jax` importable when the script is run from a checkout without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mtan_jax.errors import MtanError  # pylint: disable=g-import-not-at-top,wrong-import-position


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      description=('Prepare raw Cityscapes (train and val) as the TFDS dataset cityscapes_mtan '
                   'in array_record format, optionally also as MTAN npy files.'))
  parser.add_argument('--manual_dir', required=True,
                      help='directory with leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip '
                           'and disparity_trainvaltest.zip, or their extracted leftImg8bit/, '
                           'gtFine/ and disparity/ folders')
  parser.add_argument('--data_dir', required=True,
                      help='TFDS data directory to write cityscapes_mtan/<resolution>/ into')
  parser.add_argument('--resolution', default='128x256', choices=('128x256', '256x512', 'both'),
                      help='output size H x W (default: %(default)s); "both" builds both configs')
  parser.add_argument('--npy_out', default=None,
                      help='also write the MTAN npy layout {train,val}/{image,label_7,label_19,'
                           'depth}/{i}.npy here (into <npy_out>/<resolution>/ with "both")')
  return parser.parse_args(argv)


def main(argv=None) -> int:
  """Runs the preparation; returns the exit status."""
  args = _parse_args(argv)
  resolutions = ('128x256', '256x512') if args.resolution == 'both' else (args.resolution,)
  try:
    # Imported here so --help stays fast (TensorFlow takes seconds to import).
    from mtan_jax.data import cityscapes_tfds  # pylint: disable=g-import-not-at-top
    for resolution in resolutions:
      builder = cityscapes_tfds.prepare_dataset(args.manual_dir, args.data_dir, resolution)
      sizes = ', '.join(f'{name} {split.num_examples}'
                        for name, split in builder.info.splits.items())
      print(f'prepared {builder.info.full_name} in {args.data_dir}: {sizes}')
      if args.npy_out:
        out = args.npy_out if len(resolutions) == 1 else os.path.join(args.npy_out, resolution)
        counts = cityscapes_tfds.write_npy_layout(args.data_dir, out, resolution)
        print(f'wrote npy layout to {out}: ' + ', '.join(f'{k} {v}' for k, v in counts.items()))
  except MtanError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
