"""Pictures of inputs, targets, predictions and attention masks, as uint8 RGB arrays.

Everything here is NumPy only (no matplotlib, no TensorFlow), so training can draw its
evaluation grids wherever it runs; `scripts/predict.py` adds matplotlib colour bars on top.

- Segmentation uses the data set's palette: the Cityscapes category colours for the 7
  classes (synthetic scenes use the same categories), the Cityscapes train-id colours for
  19, and the PASCAL VOC bit-pattern palette otherwise (pets: black background, red pet).
  Void / ignored pixels (label -1) are black.
- Depth is colour-mapped (magma, near = bright for the inverse depth of Cityscapes and the
  synthetic scenes, whose value grows towards the camera); invalid target pixels are black.
- Normals map (x, y, z) in [-1, 1] to RGB (n + 1) / 2, as the reference's figures do.
- Attention masks are averaged over channels and colour-mapped (viridis, low -> dark, high
  -> yellow) at the input's size.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mtan_jax.tasks import Task

# Cityscapes category colours (cityscapesScripts' labels.py), in the MTAN 7-class order
# flat, construction, object, nature, sky, human, vehicle.
CITYSCAPES_7 = ((128, 64, 128), (70, 70, 70), (153, 153, 153), (107, 142, 35), (70, 130, 180),
                (220, 20, 60), (0, 0, 142))
CITYSCAPES_7_NAMES = ('flat', 'construction', 'object', 'nature', 'sky', 'human', 'vehicle')
# Cityscapes train ids 0..18 (road ... bicycle).
CITYSCAPES_19 = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
                 (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
                 (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
                 (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))

# Nine evenly spaced samples of matplotlib's perceptually uniform maps, interpolated
# linearly: close enough for pictures, and no matplotlib dependency at training time.
_CMAPS = {
    'magma': ((0, 0, 4), (28, 16, 68), (79, 18, 123), (129, 37, 129), (181, 54, 122),
              (229, 80, 100), (251, 135, 97), (254, 194, 135), (252, 253, 191)),
    'viridis': ((68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)),
}


def voc_palette(n: int) -> np.ndarray:
  """The PASCAL VOC palette (bit-reversed class index per channel): 0 black, 1 dark red..."""
  out = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for bit in range(8):
      r |= ((c >> 0) & 1) << (7 - bit)
      g |= ((c >> 1) & 1) << (7 - bit)
      b |= ((c >> 2) & 1) << (7 - bit)
      c >>= 3
    out[i] = (r, g, b)
  return out


def palette(dataset: str, num_classes: int) -> np.ndarray:
  """(num_classes, 3) uint8 class colours for `dataset`."""
  if num_classes == 7 and dataset in ('cityscapes', 'cityscapes_tfds', 'synthetic'):
    return np.asarray(CITYSCAPES_7, np.uint8)
  if num_classes == 19 and dataset in ('cityscapes', 'cityscapes_tfds'):
    return np.asarray(CITYSCAPES_19, np.uint8)
  return voc_palette(num_classes)


def class_names(dataset: str, num_classes: int) -> tuple[str, ...] | None:
  if num_classes == 7 and dataset in ('cityscapes', 'cityscapes_tfds', 'synthetic'):
    return CITYSCAPES_7_NAMES
  if num_classes == 2 and dataset == 'pets':
    return ('background', 'pet')
  return None


def to_uint8(image: np.ndarray) -> np.ndarray:
  """[0, 1] floats (H, W, 1 or 3) -> (H, W, 3) uint8."""
  image = np.asarray(image, np.float32)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def colormap(values: np.ndarray, name: str = 'magma', vmin: float | None = None,
             vmax: float | None = None) -> np.ndarray:
  """(H, W) values -> (H, W, 3) uint8 through the named colour map over [vmin, vmax]."""
  values = np.asarray(values, np.float32)
  finite = values[np.isfinite(values)]
  vmin = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else vmin)
  vmax = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else vmax)
  t = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
  t = np.nan_to_num(t, nan=0.0)
  anchors = np.asarray(_CMAPS[name], np.float32)
  pos = t * (len(anchors) - 1)
  lo = np.minimum(np.floor(pos).astype(np.int32), len(anchors) - 2)
  frac = (pos - lo)[..., None]
  rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac
  return np.round(rgb).astype(np.uint8)


def colorize_labels(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """(H, W) class ids (-1 void) -> (H, W, 3) uint8; void and out-of-range ids are black."""
  labels = np.asarray(labels)
  lut = np.concatenate([np.asarray(colors, np.uint8), np.zeros((1, 3), np.uint8)])
  index = np.where((labels >= 0) & (labels < len(colors)), labels, len(colors))
  return lut[index]


def overlay(image: np.ndarray, color: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Blends a colour picture over an image (both (H, W, 3) uint8)."""
  mixed = (1 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
  return np.round(mixed).astype(np.uint8)


def depth_range(target: np.ndarray | None, pred: np.ndarray) -> tuple[float, float]:
  """Colour-map range: robust percentiles of the valid target pixels, else of the prediction."""
  values = np.asarray(pred, np.float32).ravel()
  if target is not None:
    valid = np.asarray(target, np.float32).ravel()
    valid = valid[valid > 0]
    if valid.size:
      values = valid
  lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
  return float(lo), float(max(hi, lo + 1e-6))


def depth_picture(depth: np.ndarray, vmin: float, vmax: float, valid: np.ndarray | None = None) -> np.ndarray:
  depth = np.asarray(depth)
  rgb = colormap(depth[..., 0] if depth.ndim == 3 else depth, 'magma', vmin, vmax)
  if valid is not None:
    rgb[~(valid[..., 0] if valid.ndim == 3 else valid)] = 0
  return rgb


def normal_picture(normal: np.ndarray) -> np.ndarray:
  """(H, W, 3) unit normals -> RGB; all-zero (invalid) target pixels stay black."""
  normal = np.asarray(normal, np.float32)
  rgb = to_uint8((normal + 1.0) / 2.0)
  rgb[np.all(normal == 0, axis=-1)] = 0
  return rgb


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
  """CIE Lab (D65) -> sRGB in [0, 1]: the inverse of `aux_targets.rgb_to_lab`."""
  lab = np.asarray(lab, np.float64)
  fy = (lab[..., 0] + 16.0) / 116.0
  fx, fz = fy + lab[..., 1] / 500.0, fy - lab[..., 2] / 200.0
  delta = 6.0 / 29.0
  f = np.stack([fx, fy, fz], axis=-1)
  xyz = np.where(f > delta, f ** 3, 3 * delta * delta * (f - 4.0 / 29.0))
  xyz = xyz * np.asarray((0.95047, 1.0, 1.08883))
  rgb_from_xyz = np.linalg.inv(np.asarray(((0.412453, 0.357580, 0.180423),
                                           (0.212671, 0.715160, 0.072169),
                                           (0.019334, 0.119193, 0.950227))))
  linear = np.clip(xyz @ rgb_from_xyz.T, 0.0, 1.0)
  srgb = np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)
  return srgb.astype(np.float32)


