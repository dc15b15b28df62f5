"""MGDA (mtan_jax.weighting.mgda) against NumPy references of the min-norm problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.mgda import MGDA
from tests import weighting_reference_solvers as ref


_JITTED = {}


def _combine(method, grads, losses):
  """method.combine under jit (one compilation per method instance and shapes)."""
  t = len(losses)
  fn = _JITTED.setdefault(id(method), (method, jax.jit(method.combine)))[1]
  out, w, state = fn(
      jax.tree.map(jnp.asarray, grads), jnp.asarray(losses, jnp.float32),
      method.init_state(None), jax.random.key(0))
  assert w.shape == (t,)
  return jax.tree.map(np.asarray, out), np.asarray(w, np.float64), state


def _authors_min_norm(gram):
  """The authors' MinNormSolver.find_min_norm_element (isl-org/MultiObjectiveOptimization),
  in float64, on the Gram matrix, with their 0.999/0.001 clamps and early stop."""
  def from2(v11, v12, v22):
    if v12 >= v11:
      return 0.999, v11
    if v12 >= v22:
      return 0.001, v22
    gamma = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return gamma, v22 + gamma * (v12 - v22)

  def proj_simplex(y):
    m = len(y)
    sorted_y = np.flip(np.sort(y), axis=0)
    tmpsum, tmax_f = 0.0, (np.sum(y) - 1.0) / m
    for i in range(m - 1):
      tmpsum += sorted_y[i]
      tmax = (tmpsum - 1) / (i + 1.0)
      if tmax > sorted_y[i + 1]:
        tmax_f = tmax
        break
    return np.maximum(y - tmax_f, np.zeros(y.shape))

  def next_point(cur_val, grad, n):
    proj_grad = grad - (np.sum(grad) / n)
    tm1 = -1.0 * cur_val[proj_grad < 0] / proj_grad[proj_grad < 0]
    tm2 = (1.0 - cur_val[proj_grad > 0]) / (proj_grad[proj_grad > 0])
    t = 1
    if len(tm1[tm1 > 1e-7]) > 0:
      t = np.min(tm1[tm1 > 1e-7])
    if len(tm2[tm2 > 1e-7]) > 0:
      t = min(t, np.min(tm2[tm2 > 1e-7]))
    return proj_simplex(proj_grad * t + cur_val)

  n = gram.shape[0]
  dmin, sol = 1e8, None
  for i in range(n):
    for j in range(i + 1, n):
      c, d = from2(gram[i, i], gram[i, j], gram[j, j])
      if d < dmin:
        dmin, sol = d, [(i, j), c]
  w = np.zeros(n)
  w[sol[0][0]], w[sol[0][1]] = sol[1], 1 - sol[1]
  if n < 3:
    return w
  for _ in range(250):
    new_point = next_point(w, -gram @ w, n)
    nc, _ = from2(w @ gram @ w, w @ gram @ new_point, new_point @ gram @ new_point)
    new_w = nc * w + (1 - nc) * new_point
    if np.sum(np.abs(new_w - w)) < 1e-5:
      return w
    w = new_w
  return w


@pytest.mark.parametrize('t', [2, 3, 4])
def test_matches_exact_min_norm_point(t):
  method = MGDA(t)
  for seed in range(3):
    _check_min_norm(method, t, seed)


def _check_min_norm(method, t, seed):
  grads = ref.random_grads(seed, t)
  j = ref.flat(grads)
  gram = j @ j.T
  out, w, _ = _combine(method, grads, np.ones(t))
  w_exact = ref.min_norm_exact(gram)
  np.testing.assert_allclose(w, w_exact, atol=1e-3)
  np.testing.assert_allclose(w, ref.min_norm_slsqp(gram), atol=1e-3)
  np.testing.assert_allclose(w, _authors_min_norm(gram), atol=2e-3)  # their 0.999 clamps
  tr = np.trace(gram)
  assert abs(w @ gram @ w - w_exact @ gram @ w_exact) <= 1e-5 * tr
  # The combined update is sum_t w_t g_t.
  expect = ref.unflat(w @ j, grads)
  for k in grads:
    np.testing.assert_allclose(out[k], expect[k], rtol=1e-4, atol=1e-5 * np.sqrt(tr))
  # Properties: weights on the simplex; KKT g_t . d >= |d|^2 (every task descends).
  assert np.all(w >= -1e-7) and abs(w.sum() - 1) < 1e-5
  d = ref.flat({k: v[None] for k, v in out.items()})[0]
  assert np.all(j @ d >= d @ d - 1e-4 * tr)


def test_two_tasks_closed_form():
  method = MGDA(2)
  for seed in range(5):
    grads = ref.random_grads(seed, 2)
    j = ref.flat(grads)
    g1, g2 = j
    gamma = np.clip((g2 @ g2 - g1 @ g2) / ((g1 - g2) @ (g1 - g2)), 0, 1)
    _, w, _ = _combine(method, grads, np.ones(2))
    np.testing.assert_allclose(w, [gamma, 1 - gamma], atol=1e-5)


def test_dominated_gradient_is_exact():
  # g1 . g2 >= |g1|^2: the min-norm point is g1 itself (the authors' clamp gives 0.999).
  grads = {'a': np.array([[1.0, 0.0], [3.0, 1.0]], np.float32),
           'b': np.zeros((2, 5), np.float32)}
  _, w, _ = _combine(MGDA(2), grads, np.ones(2))
  np.testing.assert_allclose(w, [1.0, 0.0], atol=1e-6)


def test_frank_wolfe_option_close():
  for t in (3, 4):
    grads = ref.random_grads(7, t)
    j = ref.flat(grads)
    gram = j @ j.T
    _, w, _ = _combine(MGDA(t, frank_wolfe=1), grads, np.ones(t))
    we = ref.min_norm_exact(gram)
    assert w @ gram @ w - we @ gram @ we <= 2e-3 * np.trace(gram)


@pytest.mark.parametrize('name,code', [('l2', 1), ('loss', 2), ('loss+', 3)])
def test_normalization(name, code):
  t = 3
  grads = ref.random_grads(3, t)
  losses = np.array([0.5, 2.0, 1.3])
  j = ref.flat(grads)
  norms = np.linalg.norm(j, axis=1)
  n = {'l2': norms, 'loss': losses, 'loss+': losses * norms}[name]
  jn = j / n[:, None]
  sol = ref.min_norm_exact(jn @ jn.T)
  method = MGDA(t, normalization=name)
  assert method.hp['normalization'] == code
  out, w, _ = _combine(method, grads, losses)
  np.testing.assert_allclose(w, sol / n, atol=1e-3 / n.min())
  assert MGDA(t, normalization=float(code)).hp == method.hp


def test_jit_state_single_task_and_zero_grads():
  method = MGDA(3)
  grads = jax.tree.map(jnp.asarray, ref.random_grads(4, 3))
  state = method.init_state(None)
  step = jax.jit(method.combine)
  for i in range(3):
    out, w, state = step(grads, jnp.ones(3), state, jax.random.key(i))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  one = ref.random_grads(5, 1)
  out, w, _ = _combine(MGDA(1), one, np.ones(1))
  np.testing.assert_allclose(w, [1.0])
  zeros = jax.tree.map(np.zeros_like, ref.random_grads(6, 3))
  for norm in ('l2', 'loss+'):
    out, w, _ = _combine(MGDA(3, normalization=norm), zeros, np.zeros(3))
    assert np.all(np.isfinite(w)) and all(np.all(x == 0) for x in jax.tree.leaves(out))


def test_bad_hyperparameters():
  with pytest.raises(ConfigError, match='mgda.normalization'):
    MGDA(2, normalization='l1')
  with pytest.raises(ConfigError, match='mgda.normalization'):
    MGDA(2, normalization=5)
  with pytest.raises(ConfigError, match='mgda.max_iter'):
    MGDA(2, max_iter=2.5)
  with pytest.raises(ConfigError, match='mgda.frank_wolfe'):
    MGDA(2, frank_wolfe=3)
