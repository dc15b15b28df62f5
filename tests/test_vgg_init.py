"""Tests for the VGG16 encoder initialisation, on a fake torchvision-format state_dict."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')

from mtan_jax import steps, tasks as tasks_lib  # pylint: disable=g-import-not-at-top
from mtan_jax.errors import ConfigError, DataError  # pylint: disable=g-import-not-at-top
from mtan_jax.models import vgg_init  # pylint: disable=g-import-not-at-top

VGG_WIDTHS = (64, 128, 256, 512, 512)


def _fake_state_dict(indices=vgg_init.VGG16_CONV_INDICES, seed=0):
  """Random weights under torchvision's vgg16 names, plus classifier keys to be ignored."""
  gen = torch.Generator().manual_seed(seed)
  state = collections.OrderedDict()
  for index, (cin, cout) in zip(indices, vgg_init.VGG16_CONV_CHANNELS):
    state[f'features.{index}.weight'] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
    state[f'features.{index}.bias'] = torch.randn(cout, generator=gen)
  # The real classifier is 4096x25088; small stand-ins are enough to prove it is ignored.
  for i in (0, 3, 6):
    state[f'classifier.{i}.weight'] = torch.randn(8, 4, generator=gen)
    state[f'classifier.{i}.bias'] = torch.randn(8, generator=gen)
  return state


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  root = tmp_path_factory.mktemp('vgg')
  state = _fake_state_dict()
  pth = root / 'vgg16.pth'
  torch.save(state, pth)
  npz = root / 'vgg16.npz'
  np.savez(npz, **{k: v.numpy() for k, v in state.items() if k.startswith('features.')})
  return {'state': state, 'pth': pth, 'npz': npz, 'root': root}


def _params(model_name, task_names, widths=VGG_WIDTHS, in_channels=3):
  """(graphdef, params, batch_stats) of `create_model`, filled with random values.

  The model is built abstractly (nnx.eval_shape) and its leaves filled from numpy: running
  the real initialisers compiles dozens of RNG ops and takes ~25 s on two CPU cores, while
  the tree structure, names, shapes and dtypes, which is all the init reads, are the same.
  Random values (BatchNorm scale and bias too) make the "left untouched" checks meaningful.
  """
  task_list = tasks_lib.make_tasks(task_names, 7)
  model = nnx.eval_shape(lambda: steps.create_model(model_name, task_list, widths=widths, seed=0,
                                                    in_channels=in_channels))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  rng = np.random.default_rng(0)
  fill = lambda x: jnp.asarray(rng.standard_normal(x.shape, dtype=np.float32).astype(x.dtype))
  return graphdef, jax.tree_util.tree_map(fill, params), jax.tree_util.tree_map(fill, batch_stats)


