"""Exporting a trained model for inference outside the training code.

`export_model` writes a directory that needs only JAX (and NumPy) to run, not this package:

- `model.jaxexport`: the evaluation-mode forward pass (BatchNorm running statistics)
  serialized with `jax.export`: `fn(variables, images) -> {task name: prediction}`, lowered
  for several platforms (CPU and CUDA by default, cross-lowered on any machine). The batch
  dimension is symbolic, so one file serves every batch size; height, width and channels
  are the training resolution's.
- `variables.npz`: the weights, not embedded in the module (the full 44M-parameter MTAN
  would be a 180 MB constant in it): the nested dict {'params': ..., 'batch_stats': ...}
  flattened with '/'-joined keys, e.g. 'params/encoder_block/0/conv/kernel', float32.
- `export.json`: the caller's metadata (tasks, number of classes, ...) plus the input
  spec, each output's name, shape and meaning, the platforms and the JAX version.
- optionally `saved_model/`: a TensorFlow SavedModel of the same function (jax2tf), with a
  `serving_default` signature images -> {task name: prediction}.

`load_exported` reads such a directory back into a callable; `examples/run_exported.py` does
the same without importing this package.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtan_jax.errors import ConfigError, DataError, one_line
from mtan_jax.models.segnet import check_input_size

EXPORT_FILE = 'model.jaxexport'
VARIABLES_FILE = 'variables.npz'
METADATA_FILE = 'export.json'
SAVED_MODEL_DIR = 'saved_model'
FORMAT_VERSION = 1
KEY_SEPARATOR = '/'
# The platforms jax.export can lower for.
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
# Keys export.json sets itself; the caller's metadata may not use them.
RESERVED_KEYS = ('format', 'format_version', 'model_class', 'input', 'outputs', 'platforms',
                 'platforms_failed', 'jax_version', 'calling_convention_version', 'files',
                 'variables')

# What each task's output means, for export.json (the predictions are already activated).
OUTPUT_MEANINGS = {
    'semantic': 'per-pixel class log-probabilities (log-softmax over the last axis); '
                'argmax gives the label map',
    'depth': 'per-pixel depth, in the units of the training targets',
    'normal': 'per-pixel unit surface normal',
    'species': 'log-probabilities of (cat, dog)',
    'bbox': 'head box [ymin, xmin, ymax, xmax] in pixels of the model input',
    'edges': 'per-pixel edge probability (sigmoid)',
    'colorization': 'per-pixel Lab (a, b) divided by 128',
    'denoising': 'the clean image, RGB in [0, 1]',
}


def inference_function(model: nnx.Module) -> tuple[Callable[[Any, jax.Array], dict[str, jax.Array]],
                                                    dict[str, Any]]:
  """The model's evaluation-mode forward pass as a pure function of plain arrays.

  Args:
    model: an MTAN or SegNet (anything with `tasks` whose call returns one prediction per task).

  Returns:
    (fn, variables): `fn(variables, images) -> {task name: float32 prediction}`, and the
    model's `variables` {'params': ..., 'batch_stats': ...} as nested dicts with string keys
    only (list indices become '0', '1', ...) holding float32 NumPy arrays.
  """
  tasks = getattr(model, 'tasks', None)
  if not tasks:
    raise ConfigError(f'cannot export {type(model).__name__}: it has no tasks to name its outputs')
  names = [task.name for task in tasks]
  view = nnx.view(model, use_running_average=True)
  graphdef, params, batch_stats = nnx.split(view, nnx.Param, nnx.BatchStat)

  def fn(variables, images):
    # Copies: replace_by_pure_dict writes into the State, and the templates must stay free of
    # tracers for the next trace. String keys are matched to NNX's integer list indices.
    p = jax.tree.map(lambda x: x, params)
    s = jax.tree.map(lambda x: x, batch_stats)
    nnx.replace_by_pure_dict(p, variables['params'])
    nnx.replace_by_pure_dict(s, variables['batch_stats'])
    preds = nnx.merge(graphdef, p, s)(images)
    # float32 whatever the compute dtype: NumPy and TF consumers have no bfloat16 to expect.
    return {name: pred.astype(jnp.float32) for name, pred in zip(names, preds)}

  variables = {'params': _host_tree(nnx.to_pure_dict(params)),
               'batch_stats': _host_tree(nnx.to_pure_dict(batch_stats))}
  return fn, variables


def _host_tree(tree: Mapping) -> dict[str, Any]:
  """String keys (so the tree round-trips through '/'-joined names) and float32 NumPy leaves."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out[str(key)] = _host_tree(value)
    else:
      value = np.asarray(jax.device_get(value))
      # Floating weights go out as float32 (the documented format); integer state keeps its type.
      out[str(key)] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  return out


