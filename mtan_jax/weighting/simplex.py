"""Small on-device solvers shared by the gradient-weighting methods (T x T problems).

Every function here is pure `jnp` with static shapes, so it runs inside the jitted train
step; iterative pieces use a fixed iteration count. The problems are tiny (T is the number
of tasks, 2..5 in practice), so the solvers favour exactness and robustness over speed:

- `project_simplex`: Euclidean projection onto the probability simplex (the sort-based
  algorithm, as the MGDA authors' `_projection2simplex`).
- `box_qp`: the exact solution of min_v v^T G v s.t. v >= u for a positive definite G, by
  enumerating the 2^T active sets (no iteration count, no tolerance to tune).
- `hmatvec` / `quad`: T x T products at full float32 precision (the GPU default precision
  for float32 matmuls may be TF32, too coarse for these solves).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def hmatvec(m: jax.Array, v: jax.Array) -> jax.Array:
  """m @ v for a (..., T, T) matrix and a (..., T) vector at full float32 precision."""
  return jnp.einsum('...ij,...j->...i', m, v, precision=_HIGHEST)


def quad(m: jax.Array, v: jax.Array) -> jax.Array:
  """v^T m v at full float32 precision."""
  return jnp.einsum('...i,...i->...', v, hmatvec(m, v), precision=_HIGHEST)


def project_simplex(y: jax.Array) -> jax.Array:
  """Euclidean projection of y (..., T) onto {w >= 0, sum w = 1}.

  The sort-based algorithm (Held et al. 1974; the MGDA authors' `_projection2simplex`):
  the threshold tau is (sum of the k largest - 1) / k for the largest k whose k-th largest
  entry is still above it.
  """
  t = y.shape[-1]
  s = -jnp.sort(-y, axis=-1)  # descending
  css = jnp.cumsum(s, axis=-1) - 1.0
  ks = jnp.arange(1, t + 1, dtype=y.dtype)
  cond = s - css / ks > 0
  # The number of entries above the threshold; at least 1 (the largest always is).
  k = jnp.maximum(jnp.sum(cond, axis=-1), 1)
  tau = jnp.take_along_axis(css, (k - 1)[..., None], axis=-1) / k[..., None].astype(y.dtype)
  return jnp.maximum(y - tau, 0.0)


def active_set_masks(t: int) -> np.ndarray:
  """All 2^t subsets of {0..t-1} as a (2^t, t) bool array (True: the constraint is active)."""
  return np.array(list(itertools.product([False, True], repeat=t)), dtype=bool)


def box_qp(g: jax.Array, u: jax.Array) -> jax.Array:
  """Exact solution of min_v v^T G v s.t. v >= u, for each row u of `u`.

  G must be symmetric positive definite (callers regularise it). For every active set S
  (v_S = u_S) the candidate is the minimiser on that face, which solves (G v)_F = 0 on the
  free coordinates F; the solution is the candidate satisfying the KKT conditions (primal
  v >= u, dual (G v)_S >= 0). With T tasks this solves 2^T small linear systems per row,
  negligible for the T <= ~8 of multi-task learning, and exact up to float32 round-off
  (one step of iterative refinement is applied). The candidate with the smallest KKT
  violation is chosen, which is robust to round-off: a wrong active set violates a
  condition by a clear margin unless it (nearly) coincides with the solution.

  Args:
    g: (T, T) symmetric positive definite matrix.
    u: (R, T) lower bounds, one problem per row.

  Returns:
    (R, T) solutions.
  """
  t = g.shape[-1]
  g = g.astype(jnp.float32)
  u = u.astype(jnp.float32)
  active = jnp.asarray(active_set_masks(t))  # (S, T)
  eye = jnp.eye(t, dtype=jnp.float32)
  # Row i of the system: free -> (G v)_i = 0; active -> v_i = u_i.
  mats = jnp.where(active[:, :, None], eye[None], g[None])  # (S, T, T)
  rhs = jnp.where(active[None], u[:, None, :], 0.0)  # (R, S, T)
  mats_b = jnp.broadcast_to(mats[None], rhs.shape + (t,))
  v = jnp.linalg.solve(mats_b, rhs[..., None])[..., 0]
  # One step of iterative refinement: worth it when G is ill-conditioned (reg ~1e-4).
  resid = rhs - hmatvec(mats_b, v)
  v = v + jnp.linalg.solve(mats_b, resid[..., None])[..., 0]
  gv = hmatvec(g, v)  # (R, S, T)
  u_scale = jnp.max(jnp.abs(u), axis=-1, keepdims=True)[:, None, :] + 1e-30  # (R, 1, 1)
  g_scale = jnp.max(jnp.abs(g)) * u_scale + 1e-30
  primal = jnp.max(jnp.maximum(u[:, None, :] - v, 0.0), axis=-1) / u_scale[..., 0]
  dual = jnp.max(jnp.where(active[None], jnp.maximum(-gv, 0.0), 0.0), axis=-1) / g_scale[..., 0]
  bad = ~jnp.all(jnp.isfinite(v), axis=-1)
  violation = jnp.where(bad, jnp.inf, primal + dual)  # (R, S)
  best = jnp.argmin(violation, axis=-1)  # (R,)
  return jnp.take_along_axis(v, best[:, None, None], axis=1)[:, 0, :]
