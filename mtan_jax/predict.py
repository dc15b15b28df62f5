"""Prediction on image files with a trained run, written as pictures (`scripts/predict.py`).

Inputs are PNG / JPEG files (RGB; an alpha channel is dropped; grayscale only for
colourisation models, which see lightness anyway) or `.npy` arrays (H, W, 3), floats in
[0, 1] or uint8, as in the MTAN npy layout. Two ways to fit the network:

- `resize` (default): bilinear (antialiased) resize to the training resolution
  `config.image_size`; outputs are at that resolution. Needed by image-level tasks (species,
  box), whose heads are sized for it.
- `pad`: keep the native resolution, pad bottom and right (edge pixels repeated) to the next
  multiple of 32 (SegNet pools five times), predict, crop back. Dense tasks only. Each new
  padded size compiles once.

Per input image `<stem>`, in the output directory:

- `<stem>_semantic.png` (class colours, `visualize.palette`), `<stem>_overlay.png` (on the
  input), `<stem>_depth.png` (colour-mapped, with a colour bar), `<stem>_normal.png` (RGB),
  `<stem>_edges.png`, `<stem>_colorization.png`, `<stem>_denoising.png`, `<stem>_bbox.png`
  for the tasks the model has;
- `<stem>_attention_<layer>_<task>.png`: the channel-mean attention mask of one MTAN layer
  per task (`enc0`..`enc4`, `dec0`..`dec4`; default `enc0`, the first encoder layer),
  colour-mapped over the range of all tasks' masks of that image (viridis, low dark);
- `<stem>_figure.png`: all of the above side by side with titles (what the README shows);
- `<stem>.npz`: the raw predictions (class ids, depth, normals, ...), and `<stem>.json`
  with image-level predictions (species probabilities, box).

Images go through the jitted model in fixed-size batches (the last one padded), so one
compilation serves a whole directory.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mtan_jax import visualize
from mtan_jax.errors import ConfigError, DataError, one_line
from mtan_jax.restore import LoadedRun, load_run

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.npy')
MODES = ('resize', 'pad')
ATTENTION_LAYERS = tuple(f'enc{j}' for j in range(5)) + tuple(f'dec{j}' for j in range(5))


def list_inputs(path: str) -> list[str]:
  """The image files named by `path`: one file, or a directory's images in name order."""
  if os.path.isdir(path):
    found = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(path, n)))
    if not found:
      raise DataError(f'{path} holds no images (expected {", ".join(IMAGE_SUFFIXES)} files)')
    return found
  if not os.path.isfile(path):
    raise DataError(f'--input {path} does not exist')
  if not path.lower().endswith(IMAGE_SUFFIXES):
    raise DataError(f'{path}: unknown image type; expected {", ".join(IMAGE_SUFFIXES)}')
  return [path]


def read_image(path: str, grayscale_ok: bool = False) -> np.ndarray:
  """(H, W, 3) float32 RGB in [0, 1]; one-line DataError naming the file on bad input."""
  if path.lower().endswith('.npy'):
    try:
      array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
      raise DataError(f'cannot read {path} ({one_line(exc)}); expected an (H, W, 3) .npy array') from None
    if array.ndim != 3 or array.shape[-1] != 3:
      raise DataError(f'{path}: array of shape {array.shape}; expected (H, W, 3) RGB')
    if array.dtype == np.uint8:
      return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
      raise DataError(f'{path}: dtype {array.dtype}; expected floats in [0, 1] or uint8')
    lo, hi = float(np.min(array)), float(np.max(array))
    if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
      raise DataError(f'{path}: values in [{lo:.4g}, {hi:.4g}]; expected floats in [0, 1] or uint8')
    return array.astype(np.float32)
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image.load()
      mode = image.mode
      if mode in ('L', 'LA', 'I', 'I;16', 'F', '1') and not grayscale_ok:
        raise DataError(f'{path} is a 1-channel ({mode}) image; the model expects 3 channels (RGB)')
      rgb = np.asarray(image.convert('RGB'), np.float32) / 255.0
  except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
    raise DataError(f'cannot read image {path} ({one_line(exc)})') from None
  return rgb


def lightness(rgb: np.ndarray) -> np.ndarray:
  """L / 100 of sRGB (H, W, 3) -> (H, W, 1): the colourisation model's input, as
  `aux_targets.colorization` computes it for training."""
  c = np.asarray(rgb, np.float32)
  linear = np.where(c > 0.04045, ((np.maximum(c, 0.04045) + 0.055) / 1.055) ** 2.4, c / 12.92)
  y = linear @ np.asarray((0.212671, 0.715160, 0.072169), np.float32)
  delta = 6.0 / 29.0
  f = np.where(y > delta ** 3, np.cbrt(np.maximum(y, delta ** 3)), y / (3 * delta * delta) + 4.0 / 29.0)
  return ((116.0 * f - 16.0) / 100.0)[..., None].astype(np.float32)


