r"""Exports a trained run for inference outside the training code (jax.export, TF SavedModel).

  python scripts/export.py --workdir runs/quickstart --output exported/
  python scripts/export.py --workdir runs/mtan --output exported/ --tf_saved_model \
      --platforms=cpu,cuda,tpu
  python examples/run_exported.py exported/ street.png      # JAX + NumPy only

Writes `model.jaxexport` (serialized StableHLO of the evaluation-mode forward pass, batch
dimension symbolic), `variables.npz` (the weights), `export.json` (tasks, classes, input and
output spec) and, with --tf_saved_model, `saved_model/` (TensorFlow, via jax2tf).
mtan_jax/export.py documents the format. Errors are printed as one line (exit status 2).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import flags  # pylint: disable=g-import-not-at-top

from mtan_jax import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory (config.json, checkpoints/).')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory for the exported model.')
_CHECKPOINT = flags.DEFINE_integer('checkpoint', None, 'Checkpoint step; default the newest.')
_PLATFORMS = flags.DEFINE_list('platforms', ['cpu', 'cuda'], 'Platforms to lower for (cpu, cuda, rocm, tpu).')
_SAVED_MODEL = flags.DEFINE_bool('tf_saved_model', False, 'Also write a TensorFlow SavedModel.')
flags.mark_flags_as_required(['workdir', 'output'])


def main():
  from mtan_jax import visualize  # pylint: disable=g-import-not-at-top
  from mtan_jax.export import export_model  # pylint: disable=g-import-not-at-top
  from mtan_jax.restore import load_run  # pylint: disable=g-import-not-at-top
  run = load_run(_WORKDIR.value, _CHECKPOINT.value)
  config = run.config
  metadata = {
      'workdir': os.path.abspath(run.workdir), 'step': run.step, 'model': config.model,
      'dataset': config.dataset, 'tasks': [t.name for t in run.tasks],
      'num_classes': int(config.num_classes),
      'class_names': visualize.class_names(config.dataset, int(config.num_classes)),
      'palette': visualize.palette(config.dataset, int(config.num_classes)).tolist(),
  }
  written = export_model(run.model(), _OUTPUT.value, image_size=run.image_size,
                         in_channels=run.transforms.image_channels, metadata=metadata,
                         platforms=tuple(_PLATFORMS.value), tf_saved_model=_SAVED_MODEL.value)
  for name, path in written.items():
    print(f'{name}: {path}')


if __name__ == '__main__':
  cli.run(main)