def _flat(params):
  return {vgg_init._path_names(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _check_encoder(old, new, state, in_channels=3):
  old_flat, new_flat = _flat(old), _flat(new)
  assert old_flat.keys() == new_flat.keys()
  replaced = set()
  for layer, (module, index) in enumerate(zip(vgg_init.ENCODER_CONV_PATHS,
                                              vgg_init.VGG16_CONV_INDICES)):
    kernel = state[f'features.{index}.weight'].numpy().transpose(2, 3, 1, 0)
    if layer == 0 and in_channels == 1:
      kernel = kernel.sum(axis=2, keepdims=True)
    bias = state[f'features.{index}.bias'].numpy()
    new_kernel, new_bias = new_flat[module + ('kernel',)], new_flat[module + ('bias',)]
    assert new_kernel.dtype == jnp.float32 and new_kernel.shape == kernel.shape
    np.testing.assert_allclose(np.asarray(new_kernel), kernel, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new_bias), bias)
    replaced |= {module + ('kernel',), module + ('bias',)}
  assert len(replaced) == 26
  # Everything else, BatchNorm of the encoder included, is untouched.
  for key, leaf in old_flat.items():
    if key not in replaced:
      np.testing.assert_array_equal(np.asarray(new_flat[key]), np.asarray(leaf), err_msg=str(key))
  assert any(k[0] == 'encoder_block' and 'bn' in k for k in old_flat)


def test_load_pth_and_npz_agree(weights):
  from_pth = vgg_init.load_vgg16(weights['pth'])
  from_npz = vgg_init.load_vgg16(weights['npz'])
  assert len(from_pth) == 13
  for (k1, b1), (k2, b2), (cin, cout) in zip(from_pth, from_npz, vgg_init.VGG16_CONV_CHANNELS):
    assert k1.shape == (3, 3, cin, cout) and k1.dtype == np.float32
    assert b1.shape == (cout,) and b1.dtype == np.float32
    np.testing.assert_array_equal(k1, k2)
    np.testing.assert_array_equal(b1, b2)
  # Spot-check the transpose by element: HWIO[h, w, i, o] == OIHW[o, i, h, w].
  w = weights['state']['features.5.weight'].numpy()
  assert from_pth[2][0][1, 2, 7, 11] == w[11, 7, 1, 2]


def test_segnet_encoder_init(weights):
  graphdef, params, batch_stats = _params('segnet', ('semantic',))
  new = vgg_init.init_encoder_from_vgg16(params, weights['pth'])
  assert isinstance(new, nnx.State)
  _check_encoder(params, new, weights['state'])
  # The new state still merges into a model.
  model = nnx.merge(graphdef, new, batch_stats)
  np.testing.assert_array_equal(np.asarray(model.encoder_block[0].conv.bias[...]),
                                weights['state']['features.0.bias'].numpy())


def test_mtan_encoder_init_from_npz_and_pure_dict(weights):
  _, params, _ = _params('mtan', ('semantic', 'depth'))
  new = vgg_init.init_encoder_from_vgg16(params, weights['npz'])
  _check_encoder(params, new, weights['state'])
  pure = vgg_init.init_encoder_from_vgg16(nnx.to_pure_dict(params), weights['npz'])
  _check_encoder(nnx.to_pure_dict(params), pure, weights['state'])


def test_first_conv_matches_torch(weights):
  """lax.conv with the imported kernel equals F.conv2d with the original: guards OIHW->HWIO."""
  kernel, bias = vgg_init.load_vgg16(weights['pth'])[0]
  image = np.random.default_rng(0).random((2, 3, 12, 10), dtype=np.float32)  # NCHW
  expected = torch.nn.functional.conv2d(torch.from_numpy(image), weights['state']['features.0.weight'],
                                        weights['state']['features.0.bias'], padding=1).numpy()
  out = jax.lax.conv_general_dilated(jnp.asarray(image.transpose(0, 2, 3, 1)), jnp.asarray(kernel),
                                     (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                     precision=jax.lax.Precision.HIGHEST) + bias
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, rtol=1e-5, atol=1e-5)


def test_single_channel_sums_first_kernel(weights):
  _, params, _ = _params('segnet', ('semantic',), in_channels=1)
  new = vgg_init.init_encoder_from_vgg16(params, weights['pth'], in_channels=1)
  _check_encoder(params, new, weights['state'], in_channels=1)
  # A gray image through the summed kernel == the same image replicated to RGB through VGG's.
  kernel1 = np.asarray(_flat(new)[('encoder_block', 0, 'conv', 'kernel')])
  kernel3 = vgg_init.load_vgg16(weights['pth'])[0][0]
  gray = np.random.default_rng(1).random((1, 8, 8, 1), dtype=np.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(conv(gray, kernel1), conv(np.repeat(gray, 3, axis=-1), kernel3),
                             rtol=1e-5, atol=1e-5)


def test_vgg16_bn_naming(weights):
  root = weights['root']
  state = _fake_state_dict(vgg_init.VGG16_BN_CONV_INDICES, seed=1)
  state['features.1.weight'] = torch.ones(64)  # a BatchNorm parameter, ignored
  torch.save(state, root / 'vgg16_bn.pth')
  layers = vgg_init.load_vgg16(root / 'vgg16_bn.pth')
  np.testing.assert_array_equal(layers[1][0], state['features.3.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(layers[12][1], state['features.40.bias'].numpy())


def _error(error_type, fn, *args, **kwargs):
  with pytest.raises(error_type) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert '\n' not in message
  return message


def test_wrong_widths_and_in_channels(weights):
  _, params, _ = _params('segnet', ('semantic',), widths=(4, 8, 8, 8, 8))
  message = _error(ConfigError, vgg_init.init_encoder_from_vgg16, params, weights['pth'])
  assert 'config.widths=(64, 128, 256, 512, 512)' in message
  assert 'encoder_block.0.conv.kernel' in message and '(3, 3, 3, 4)' in message
  assert '(3, 3, 3, 64)' in message
  # Checked before the file is read: a missing file does not hide the real problem.
  _error(ConfigError, vgg_init.init_encoder_from_vgg16, params, weights['root'] / 'none.pth')
  message = _error(ConfigError, vgg_init.init_encoder_from_vgg16, params, weights['pth'],
                   in_channels=2)
  assert 'in_channels=2' in message
  message = _error(ConfigError, vgg_init.init_encoder_from_vgg16, params, weights['pth'],
                   in_channels=1)
  assert 'takes 3 input channels' in message
  message = _error(ConfigError, vgg_init.init_encoder_from_vgg16, {'head': np.zeros(3)},
                   weights['pth'])
  assert 'encoder_block.0.conv.kernel' in message


def test_bad_files(weights):
  root = weights['root']
  missing = root / 'missing.pth'
  message = _error(DataError, vgg_init.load_vgg16, missing)
  assert str(missing) in message and 'not found' in message

  state = _fake_state_dict()
  del state['features.28.weight']
  torch.save(state, root / 'no_key.pth')
  message = _error(DataError, vgg_init.load_vgg16, root / 'no_key.pth')
  assert 'no_key.pth' in message and "'features.28.weight'" in message

  state = _fake_state_dict()
  state['features.5.weight'] = torch.zeros(128, 32, 3, 3)
  np.savez(root / 'bad_shape.npz', **{k: v.numpy() for k, v in state.items()})
  message = _error(DataError, vgg_init.load_vgg16, root / 'bad_shape.npz')
  assert 'features.5.weight' in message and '(128, 32, 3, 3)' in message
  assert '(128, 64, 3, 3)' in message

  torch.save([1, 2, 3], root / 'list.pth')
  assert 'state_dict' in _error(DataError, vgg_init.load_vgg16, root / 'list.pth')
  (root / 'garbage.pth').write_bytes(b'not a torch file')
  assert 'garbage.pth' in _error(DataError, vgg_init.load_vgg16, root / 'garbage.pth')
  (root / 'garbage.npz').write_bytes(b'not a zip')
  assert 'garbage.npz' in _error(DataError, vgg_init.load_vgg16, root / 'garbage.npz')
  (root / 'weights.h5').write_bytes(b'')
  assert '.h5' in _error(DataError, vgg_init.load_vgg16, root / 'weights.h5')
