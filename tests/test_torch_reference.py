"""Tests for the PyTorch SegNet / SegNet-MTAN re-implementation.

The parity tests against the original lorenmt/mtan code need a checkout of that repository
named by the environment variable MTAN_TORCH_REF; they are skipped when it is unset.
"""

import os

import pytest

torch = pytest.importorskip('torch')

from mtan_jax import torch_reference as tr  # pylint: disable=wrong-import-position

NYU_TASKS = [('semantic', 13), ('depth', 1), ('normal', 3)]
CITYSCAPES_TASKS = [('semantic', 7), ('depth', 1)]
TINY_WIDTHS = (4, 8, 8, 16, 16)


@pytest.mark.parametrize('tasks, expected', [
    (NYU_TASKS, 44_229_076),
    (CITYSCAPES_TASKS, 41_206_986),
])
def test_mtan_parameter_count(tasks, expected):
  assert tr.count_parameters(tr.TorchMTAN(tasks)) == expected


@pytest.mark.parametrize('task, expected', [
    (('semantic', 13), 24_981_069),
    (('semantic', 7), 24_980_679),
    (('depth', 1), 24_980_289),
])
def test_segnet_parameter_count(task, expected):
  assert tr.count_parameters(tr.TorchSegNet(task)) == expected


def test_mtan_state_dict_names():
  model = tr.TorchMTAN(NYU_TASKS, widths=TINY_WIDTHS)
  keys = set(model.state_dict())
  for key in ['encoder_block.0.0.weight', 'conv_block_enc.2.1.0.weight',
              'encoder_att.1.2.4.running_mean', 'decoder_att.0.4.0.weight',
              'encoder_block_att.4.0.weight', 'decoder_block_att.0.1.bias',
              'pred_task1.0.weight', 'pred_task3.1.bias', 'logsigma']:
    assert key in keys
  assert torch.equal(model.logsigma.detach(), torch.full((3,), -0.5))


def _check_predictions(kinds_and_preds, batch, height, width):
  for (kind, channels), pred in kinds_and_preds:
    assert pred.shape == (batch, channels, height, width)
    if kind == 'semantic':
      torch.testing.assert_close(pred.exp().sum(dim=1), torch.ones(batch, height, width))
    elif kind == 'normal':
      torch.testing.assert_close(pred.norm(dim=1), torch.ones(batch, height, width))


@pytest.mark.parametrize('train', [True, False])
def test_mtan_tiny_outputs(train):
  torch.manual_seed(0)
  model = tr.TorchMTAN(NYU_TASKS, widths=TINY_WIDTHS).train(train)
  with torch.no_grad():
    preds, logsigma = model(torch.randn(2, 3, 32, 64))
  assert len(preds) == len(NYU_TASKS)
  assert logsigma is model.logsigma
  _check_predictions(zip(NYU_TASKS, preds), 2, 32, 64)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('task', [('semantic', 7), ('depth', 1), ('normal', 3)])
def test_segnet_tiny_outputs(task, train):
  torch.manual_seed(0)
  model = tr.TorchSegNet(task, widths=TINY_WIDTHS).train(train)
  with torch.no_grad():
    pred = model(torch.randn(2, 3, 32, 64))
  _check_predictions([(task, pred)], 2, 32, 64)


def test_invalid_configs_raise():
  with pytest.raises(ValueError, match='unknown task kind'):
    tr.TorchMTAN([('edges', 1)], widths=TINY_WIDTHS)
  with pytest.raises(ValueError, match='last two widths'):
    tr.TorchMTAN(NYU_TASKS, widths=(4, 8, 8, 16, 32))
  with pytest.raises(ValueError, match='at least one task'):
    tr.TorchMTAN([], widths=TINY_WIDTHS)


def test_loader_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='model_segnet_mtan.py'):
    tr.load_reference_segnet(tmp_path)
  script = tmp_path / 'im2im_pred' / 'model_segnet_mtan.py'
  script.parent.mkdir()
  script.write_text('raise SystemExit("module-level code must not run")\n')
  with pytest.raises(ValueError, match=str(script)):
    tr.load_reference_segnet(tmp_path)


@pytest.fixture(scope='module')
def reference_cls():
  """The original SegNet-MTAN class from the checkout named by MTAN_TORCH_REF."""
  checkout = os.environ.get('MTAN_TORCH_REF')
  if not checkout:
    pytest.skip('MTAN_TORCH_REF (a lorenmt/mtan checkout) is not set')
  return tr.load_reference_segnet(checkout)


def _seeded_pair(reference_cls):
  """The original model and TorchMTAN for NYUv2, each built from seed 0."""
  torch.manual_seed(0)
  reference = reference_cls()
  torch.manual_seed(0)
  return reference, tr.TorchMTAN(NYU_TASKS)


def test_reference_state_dict_matches(reference_cls):
  reference, ours = _seeded_pair(reference_cls)
  ref_state, our_state = reference.state_dict(), ours.state_dict()
  assert list(ref_state) == list(our_state)
  assert {k: v.shape for k, v in ref_state.items()} == {
      k: v.shape for k, v in our_state.items()}
  # Same registration order means the same random draws at init, so seeded weights agree.
  for key, value in ref_state.items():
    assert torch.equal(value, our_state[key]), key


def test_reference_forward_matches(reference_cls):
  reference, ours = _seeded_pair(reference_cls)
  generator = torch.Generator().manual_seed(1)
  state = reference.state_dict()
  for key, value in state.items():
    # At init eval-mode BN is the identity and biases are zero, so the outputs barely
    # depend on the attention path (a wrong interpolation moved them by ~1e-12). Perturbing
    # BN affine/statistics and biases makes every one of them matter.
    if value.is_floating_point() and value.dim() == 1:
      state[key] = value + 0.1 * torch.rand(value.shape, generator=generator)
  x = torch.randn(1, 3, 64, 64, generator=generator)
  for train in (False, True):
    reference.load_state_dict(state)
    ours.load_state_dict(state)
    reference.train(train)
    ours.train(train)
    with torch.no_grad():
      ref_preds, ref_logsigma = reference(x)
      our_preds, our_logsigma = ours(x)
    assert len(ref_preds) == len(our_preds) == len(NYU_TASKS)
    for ref_pred, our_pred in zip(ref_preds, our_preds):
      torch.testing.assert_close(our_pred, ref_pred, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_logsigma, ref_logsigma)
    # In train mode BN also updates its running statistics; they must move identically.
    our_state = ours.state_dict()
    for key, value in reference.state_dict().items():
      torch.testing.assert_close(our_state[key], value, rtol=1e-5, atol=1e-6)
