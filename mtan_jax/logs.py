"""Run logs in the workdir: JSON lines (`metrics.jsonl`), TensorBoard event files (scalars and
the evaluation grids) and the grids as PNG files.

Only process 0 writes. TensorFlow (for the event files) is imported lazily, on the first
write, so the model and steps stay importable without it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax


def quiet_libraries() -> None:
  """Keeps library chatter (absl, orbax, JAX backend probing) out of the user's terminal."""
  logging.getLogger('mtan_jax').setLevel(logging.INFO)
  for noisy in ('absl', 'orbax', 'jax._src', 'tensorflow'):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _flatten(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
  out = {}
  for key, value in values.items():
    name = f'{prefix}/{key}' if prefix else key
    if isinstance(value, Mapping):
      out.update(_flatten(name, value))
    else:
      out[name] = float(value)
  return out


def _drop_partial_line(path: str) -> None:
  """Cuts a last line that a killed run left half written, so that the resumed run's records
  start on a line of their own (`runs.read_scalars` treats anything else as corruption)."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if data and not data.endswith(b'\n'):
      f.truncate(data.rfind(b'\n') + 1)


class MetricWriter:
  """Appends scalars to `<workdir>/metrics.jsonl` and to TensorBoard events in `<workdir>/tb`."""

  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb_dir = os.path.join(workdir, 'tb') if tensorboard else None
    self._tb = None
    if self.enabled:
      _drop_partial_line(self.path)

  def write(self, step: int, values: Mapping[str, Any], prefix: str = '') -> None:
    """Writes nested `values` (flattened to 'prefix/a/b' names) at `step`."""
    if not self.enabled:
      return
    flat = _flatten(prefix, values)
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'step': int(step), **flat}) + '\n')
    if self._tb_dir is not None:
      with self._writer().as_default(step=int(step)):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        for name, value in flat.items():
          tf.summary.scalar(name, value)
      self._tb.flush()

  def write_image(self, step: int, name: str, image, png_path: str | None = None) -> None:
    """Writes an (H, W, 3) uint8 picture to TensorBoard (when enabled) and as a PNG file."""
    if not self.enabled:
      return
    from mtan_jax.data.pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top
    tf = import_tensorflow()
    if png_path is not None:
      os.makedirs(os.path.dirname(png_path), exist_ok=True)
      tmp = f'{png_path}.tmp'
      tf.io.write_file(tmp, tf.io.encode_png(image))
      os.replace(tmp, png_path)
    if self._tb_dir is not None:
      with self._writer().as_default(step=int(step)):
        tf.summary.image(name, image[None], step=int(step))
      self._tb.flush()

  def _writer(self):
    if self._tb is None:
      from mtan_jax.data.pipeline import import_tensorflow  # pylint: disable=g-import-not-at-top
      self._tb = import_tensorflow().summary.create_file_writer(self._tb_dir)
    return self._tb

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