def fit(image: np.ndarray, mode: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
  """The image at the network's input size, and the (H, W) region to keep of the outputs."""
  if mode == 'resize':
    if image.shape[:2] != tuple(size):
      image = np.asarray(jax.image.resize(image, tuple(size) + (3,), 'linear', antialias=True))
    return np.clip(image, 0.0, 1.0), tuple(size)
  h, w = image.shape[:2]
  ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
  return np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode='edge'), (h, w)


class Predictor:
  """The jitted forward pass of a loaded run: predictions plus one layer's attention masks."""

  def __init__(self, run: LoadedRun, attention_layer: str = 'enc0'):
    if attention_layer not in ATTENTION_LAYERS:
      raise ConfigError(f'--attention_layer={attention_layer!r}; expected one of {", ".join(ATTENTION_LAYERS)}')
    self.run = run
    self.layer = attention_layer
    self.has_attention = run.config.model == 'mtan'

    def forward(params, batch_stats, images):
      model = run.steps.model(params, batch_stats, train=False)
      if not self.has_attention:
        return model(images), None
      preds, masks = model(images, return_attention=True)
      # Only the drawn layer leaves the device, already averaged over channels.
      mask = masks.get(attention_layer)
      return preds, None if mask is None else jnp.mean(mask.astype(jnp.float32), axis=-1)

    self._forward = jax.jit(forward)

  def __call__(self, images: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
    preds, masks = self._forward(self.run.params, self.run.batch_stats, jnp.asarray(images))
    return [np.asarray(p) for p in preds], None if masks is None else np.asarray(masks)


def _save_png(path: str, picture: np.ndarray) -> str:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(picture).save(path)
  return path


def _depth_with_colorbar(path: str, depth: np.ndarray, label: str) -> str:
  """The depth map colour-mapped with a labelled colour bar (matplotlib)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  h, w = depth.shape[:2]
  lo, hi = visualize.depth_range(None, depth)
  fig = Figure(figsize=(max(3.0, 4.0 * w / h) + 1.0, 4.0), dpi=100)
  ax = fig.add_subplot()
  shown = ax.imshow(depth[..., 0], cmap='magma', vmin=lo, vmax=hi)
  ax.set_axis_off()
  fig.colorbar(shown, ax=ax, fraction=0.046 * h / w if w > h else 0.046, pad=0.02, label=label)
  fig.savefig(path, bbox_inches='tight')
  fig.clear()
  return path


def _depth_label(dataset: str) -> str:
  if dataset in ('cityscapes', 'cityscapes_tfds', 'synthetic'):
    return 'inverse depth (disparity scale; brighter is nearer)'
  return 'depth (m)' if dataset == 'nyuv2' else 'depth'


def write_outputs(run: LoadedRun, stem: str, image: np.ndarray, preds: Sequence[np.ndarray],
                  masks: np.ndarray | None, output_dir: str, layer: str) -> list[str]:
  """Writes every picture of one image (see the module docstring); returns the paths."""
  config = run.config
  colors = visualize.palette(config.dataset, int(config.num_classes))
  # Colourisation models see L / 100; their pictures combine it with the predicted ab.
  model_input = lightness(image) if run.transforms.image_channels == 1 else image
  base = visualize.to_uint8(image)
  h, w = base.shape[:2]
  out = os.path.join(output_dir, stem)
  written, panels, raw, summary = [], [('input', base)], {}, {}
  for t, (task, pred) in enumerate(zip(run.tasks, preds)):
    picture, _ = visualize.task_pictures(task, model_input, pred, None, colors)
    if task.name == 'semantic':
      raw['semantic'] = np.argmax(pred, axis=-1).astype(np.int16)
      written.append(_save_png(f'{out}_semantic.png', picture))
      blended = visualize.overlay(base, picture)
      written.append(_save_png(f'{out}_overlay.png', blended))
      panels += [('semantic', picture), ('overlay', blended)]
    elif task.name == 'depth':
      raw['depth'] = pred[..., 0]
      written.append(_depth_with_colorbar(f'{out}_depth.png', pred, _depth_label(config.dataset)))
      panels.append(('depth', picture))
    elif task.name in ('species', 'bbox'):
      if task.name == 'species':
        summary['species_probabilities'] = np.exp(pred).tolist()
      else:
        summary['bbox_ymin_xmin_ymax_xmax'] = np.asarray(pred).tolist()
        written.append(_save_png(f'{out}_bbox.png', picture))
      raw[task.name] = pred
      panels.append((task.name, picture))
    else:
      raw[task.name] = pred
      written.append(_save_png(f'{out}_{task.name}.png', picture))
      panels.append((task.name, picture))
  if masks is not None:
    dense = [t for t, task in enumerate(run.tasks) if not task.image_level]
    # Decoder masks exist for dense tasks only, in that order.
    owners = dense if layer.startswith('dec') else range(len(run.tasks))
    # Channel means sit near 0.5; one range stretched over all tasks' masks of this image
    # shows their structure and keeps the tasks comparable.
    lo, hi = float(np.min(masks)), float(np.max(masks))
    for k, t in enumerate(owners):
      picture = visualize.attention_picture(masks[k][..., None], h, w, lo, max(hi, lo + 1e-6))
      name = run.tasks[t].name
      written.append(_save_png(f'{out}_attention_{layer}_{name}.png', picture))
      panels.append((f'{name} attention ({layer})', picture))
  np.savez_compressed(f'{out}.npz', **raw)
  written.append(f'{out}.npz')
  if summary:
    with open(f'{out}.json', 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
    written.append(f'{out}.json')
  written.append(_figure(f'{out}_figure.png', panels))
  return written


def _figure(path: str, panels: list[tuple[str, np.ndarray]]) -> str:
  """The panels in a grid of titled images (at most 4 per row)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  cols = min(4, len(panels))
  rows = -(-len(panels) // cols)
  h, w = panels[0][1].shape[:2]
  fig = Figure(figsize=(cols * 2.2 * max(w / h, 0.5), rows * 2.5), dpi=100)
  for i, (title, picture) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    ax.imshow(picture)
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
  fig.tight_layout()
  fig.savefig(path)
  fig.clear()
  return path


def predict_files(workdir: str, inputs: str, output_dir: str, step: int | None = None,
                  batch_size: int = 8, mode: str = 'resize', attention_layer: str = 'enc0',
                  progress: bool = True) -> list[str]:
  """Predicts every image of `inputs` with the run in `workdir`; returns the written paths."""
  if mode not in MODES:
    raise ConfigError(f'--mode={mode!r}; expected one of {", ".join(MODES)}')
  if batch_size < 1:
    raise ConfigError(f'--batch_size={batch_size}; expected a positive integer')
  paths = list_inputs(inputs)
  run = load_run(workdir, step)
  if mode == 'pad' and any(t.image_level for t in run.tasks):
    raise ConfigError('--mode=pad keeps the native resolution, but image-level heads '
                      f'({", ".join(t.name for t in run.tasks if t.image_level)}) need '
                      f'{run.image_size}; use --mode=resize')
  predictor = Predictor(run, attention_layer)
  os.makedirs(output_dir, exist_ok=True)
  gray_ok = run.transforms.image_channels == 1
  stems: dict[str, int] = {}
  written: list[str] = []
  # Images of one input size are batched together (one size for --mode=resize).
  pending: dict[tuple[int, ...], list[tuple[str, np.ndarray, tuple[int, int]]]] = {}

  bar = tqdm(total=len(paths), unit='img', disable=not progress or len(paths) < 2)

  def flush(shape):
    group = pending.pop(shape)
    batch = np.zeros((batch_size,) + shape, np.float32)
    for i, (_, image, _) in enumerate(group):
      batch[i] = lightness(image) if gray_ok else image
    preds, masks = predictor(batch)
    for i, (stem, image, (h, w)) in enumerate(group):
      written.extend(write_outputs(run, stem, image[:h, :w], [p[i, :h, :w] if p.ndim == 4 else p[i] for p in preds],
                                   None if masks is None else masks[i][:, :h * masks.shape[2] // shape[0],
                                                                        :w * masks.shape[3] // shape[1]],
                                   output_dir, attention_layer))
    bar.update(len(group))

  for path in paths:
    image, keep = fit(read_image(path, gray_ok), mode, run.image_size)
    stem = os.path.splitext(os.path.basename(path))[0]
    stems[stem] = stems.get(stem, 0) + 1
    if stems[stem] > 1:
      stem = f'{stem}_{stems[stem]}'
    pending.setdefault(image.shape, []).append((stem, image, keep))
    if len(pending[image.shape]) == batch_size:
      flush(image.shape)
  for shape in list(pending):
    flush(shape)
  bar.close()
  return written
