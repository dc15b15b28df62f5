"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021 (arXiv:2110.14048). The update maximises the worst task's improvement in a
ball around the average gradient g0 = (1/T) sum_t g_t:

    max_d min_t <g_t, d>  s.t.  ||d - g0|| <= c ||g0||,

solved through its dual over the simplex, as in the authors' code (A = G, b = 1/T,
c = alpha ||g0||, with ||g0||^2 = mean(G)):

    w* = argmin_{w in simplex} w^T A b + c sqrt(w^T A w + 1e-8),
    g  = g0 + c / (||g_w*|| + 1e-8) * g_w*,    g_w = sum_t w_t g_t,

then rescaled, `rescale=1`: g / (1 + alpha^2) (0: none, 2: g / (1 + alpha)). The update is a
linear combination of the task gradients, with weights (1/T + lambda w*) / rescale.

Hyper-parameters:
  calpha (default 0.4): alpha (the paper's c). The authors' NYUv2 and Cityscapes scripts
    (Cranial-XIX/CAGrad, `run.sh`) use 0.4 (Cityscapes also 0.6); LibMTL's default is 0.5.
    MTAN is benchmarked on those two datasets, hence 0.4.
  rescale (default 1, the authors' and LibMTL's default): 0, 1 or 2 as above.
  solver_iters (default 20): polishing iterations of the on-device solver (see below).

Deviations from the original: the authors solve the dual with SciPy's SLSQP on the host;
here it is solved on device, exactly: on each face of the simplex (support S) the
stationary point has a closed form (one T x T solve pair, see `_face_candidates`), and the
best feasible one over all 2^T - 1 faces (and the centre) is the minimiser. A fixed number
of projected-gradient steps then polishes it, each taking the best of a geometric grid of
step sizes (a parallel line search: monotone, and needs no Lipschitz constant, which the
sqrt term lacks near g_w = 0); they matter only when a face's Gram block is singular.
The problem is solved on G scaled by its mean diagonal (the objective is homogeneous in G,
so the minimiser is the same). Parameter gradients,
as the authors and LibMTL (CAGrad is not defined on representation gradients there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, MethodState
from mtan_jax.weighting.simplex import active_set_masks, hmatvec, project_simplex, quad

# Step sizes of the parallel line search on the scaled problem: 2^3 .. 2^-36.
# NumPy, not jnp: importing this module must not start the JAX backend (before
# jax.distributed.initialize).
_STEPS = 2.0 ** np.arange(3, -37, -1, dtype=np.float32)


def cagrad_objective(a: jax.Array, c: jax.Array, w: jax.Array) -> jax.Array:
  """The authors' dual objective w^T A b + c sqrt(w^T A w + 1e-8) with b = 1/T (w: (..., T))."""
  b = jnp.full((a.shape[0],), 1.0 / a.shape[0], jnp.float32)
  return jnp.einsum('...i,i->...', w, hmatvec(a, b), precision=jax.lax.Precision.HIGHEST) + \
      c * jnp.sqrt(jnp.maximum(quad(a, w), 0.0) + 1e-8)


def _face_candidates(a: jax.Array, p: jax.Array, c: jax.Array) -> jax.Array:
  """The stationary point of the dual on every face of the simplex, (2^T - 1, T).

  On the face with support S, stationarity p_S + c A_SS w_S / ||g_w|| = mu 1 with
  sum w_S = 1 has the closed form w_S = (mu x - y) / sqrt(D), x = A_SS^-1 1,
  y = A_SS^-1 p_S, D = (1.x)^2 - (1.x)(p.y - c^2), mu = (1.y + sqrt(D)) / 1.x. Candidates
  that are infeasible (D <= 0, negative weights) are returned as NaN.
  """
  t = a.shape[0]
  masks = jnp.asarray(active_set_masks(t)[1:])  # (S, T), nonempty supports
  eye = jnp.eye(t, dtype=jnp.float32)
  # A tiny ridge keeps the solves finite when A_SS is singular (parallel gradients); the
  # polishing iterations then correct the candidate.
  a_r = a + 1e-6 * eye
  mats = jnp.where(masks[:, :, None] & masks[:, None, :], a_r[None], eye[None])
  ones = masks.astype(jnp.float32)
  ps = jnp.where(masks, p[None], 0.0)
  x = jnp.linalg.solve(mats, ones[..., None])[..., 0]
  y = jnp.linalg.solve(mats, ps[..., None])[..., 0]
  sx, sy, py = jnp.sum(x, -1), jnp.sum(y, -1), jnp.sum(ps * y, -1)
  d = sy ** 2 - sx * (py - c ** 2)
  sqrt_d = jnp.sqrt(jnp.maximum(d, 1e-30))
  mu = (sy + sqrt_d) / sx
  w = jnp.where(masks, (mu[:, None] * x - y) / sqrt_d[:, None], 0.0)
  ok = (d > 0) & (sx > 0) & jnp.all(w >= -1e-6, axis=-1) & jnp.all(jnp.isfinite(w), axis=-1)
  return jnp.where(ok[:, None], project_simplex(jnp.where(jnp.isfinite(w), w, 0.0)), jnp.nan)


def cagrad_dual_weights(gram: jax.Array, calpha: float, iters: int = 20) -> jax.Array:
  """The minimiser w* over the simplex of the CAGrad dual objective.

  The best of the closed-form stationary points of every face of the simplex (exact when
  the Gram matrix is non-singular on the solution's face) and the simplex's centre,
  polished by `iters` projected-gradient steps with a parallel line search (which only
  lower the objective; they matter when a face's Gram block is singular).

  Args:
    gram: (T, T) Gram matrix of the task gradients.
    calpha: alpha.
    iters: projected-gradient polishing iterations.

  Returns:
    (T,) weights on the simplex.
  """
  t = gram.shape[0]
  if t == 1:
    return jnp.ones((1,), jnp.float32)
  # Scale-free problem: G / s has unit mean diagonal; the objective is homogeneous of
  # degree one in G (up to the 1e-8 guards), so w* is unchanged.
  s = jnp.maximum(jnp.mean(jnp.diagonal(gram)), 1e-30)
  a = gram / s
  c = calpha * jnp.sqrt(jnp.maximum(jnp.mean(a), 0.0))
  b = jnp.full((t,), 1.0 / t, jnp.float32)
  ab = hmatvec(a, b)

  cands = jnp.concatenate([b[None], _face_candidates(a, ab, c)])
  vals = cagrad_objective(a, c, jnp.nan_to_num(cands))
  vals = jnp.where(jnp.all(jnp.isfinite(cands), -1), vals, jnp.inf)
  w0 = cands[jnp.argmin(vals)]

  def body(_, w):
    aw = hmatvec(a, w)
    grad = ab + c * aw / jnp.sqrt(jnp.maximum(jnp.dot(w, aw), 0.0) + 1e-8)
    cands = project_simplex(w[None, :] - _STEPS[:, None] * grad[None, :])  # (K, T)
    cands = jnp.concatenate([w[None, :], cands])
    vals = cagrad_objective(a, c, cands)
    return cands[jnp.argmin(vals)]

  return jax.lax.fori_loop(0, iters, body, w0)


class CAGrad(GradientMethod):
  """CAGrad (Liu et al., 2021): the average gradient corrected towards the worst task."""

  name = 'cagrad'
  max_tasks = 12  # the dual solve enumerates the 2^T - 1 faces of the simplex
  defaults = {'calpha': 0.4, 'rescale': 1.0, 'solver_iters': 20.0}

  def check(self) -> None:
    if not self.hp['calpha'] >= 0:
      raise ConfigError(f'config.weighting_params: cagrad.calpha={self.hp["calpha"]}; '
                        'expected a number >= 0')
    if self.hp['rescale'] not in (0.0, 1.0, 2.0):
      raise ConfigError(f'config.weighting_params: cagrad.rescale={self.hp["rescale"]}; '
                        'expected 0, 1 or 2')
    it = self.hp['solver_iters']
    if it != int(it) or it < 1:
      raise ConfigError(f'config.weighting_params: cagrad.solver_iters={it}; '
                        'expected an integer >= 1')

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del losses, key
    t = gram.shape[0]
    calpha = self.hp['calpha']
    w = cagrad_dual_weights(gram, calpha, int(self.hp['solver_iters']))
    # The authors' combination on the original scale.
    g0_norm = jnp.sqrt(jnp.maximum(jnp.mean(gram), 0.0) + 1e-8)
    c = calpha * g0_norm + 1e-8
    gw_norm = jnp.sqrt(jnp.maximum(quad(gram, w), 0.0))
    lmbda = c / (gw_norm + 1e-8)
    combined = 1.0 / t + lmbda * w
    rescale = int(self.hp['rescale'])
    if rescale == 1:
      combined = combined / (1.0 + calpha ** 2)
    elif rescale == 2:
      combined = combined / (1.0 + calpha)
    return combined, state
