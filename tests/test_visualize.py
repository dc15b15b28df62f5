"""Pictures of every task (visualize.py) and predict.py's per-image files, without training."""

import types

import numpy as np
import pytest
from PIL import Image

from mtan_jax import visualize
from mtan_jax.data.pipeline import Transforms
from mtan_jax.predict import fit, lightness, write_outputs
from mtan_jax.tasks import make_tasks

H, W = 32, 64


def _rng_image(seed=0):
  return np.random.default_rng(seed).uniform(size=(H, W, 3)).astype(np.float32)


def test_palettes_and_label_colours():
  assert visualize.palette('cityscapes', 7)[0].tolist() == [128, 64, 128]  # flat / road purple
  assert visualize.palette('synthetic', 7).tolist() == visualize.palette('cityscapes_tfds', 7).tolist()
  assert visualize.palette('cityscapes', 19)[13].tolist() == [0, 0, 142]  # car
  voc = visualize.palette('pets', 2)
  assert voc.tolist() == [[0, 0, 0], [128, 0, 0]]
  assert visualize.voc_palette(21)[15].tolist() == [192, 128, 128]  # VOC 'person'
  labels = np.array([[0, 1], [-1, 6]])
  rgb = visualize.colorize_labels(labels, visualize.palette('cityscapes', 7))
  assert rgb[1, 0].tolist() == [0, 0, 0] and rgb[1, 1].tolist() == [0, 0, 142]


def test_colormap_ends_and_lab_round_trip():
  ramp = visualize.colormap(np.linspace(0, 1, 9)[None], 'viridis', 0, 1)[0]
  assert ramp[0].tolist() == [68, 1, 84] and ramp[-1].tolist() == [253, 231, 37]
  # lab_to_rgb inverts the training pipeline's rgb_to_lab (TensorFlow).
  from mtan_jax.data import aux_targets
  rgb = _rng_image(1)
  lab = aux_targets.rgb_to_lab(rgb).numpy()
  np.testing.assert_allclose(visualize.lab_to_rgb(lab), rgb, atol=2e-4)
  # predict.py's NumPy lightness equals the pipeline's colourisation input.
  np.testing.assert_allclose(lightness(rgb), aux_targets.colorization(rgb)[0].numpy(), atol=2e-5)


def test_every_task_has_target_and_prediction_pictures():
  tasks = make_tasks(('semantic', 'depth', 'normal', 'species', 'bbox', 'edges', 'colorization',
                      'denoising'), 7, image_size=(H, W))
  rng = np.random.default_rng(0)
  image = _rng_image()
  normal = rng.normal(size=(H, W, 3))
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  preds = {'semantic': np.log(rng.dirichlet(np.ones(7), size=(H, W))), 'depth': rng.uniform(size=(H, W, 1)),
           'normal': normal, 'species': np.log([0.3, 0.7]), 'bbox': np.array([4.0, 8.0, 20.0, 40.0]),
           'edges': rng.uniform(size=(H, W, 1)), 'colorization': rng.uniform(-0.3, 0.3, size=(H, W, 2)),
           'denoising': image}
  targets = {'semantic': rng.integers(-1, 7, size=(H, W)), 'depth': rng.uniform(size=(H, W, 1)),
             'normal': normal, 'species': 1, 'bbox': np.array([2.0, 2.0, 30.0, 60.0]),
             'edges': (rng.uniform(size=(H, W, 1)) > 0.8).astype(np.float32),
             'colorization': rng.uniform(-0.3, 0.3, size=(H, W, 2)), 'denoising': image}
  for task in tasks:
    pred_pic, target_pic = visualize.task_pictures(task, image, preds[task.name], targets[task.name])
    for pic in (pred_pic, target_pic):
      assert pic.shape == (H, W, 3) and pic.dtype == np.uint8, task.name
    # A species target is one class colour; everything else has structure (the species
    # prediction is a bar as long as its probability).
    pics = (pred_pic,) if task.name == 'species' else (pred_pic, target_pic)
    for pic in pics:
      assert len(np.unique(pic.reshape(-1, 3), axis=0)) >= 2, task.name
  # The box outline is drawn in red on the input.
  box = visualize.task_pictures(tasks[4], image, preds['bbox'], None)[0]
  assert box[4, 20].tolist() == [255, 64, 64]
  batch = {'image': image[None], **{t.target_key: np.asarray(targets[t.name])[None] for t in tasks}}
  grid = visualize.evaluation_grid(tasks, batch, [np.asarray(preds[t.name])[None] for t in tasks])
  assert grid.shape == (H + 4, (1 + 2 * len(tasks)) * (W + 2) + 2, 3)


def test_predict_outputs_of_a_pets_and_a_colorization_model(tmp_path):
  """write_outputs for image-level and self-supervised heads (fed fake predictions)."""
  rng = np.random.default_rng(0)
  image = _rng_image()
  pets = types.SimpleNamespace(
      config=types.SimpleNamespace(dataset='pets', num_classes=2),
      tasks=make_tasks(('semantic', 'species', 'bbox'), 2, image_size=(H, W)), transforms=Transforms())
  preds = [np.log(rng.dirichlet(np.ones(2), size=(H, W))), np.log(np.array([0.2, 0.8])),
           np.array([3.0, 5.0, 25.0, 50.0])]
  written = write_outputs(pets, 'pet', image, preds, None, str(tmp_path), 'enc0')
  names = sorted(p.split('/')[-1] for p in written)
  assert names == ['pet.json', 'pet.npz', 'pet_bbox.png', 'pet_figure.png', 'pet_overlay.png',
                   'pet_semantic.png']
  summary = np.load(tmp_path / 'pet.npz')
  assert summary['semantic'].shape == (H, W) and summary['bbox'].tolist() == [3.0, 5.0, 25.0, 50.0]
  import json
  assert json.loads((tmp_path / 'pet.json').read_text())['species_probabilities'] == pytest.approx([0.2, 0.8])
  color = types.SimpleNamespace(
      config=types.SimpleNamespace(dataset='synthetic', num_classes=7),
      tasks=make_tasks(('colorization', 'edges'), 7), transforms=Transforms(colorization=True, edges=True))
  masks = rng.uniform(0.3, 0.7, size=(2, H, W)).astype(np.float32)
  written = write_outputs(color, 'c', image, [rng.uniform(-0.2, 0.2, (H, W, 2)), rng.uniform(size=(H, W, 1))],
                          masks, str(tmp_path), 'enc0')
  for name in ('c_colorization.png', 'c_edges.png', 'c_attention_enc0_colorization.png',
               'c_attention_enc0_edges.png', 'c_figure.png'):
    assert str(tmp_path / name) in written
    assert len(np.unique(np.asarray(Image.open(tmp_path / name).convert('RGB')).reshape(-1, 3), axis=0)) > 8


def test_fit_resizes_or_pads_to_a_multiple_of_32():
  image = _rng_image()[:20, :50]
  resized, keep = fit(image, 'resize', (32, 64))
  assert resized.shape == (32, 64, 3) and keep == (32, 64)
  padded, keep = fit(image, 'pad', (32, 64))
  assert padded.shape == (32, 64, 3) and keep == (20, 50)
  np.testing.assert_array_equal(padded[:20, :50], image)
  np.testing.assert_array_equal(padded[25, 55], image[19, 49])  # edge pixels repeated
