"""Small generated data sets in the exact raw layouts of Oxford-IIIT Pet and Cityscapes.

Neither data set can be downloaded in tests or CI, so end-to-end tests and
`benchmarks/input_pipeline.py` build them from fake raw files written here in the official
folder and file naming, through the real builders (TFDS's `oxford_iiit_pet`, our
`cityscapes_mtan`). The content is simple but learnable: a pet is an ellipse with a head
circle (trimap pet / background / border, the head's box in the XML, the species sets the
colour); Cityscapes frames are road, sky and a car.
"""

from __future__ import annotations

import os
import pathlib
from unittest import mock

import numpy as np

# Oxford-IIIT Pet names: cats have capitalised breed names, dogs lower-case ones.
_PET_BREEDS = (('Abyssinian', 1), ('Bengal', 1), ('beagle', 2), ('pug', 2))


def _png(array: np.ndarray) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.encode_png(array if array.ndim == 3 else array[..., None]).numpy()


def _jpeg(array: np.ndarray) -> bytes:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.encode_jpeg(array, quality=95).numpy()


def _pet(rng: np.random.Generator, species: int, height: int, width: int):
  """One image (H, W, 3) uint8, its trimap (H, W) uint8 and head box (xmin, ymin, xmax, ymax)."""
  yy, xx = np.mgrid[:height, :width]
  cy, cx = rng.uniform(0.45, 0.65) * height, rng.uniform(0.35, 0.65) * width
  ry, rx = rng.uniform(0.18, 0.28) * height, rng.uniform(0.18, 0.28) * width
  body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
  hr = 0.5 * min(ry, rx)
  hy, hx = cy - ry - 0.6 * hr, cx + rng.uniform(-0.5, 0.5) * rx
  head = ((yy - hy) ** 2 + (xx - hx) ** 2) / hr ** 2
  inside = (body <= 1) | (head <= 1)
  border = ~inside & ((body <= 1.3) | (head <= 1.5))
  trimap = np.where(inside, 1, np.where(border, 3, 2)).astype(np.uint8)
  colour = np.array([200, 120, 60] if species == 1 else [90, 90, 200], np.float32)
  background = rng.uniform(20, 235, 3).astype(np.float32)
  image = np.where(inside[..., None], colour, background) + rng.normal(0, 12, (height, width, 3))
  box = (max(hx - hr, 0), max(hy - hr, 0), min(hx + hr, width - 1), min(hy + hr, height - 1))
  return np.clip(image, 0, 255).astype(np.uint8), trimap, tuple(int(round(v)) for v in box)


def write_pets_raw(root: str | os.PathLike, num_trainval: int, num_test: int, seed: int = 0,
                   size: tuple[int, int] = (96, 128)) -> pathlib.Path:
  """Writes images/, annotations/{trimaps,xmls}/, trainval.txt and test.txt as released.

  Image sizes vary around `size` (real pets vary); test images have no head XML, as the
  real release.
  """
  root = pathlib.Path(root)
  images = root / 'images' / 'images'
  ann = root / 'annotations' / 'annotations'
  for d in (images, ann / 'trimaps', ann / 'xmls'):
    d.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  counter = 0
  for split, count in (('trainval', num_trainval), ('test', num_test)):
    lines = []
    for _ in range(count):
      breed, species = _PET_BREEDS[counter % len(_PET_BREEDS)]
      counter += 1
      name = f'{breed}_{counter}'
      h = int(size[0] * rng.uniform(0.8, 1.25))
      w = int(size[1] * rng.uniform(0.8, 1.25))
      image, trimap, (x0, y0, x1, y1) = _pet(rng, species, h, w)
      (images / f'{name}.jpg').write_bytes(_jpeg(image))
      (ann / 'trimaps' / f'{name}.png').write_bytes(_png(trimap))
      if split == 'trainval':
        (ann / 'xmls' / f'{name}.xml').write_text(
            f'<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>'
            f'<object><name>{"cat" if species == 1 else "dog"}</name><bndbox><xmin>{x0}</xmin>'
            f'<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object></annotation>')
      lines.append(f'{name} {1 + _PET_BREEDS.index((breed, species))} {species} 1\n')
    (ann / f'{split}.txt').write_text(''.join(lines))
  return root


def build_pets(raw: str | os.PathLike, data_dir: str | os.PathLike) -> None:
  """Runs TFDS's own `oxford_iiit_pet` builder on a raw tree, in array_record format.

  The download step is replaced by the local tree (and the checksum lookup, which only
  matters for downloads, is skipped), so the records have the real feature encoding.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  raw = os.fspath(raw)
  paths = {'images': os.path.join(raw, 'images'), 'annotations': os.path.join(raw, 'annotations')}
  with mock.patch.object(tfds.core.DatasetBuilder, 'url_infos', None), \
       mock.patch.object(tfds.download.DownloadManager, 'download_and_extract', return_value=paths):
    builder = tfds.builder('oxford_iiit_pet', data_dir=os.fspath(data_dir), file_format='array_record')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))


def write_cityscapes_raw(root: str | os.PathLike, num_train: int, num_val: int, seed: int = 0,
                         size: tuple[int, int] = (256, 512)) -> pathlib.Path:
  """Writes leftImg8bit/, gtFine/ (labelIds) and disparity/ folders in the official naming."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  h, w = size
  yy, xx = np.mgrid[:h, :w]
  for split, count in (('train', num_train), ('val', num_val)):
    for i in range(count):
      city = ('aachen', 'bochum', 'frankfurt')[i % 3]
      stem = f'{city}/{city}_{i:06d}_000019'
      horizon = int(h * rng.uniform(0.35, 0.55))
      ids = np.where(yy < horizon, 23, 7).astype(np.uint8)          # sky / road
      y0, x0 = horizon - h // 10, int(rng.uniform(0.1, 0.7) * w)
      car = (yy >= y0) & (yy < y0 + h // 5) & (xx >= x0) & (xx < x0 + w // 5)
      ids[car] = 26
      disparity = np.where(yy < horizon, 0, 1 + 256 * (4 + 60 * (yy - horizon) / h)).astype(np.uint16)
      disparity[car] = 1 + 256 * 30
      palette = {23: (120, 160, 220), 7: (90, 90, 90), 26: (160, 30, 30)}
      image = np.zeros((h, w, 3), np.float32)
      for label, colour in palette.items():
        image[ids == label] = colour
      image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
      for package, name, array in (('leftImg8bit', 'leftImg8bit', image),
                                   ('gtFine', 'gtFine_labelIds', ids),
                                   ('disparity', 'disparity', disparity)):
        path = root / package / split / f'{stem}_{name}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png(array))
  return root
