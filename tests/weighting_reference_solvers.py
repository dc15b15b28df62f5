"""NumPy/SciPy references for the tests of the solver-based gradient-weighting methods.

Everything here is float64 and independent of `mtan_jax`: plain loops and SciPy solvers,
used to check the on-device solvers (MGDA, CAGrad, Nash-MTL, UPGrad, Aligned-MTL, IMTL-G).
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import optimize


def random_grads(seed: int, num_tasks: int, conflict: bool = True) -> dict[str, np.ndarray]:
  """A dict pytree of per-task gradients (two leaves, leading task axis) in float32.

  With `conflict`, task 0's gradient is pushed against the others so some pairs have
  negative inner products.
  """
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(num_tasks, 7, 3))
  b = rng.normal(size=(num_tasks, 5))
  if conflict and num_tasks > 1:
    a[0] -= 1.5 * a[1:].mean(0)
    b[0] -= 1.5 * b[1:].mean(0)
  scale = rng.uniform(0.3, 3.0, size=num_tasks)
  return {'a': (a * scale[:, None, None]).astype(np.float32),
          'b': (b * scale[:, None]).astype(np.float32)}


def flat(grads: dict[str, np.ndarray]) -> np.ndarray:
  """(T, P) float64 matrix of the flattened per-task gradients (leaves in sorted key order)."""
  keys = sorted(grads)
  t = grads[keys[0]].shape[0]
  return np.concatenate([np.asarray(grads[k], np.float64).reshape(t, -1) for k in keys], axis=1)


def unflat(vec: np.ndarray, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits a flat (P,) vector into the leaves of `like` without their task axis."""
  out, start = {}, 0
  for k in sorted(like):
    shape = like[k].shape[1:]
    size = int(np.prod(shape))
    out[k] = vec[start:start + size].reshape(shape)
    start += size
  return out


def min_norm_exact(gram: np.ndarray) -> np.ndarray:
  """argmin_{w in simplex} w^T G w, exactly, by enumerating the supports of w.

  For each support S the equality-constrained minimiser solves the KKT system
  [[G_SS, 1], [1^T, 0]] [w; mu] = [0; 1] (least squares if singular); the answer is the
  feasible (w >= 0) candidate with the smallest objective.
  """
  t = gram.shape[0]
  best, best_val = None, np.inf
  for r in range(1, t + 1):
    for s in itertools.combinations(range(t), r):
      s = list(s)
      k = np.zeros((r + 1, r + 1))
      k[:r, :r] = gram[np.ix_(s, s)]
      k[:r, r] = 1.0
      k[r, :r] = 1.0
      rhs = np.zeros(r + 1)
      rhs[r] = 1.0
      sol = np.linalg.lstsq(k, rhs, rcond=None)[0]
      w = np.zeros(t)
      w[s] = sol[:r]
      if np.all(w >= -1e-12) and abs(w.sum() - 1) < 1e-9:
        val = w @ gram @ w
        if val < best_val - 1e-15:
          best, best_val = np.clip(w, 0, None), val
  return best


def min_norm_slsqp(gram: np.ndarray) -> np.ndarray:
  """The same problem by SciPy's SLSQP (a second, independent check)."""
  t = gram.shape[0]
  res = optimize.minimize(lambda w: w @ gram @ w, np.ones(t) / t, jac=lambda w: 2 * gram @ w,
                          bounds=[(0, 1)] * t,
                          constraints={'type': 'eq', 'fun': lambda w: w.sum() - 1},
                          method='SLSQP', options={'ftol': 1e-15, 'maxiter': 1000})
  return res.x


def box_qp_slsqp(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
  """min_v v^T G v s.t. v >= u by SciPy (L-BFGS-B with bounds, then SLSQP polish)."""
  scale = np.abs(gram).max()
  g = gram / scale
  res = optimize.minimize(lambda v: v @ g @ v, u.copy(), jac=lambda v: 2 * g @ v,
                          bounds=[(ui, None) for ui in u], method='L-BFGS-B',
                          options={'ftol': 1e-16, 'gtol': 1e-14, 'maxiter': 10000})
  return res.x


def box_qp_exact(gram: np.ndarray, u: np.ndarray) -> np.ndarray:
  """min_v v^T G v s.t. v >= u (G positive definite), by enumerating active sets (KKT)."""
  t = gram.shape[0]
  best, best_val = None, np.inf
  for active in itertools.product([False, True], repeat=t):
    active = np.array(active)
    free = ~active
    v = np.where(active, u, 0.0)
    if free.any():
      rhs = -gram[np.ix_(free, active)] @ u[active]
      v[free] = np.linalg.solve(gram[np.ix_(free, free)], rhs)
    if np.all(v >= u - 1e-12):
      val = v @ gram @ v
      if val < best_val:
        best, best_val = v, val
  return best
