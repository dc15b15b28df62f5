r"""Evaluates a checkpoint on a whole split with the training loop's exact metrics.

  python scripts/evaluate.py --workdir runs/quickstart
  python scripts/evaluate.py --workdir runs/mtan --checkpoint 60000 --split val \
      --data_dir /data/cityscapes128

Loads the run's config.json and the checkpoint (default: the newest; a PyTorch checkpoint
converted with scripts/convert_torch_checkpoint.py works too), evaluates sharded over every
device, prints a table and writes JSON (default `<workdir>/eval/step_<N>_<split>.json`).
`--split` is 'val', 'train' or, for TFDS data sets, any TFDS split ('test').
Errors caused by the input are printed as one line (exit status 2).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top

from mtan_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory (config.json, checkpoints/).')
_CHECKPOINT = flags.DEFINE_integer('checkpoint', None, 'Checkpoint step; default the newest.')
_SPLIT = flags.DEFINE_string('split', 'val', "'val', 'train', or a TFDS split for TFDS data sets.")
_DATA_DIR = flags.DEFINE_string('data_dir', None, "Data location, if not the config's data_dir.")
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, "Batch size; default the config's eval_batch_size.")
_OUTPUT = flags.DEFINE_string('output', None, 'JSON path; default <workdir>/eval/step_<N>_<split>.json.')
flags.mark_flags_as_required(['workdir'])


def main():
  from mtan_jax import evaluation  # pylint: disable=g-import-not-at-top
  result = evaluation.evaluate_run(_WORKDIR.value, _CHECKPOINT.value, _SPLIT.value, _DATA_DIR.value,
                                   _BATCH_SIZE.value)
  print(evaluation.format_metrics(result))
  print(f'wrote {evaluation.write_result(result, _OUTPUT.value)}')


if __name__ == '__main__':
  cli.run(main)
