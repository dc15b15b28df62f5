"""NumPy helpers shared by the tests of the PCGrad/GradVac/GradDrop/GradNorm/DB-MTL/FAMO/RLW/GLS
weighting methods: random per-task gradient pytrees, flattening, and a torch-style Adam step.

The references themselves are written out in each test file, in float64, with loops as in the
papers' and LibMTL's code.
"""

import jax
import jax.numpy as jnp
import numpy as np


def random_grads(seed, num_tasks, conflict=True):
  """A dict pytree of two leaves, (T, 2, 3) and (T, 4), float32.

  With `conflict` the gradients are low dimensional (10 numbers) and independent, so about
  half of the pairs conflict (tasks 0 and 1 always do); otherwise they are a common positive vector plus small noise,
  so no pair conflicts.
  """
  rng = np.random.default_rng(seed)
  if conflict:
    flat = rng.normal(size=(num_tasks, 10))
    flat *= rng.uniform(0.2, 3.0, size=(num_tasks, 1))  # Different scales per task.
    if num_tasks > 1 and flat[0] @ flat[1] >= 0:
      flat[1] = -flat[1]  # At least one conflicting pair.
  else:
    flat = 1.0 + rng.uniform(0.0, 1.0, size=(1, 10)) + 0.1 * rng.normal(size=(num_tasks, 10))
  flat = flat.astype(np.float32)
  return {'w': jnp.asarray(flat[:, :6].reshape(num_tasks, 2, 3)),
          'b': jnp.asarray(flat[:, 6:])}


def flatten(tree):
  """(T, P) float64 of a per-task pytree (leaves in `jax.tree.leaves` order)."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1)


def flatten_one(tree):
  """(P,) float64 of a pytree without the task axis."""
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def shared_shapes(grads):
  """The shared parameters' shapes (leading task axis dropped), as `init_state` receives."""
  return jax.tree.map(lambda g: jax.ShapeDtypeStruct(g.shape[1:], g.dtype), grads)


class NumpyAdam:
  """torch.optim.Adam in float64: weight_decay is L2 added to the gradient (torch style)."""

  def __init__(self, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
    self.m = self.v = None
    self.t = 0

  def step(self, param, grad):
    param = np.asarray(param, np.float64)
    grad = np.asarray(grad, np.float64) + self.wd * param
    if self.m is None:
      self.m = np.zeros_like(param)
      self.v = np.zeros_like(param)
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * grad
    self.v = self.b2 * self.v + (1 - self.b2) * grad ** 2
    m_hat = self.m / (1 - self.b1 ** self.t)
    v_hat = self.v / (1 - self.b2 ** self.t)
    return param - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def assert_close(actual, expected, rtol=1e-5):
  """Elementwise closeness relative to the largest entry of `expected`."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  scale = max(np.abs(expected).max(), 1e-12)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)