def flatten_variables(tree: Mapping, prefix: str = '') -> dict[str, np.ndarray]:
  """Nested dict -> {'a/b/c': array} (the layout of variables.npz)."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{KEY_SEPARATOR}{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten_variables(value, name))
    else:
      flat[name] = np.asarray(value)
  return flat


def unflatten_variables(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': array} -> nested dict, the inverse of `flatten_variables`."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(KEY_SEPARATOR)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def _image_spec(image_size: Sequence[int], in_channels: int) -> jax.ShapeDtypeStruct:
  h, w = image_size
  return jax.ShapeDtypeStruct(jax.export.symbolic_shape(f'b, {h}, {w}, {in_channels}'), jnp.float32)


def _shape_json(shape) -> list:
  """A shape for export.json: symbolic dimensions (the batch) as their name."""
  return [int(d) if not jax.export.is_symbolic_dim(d) else str(d) for d in shape]


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise ConfigError(f'export metadata holds {value!r} of type {type(value).__name__}, '
                    'which JSON cannot store')


def _input_spec(image_size: Sequence[int], in_channels: int) -> dict[str, Any]:
  h, w = image_size
  if in_channels == 3:
    color, meaning = 'rgb', 'sRGB in [0, 1]'
  elif in_channels == 1:
    # A one-channel model is a colorization model (mtan_jax.data.pipeline.Transforms).
    color, meaning = 'lab_lightness', 'CIE Lab lightness L / 100 (D65), in [0, 1]'
  else:
    color, meaning = 'other', f'{in_channels} channels in [0, 1]'
  return {'name': 'images', 'shape': ['b', h, w, in_channels], 'dtype': 'float32',
          'layout': 'NHWC', 'value_range': [0.0, 1.0], 'color': color, 'channels': meaning}


def _export_for(fn, args, platforms: Sequence[str]) -> tuple[jax.export.Exported, list[str], dict]:
  """Exports for all `platforms` at once, or, if that fails, for the subset that lowers."""
  try:
    return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args), list(platforms), {}
  except Exception as err:  # pylint: disable=broad-except
    if len(platforms) == 1:
      raise ConfigError(f'lowering for platform {platforms[0]!r} failed: {one_line(err)}') from err
  working, failed = [], {}
  for platform in platforms:
    try:
      jax.export.export(jax.jit(fn), platforms=(platform,))(*args)
      working.append(platform)
    except Exception as err:  # pylint: disable=broad-except
      failed[platform] = one_line(err)
  if not working:
    raise ConfigError('lowering failed for every platform: ' +
                      '; '.join(f'{p}: {e}' for p, e in failed.items()))
  return jax.export.export(jax.jit(fn), platforms=tuple(working))(*args), working, failed


def export_model(model: nnx.Module, output_dir: str, *, image_size: tuple[int, int],
                 in_channels: int, metadata: Mapping[str, Any],
                 platforms: Sequence[str] = ('cpu', 'cuda'),
                 tf_saved_model: bool = False) -> dict[str, str]:
  """Writes the model's evaluation-mode forward pass and weights to `output_dir`.

  Args:
    model: the trained NNX model (MTAN or SegNet).
    output_dir: directory to write (created if needed). Existing export files are replaced; a
      saved_model/ of an earlier export is left alone (export.json's 'files' lists this one's).
    image_size: (height, width) of the input, the training resolution (multiples of 32).
    in_channels: input channels (3 for RGB, 1 for colorization models' L / 100).
    metadata: JSON-serialisable facts to keep with the model (tasks, num_classes, config, ...).
    platforms: platforms to lower for; any that fails to lower is left out and recorded in
      export.json's 'platforms_failed'.
    tf_saved_model: also write a TensorFlow SavedModel (`saved_model/`, via jax2tf).

  Returns:
    {artifact: path} for 'jax_export', 'variables', 'metadata' and, if written, 'saved_model'.
  """
  try:
    h, w = (int(s) for s in image_size)
  except (TypeError, ValueError) as err:
    raise ConfigError(f'image_size={image_size!r}; expected (height, width)') from err
  check_input_size(h, w)
  if int(in_channels) < 1:
    raise ConfigError(f'in_channels={in_channels}; expected a positive integer')
  in_channels = int(in_channels)
  platforms = tuple(str(p).lower() for p in platforms)
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if not platforms or unknown:
    raise ConfigError(f'export platforms={platforms}; expected one or more of '
                      f'{", ".join(KNOWN_PLATFORMS)}')
  clashes = sorted(set(metadata) & set(RESERVED_KEYS))
  if clashes:
    raise ConfigError(f'export metadata keys {clashes} are reserved for what export_model writes')

  fn, variables = inference_function(model)
  args = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables),
          _image_spec((h, w), in_channels))
  try:
    # Platform-independent check first, so that a model/input mismatch reads as one.
    jax.eval_shape(fn, *args)
  except Exception as err:  # pylint: disable=broad-except
    raise ConfigError(f'{type(model).__name__} does not accept images of shape '
                      f'(b, {h}, {w}, {in_channels}): {one_line(err)}') from err
  exported, exported_platforms, failed = _export_for(fn, args, platforms)

  os.makedirs(output_dir, exist_ok=True)
  paths = {'jax_export': os.path.join(output_dir, EXPORT_FILE),
           'variables': os.path.join(output_dir, VARIABLES_FILE),
           'metadata': os.path.join(output_dir, METADATA_FILE)}
  with open(paths['jax_export'], 'wb') as f:
    f.write(exported.serialize())
  flat = flatten_variables(variables)
  np.savez(paths['variables'], **flat)
  if tf_saved_model:
    paths['saved_model'] = os.path.join(output_dir, SAVED_MODEL_DIR)
    _write_saved_model(fn, variables, (h, w), in_channels, exported_platforms,
                       paths['saved_model'])

  out_avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
  info = dict(metadata)
  info.update({
      'format': 'mtan_jax.export',
      'format_version': FORMAT_VERSION,
      'model_class': type(model).__name__,
      'input': _input_spec((h, w), in_channels),
      # In task order (the serialized function returns a dict, whose keys JAX sorts).
      'outputs': [{'name': task.name, 'shape': _shape_json(out_avals[task.name].shape),
                   'dtype': str(out_avals[task.name].dtype),
                   'meaning': OUTPUT_MEANINGS.get(task.name, '')}
                  for task in model.tasks],
      'platforms': exported_platforms,
      'jax_version': jax.__version__,
      'calling_convention_version': exported.calling_convention_version,
      'files': {name: os.path.basename(path) for name, path in paths.items()},
      'variables': {'count': len(flat), 'dtype': 'float32', 'key_separator': KEY_SEPARATOR,
                    'structure': "{'params': ..., 'batch_stats': ...}, the first argument"},
  })
  if failed:
    info['platforms_failed'] = failed
  # Written last: a directory with export.json is a complete export.
  text = json.dumps(info, indent=2, default=_json_default)
  with open(paths['metadata'], 'w') as f:
    f.write(text + '\n')
  return paths


def _write_saved_model(fn, variables, image_size, in_channels, platforms, path) -> None:
  """A TF SavedModel of `fn` with the weights as tf.Variables and a serving_default signature."""
  try:
    from mtan_jax.data.pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top
    tf = import_tensorflow()
    from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise ConfigError(f'tf_saved_model=True needs TensorFlow and jax2tf: {one_line(err)}') from err
  h, w = image_size
  # Native serialization (StableHLO inside the SavedModel) is jax2tf's default and only mode
  # now; passing native_serialization=True is deprecated. No gradient: inference only.
  tf_fn = jax2tf.convert(fn, polymorphic_shapes=[None, f'(b, {h}, {w}, {in_channels})'],
                         with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  # Variables rather than constants: the graph stays small and the weights live in the
  # SavedModel's variables/ checkpoint.
  module.model_variables = tf.nest.map_structure(
      lambda a: tf.Variable(a, trainable=False), variables)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, h, w, in_channels], tf.float32, name='images')])
  def serve(images):
    return tf_fn(module.model_variables, images)

  module.serve = serve
  tf.saved_model.save(module, path, signatures={'serving_default': serve})


def _read(path: str, what: str) -> bytes:
  if not os.path.isfile(path):
    raise DataError(f'{path}: {what} not found')
  with open(path, 'rb') as f:
    return f.read()


def load_exported(output_dir: str) -> tuple[Callable[[Any], dict[str, np.ndarray]], dict[str, Any]]:
  """Loads a directory written by `export_model`.

  Args:
    output_dir: the export directory.

  Returns:
    (call, metadata): `call(images)` runs the model on float32 images (b, H, W, C) in [0, 1]
    and returns {task name: np.ndarray} in task order; `metadata` is export.json's content.
  """
  if not os.path.isdir(output_dir):
    raise DataError(f'{output_dir}: export directory not found')
  meta_path = os.path.join(output_dir, METADATA_FILE)
  try:
    metadata = json.loads(_read(meta_path, 'export metadata'))
  except (ValueError, UnicodeDecodeError) as err:
    raise DataError(f'{meta_path}: not valid JSON: {one_line(err)}') from err

  export_path = os.path.join(output_dir, EXPORT_FILE)
  try:
    exported = jax.export.deserialize(bytearray(_read(export_path, 'serialized model')))
    # Parses the StableHLO too, so that a damaged module fails here and not at the first call.
    exported.mlir_module()
  except DataError:
    raise
  except Exception as err:  # pylint: disable=broad-except
    raise DataError(f'{export_path}: not a valid jax.export serialization: {one_line(err)}') from err

  vars_path = os.path.join(output_dir, VARIABLES_FILE)
  if not os.path.isfile(vars_path):
    raise DataError(f'{vars_path}: variables not found')
  try:
    with np.load(vars_path, allow_pickle=False) as npz:
      variables = unflatten_variables({k: npz[k] for k in npz.files})
  except Exception as err:  # pylint: disable=broad-except
    raise DataError(f'{vars_path}: cannot read the variables: {one_line(err)}') from err
  *var_avals, image_aval = exported.in_avals
  leaves = jax.tree.leaves(variables)
  if (jax.tree.structure(((variables, 0), {})) != exported.in_tree
      or [l.shape for l in leaves] != [a.shape for a in var_avals]):
    raise DataError(f'{vars_path}: the variables do not match the serialized model '
                    f'({len(leaves)} arrays, the model takes {len(var_avals)})')
  variables = jax.device_put(variables)
  expected = tuple(image_aval.shape[1:])
  names = [o['name'] for o in metadata.get('outputs', [])]
  run = jax.jit(exported.call)

  def call(images) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
      raise DataError(f'images: expected (b, H, W, C) = (b, {", ".join(map(str, expected))}), '
                      f'got {tuple(images.shape)}')
    if not np.issubdtype(images.dtype, np.floating):
      # Integer images are almost surely 0-255: refusing beats silently wrong predictions.
      raise DataError(f'images: expected float32 values in [0, 1], got dtype {images.dtype}')
    out = run(variables, images.astype(np.float32))
    return {name: np.asarray(out[name]) for name in (names or sorted(out))}

  return call, metadata