def colorized(lightness: np.ndarray, ab: np.ndarray) -> np.ndarray:
  """RGB uint8 from the model input L/100 (H, W, 1) and ab/128 (H, W, 2)."""
  lab = np.concatenate([np.asarray(lightness)[..., :1] * 100.0, np.asarray(ab) * 128.0], axis=-1)
  return to_uint8(lab_to_rgb(lab))


def draw_box(image: np.ndarray, box: Sequence[float], color: Sequence[int], width: int = 2) -> np.ndarray:
  """Draws a (ymin, xmin, ymax, xmax) pixel box outline on a copy of `image`."""
  out = image.copy()
  h, w = out.shape[:2]
  y0, x0, y1, x1 = (int(round(v)) for v in box)
  y0, y1 = sorted((min(max(y0, 0), h - 1), min(max(y1, 0), h - 1)))
  x0, x1 = sorted((min(max(x0, 0), w - 1), min(max(x1, 0), w - 1)))
  for k in range(width):
    out[min(y0 + k, h - 1), x0:x1 + 1] = color
    out[max(y1 - k, 0), x0:x1 + 1] = color
    out[y0:y1 + 1, min(x0 + k, w - 1)] = color
    out[y0:y1 + 1, max(x1 - k, 0)] = color
  return out


def swatch(height: int, width: int, color: Sequence[int], fraction: float = 1.0) -> np.ndarray:
  """A tile filled with `color` up to `fraction` of its width (a class and its probability)."""
  out = np.full((height, width, 3), 32, np.uint8)
  out[:, :max(int(round(width * fraction)), 1)] = color
  return out


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
  rows = (np.arange(height) * image.shape[0] // height)
  cols = (np.arange(width) * image.shape[1] // width)
  return image[rows][:, cols]


def attention_picture(mask: np.ndarray, height: int, width: int, vmin: float = 0.0,
                      vmax: float = 1.0) -> np.ndarray:
  """(h, w, C) attention mask in (0, 1) -> its channel mean colour-mapped over [vmin, vmax]
  at (height, width)."""
  mean = np.asarray(mask, np.float32).mean(axis=-1)
  return resize_nearest(colormap(mean, 'viridis', vmin, vmax), height, width)


def task_pictures(task: Task, image: np.ndarray, pred: np.ndarray, target: np.ndarray | None,
                  colors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
  """(prediction picture, target picture or None) of one example for one task.

  Args:
    task: the task.
    image: the model input (H, W, C) in [0, 1] (the L channel for colourisation models).
    pred: the task's activated prediction for this example.
    target: its target (None when there is none, as in `scripts/predict.py`).
    colors: the segmentation palette (`palette`).
  """
  h, w = image.shape[:2]
  base = to_uint8(image)
  name = task.name
  if name == 'semantic':
    colors = voc_palette(task.channels) if colors is None else colors
    return (colorize_labels(np.argmax(pred, axis=-1), colors),
            None if target is None else colorize_labels(target, colors))
  if name == 'depth':
    lo, hi = depth_range(target, pred)
    return (depth_picture(pred, lo, hi),
            None if target is None else depth_picture(target, lo, hi, np.asarray(target) > 0))
  if name == 'normal':
    return normal_picture(pred), None if target is None else normal_picture(target)
  if name == 'edges':
    return to_uint8(pred), None if target is None else to_uint8(target)
  if name == 'colorization':
    return colorized(image, pred), None if target is None else colorized(image, target)
  if name == 'denoising':
    return to_uint8(pred), None if target is None else to_uint8(target)
  if name == 'species':
    # Classes of their own (cat, dog), not the segmentation palette.
    colors = voc_palette(task.channels + 1)[1:]
    probs = np.exp(np.asarray(pred, np.float32))
    k = int(np.argmax(probs))
    target_tile = None
    if target is not None:
      target_tile = swatch(h, w, colors[int(target)]) if int(target) >= 0 else swatch(h, w, (0, 0, 0))
    return swatch(h, w, colors[k], float(probs[k])), target_tile
  if name == 'bbox':
    pred_tile = draw_box(base, pred, (255, 64, 64))
    target_tile = None
    if target is not None:
      target_tile = draw_box(base, target, (64, 255, 64)) if np.any(np.asarray(target) != 0) else base
    return pred_tile, target_tile
  raise ValueError(f'no picture for task {name!r}')


def grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2) -> np.ndarray:
  """Tiles (H, W, 3) uint8 pictures into one image, rows x columns, with white gaps."""
  h = max(t.shape[0] for row in rows for t in row)
  w = max(t.shape[1] for row in rows for t in row)
  cols = max(len(row) for row in rows)
  out = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
  for r, row in enumerate(rows):
    for c, tile in enumerate(row):
      y, x = pad + r * (h + pad), pad + c * (w + pad)
      out[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
  return out


def evaluation_grid(tasks: Sequence[Task], batch: Mapping[str, np.ndarray],
                    preds: Sequence[np.ndarray], colors: np.ndarray | None = None) -> np.ndarray:
  """Rows of examples; columns: input, then target and prediction of each task."""
  rows = []
  for i in range(batch['image'].shape[0]):
    image = batch['image'][i]
    row = [to_uint8(image)]
    for task, pred in zip(tasks, preds):
      pred_pic, target_pic = task_pictures(task, image, pred[i], batch[task.target_key][i], colors)
      row += [target_pic, pred_pic]
    rows.append(row)
  return grid(rows)
