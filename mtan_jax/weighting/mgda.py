"""MGDA: the min-norm point of the convex hull of the task gradients.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(arXiv:1810.04650). The update is d = sum_t w_t g_t with

    w = argmin_{w in simplex} || sum_t w_t g_t ||^2 = argmin_{w in simplex} w^T G w,

a common descent direction of all tasks (g_t . d >= ||d||^2 > 0 unless d = 0, i.e. the
point is Pareto-stationary). It is solved from the Gram matrix G, as the authors'
`MinNormSolver`: initialise at the best pair (the closed-form min-norm point of the segment
[g_i, g_j] with the smallest norm over all pairs; exact for T = 2), then iterate with an
exact line search between the current point and a new point:

- `frank_wolfe=0` (default): the authors' `find_min_norm_element` (used by their training
  script and by LibMTL): the new point is a projected-gradient step (`_next_point`).
- `frank_wolfe=1`: Frank-Wolfe, the paper's Algorithm 2 (the authors'
  `find_min_norm_element_FW`): the new point is the vertex e_t, t = argmin_t (G w)_t.
  Frank-Wolfe zig-zags when the solution lies on a face of the simplex (some w_t = 0):
  after 250 iterations its weights can still be a few percent off (objective ~1e-3 of
  tr G), while the projected-gradient variant reaches the solution to float32 round-off,
  hence the default.

Hyper-parameters:
  normalization (default 0 = 'none', LibMTL's `mgda_gn` default): gradient normalisation
    before the solve, as the authors' `gradient_normalizers`: 0 'none', 1 'l2' (g_t/|g_t|),
    2 'loss' (g_t/L_t), 3 'loss+' (g_t/(L_t |g_t|)). The constructor also accepts the names,
    e.g. `MGDA(3, normalization='l2')`, and stores the float code in `self.hp`.
  max_iter (default 250, the authors' `MAX_ITER`): iterations of the solver (fixed count).
  frank_wolfe (default 0): 1 for the paper's Frank-Wolfe steps, 0 for the authors'
    projected-gradient steps (their `find_min_norm_element`, LibMTL's solver).

Deviations from the original:
- Exact MGDA on the gradients of the shared *parameters* (the paper's MGDA, not MGDA-UB on
  the representation gradients): MTAN has no single shared representation (every task's
  attention branch reads several shared layers).
- A fixed iteration count without the authors' early stop (|change|_1 < 1e-5): running all
  iterations only refines the point. The 2-point line search uses the exact clipped
  minimiser in [0, 1]; the authors return 0.999 / 0.001 in the clipped cases, which leaves
  the point 0.1% off the min-norm point (e.g. when one gradient dominates).
- With normalisation, the weights multiply the normalised gradients (as LibMTL: the update
  is the min-norm point of the normalised gradients' hull, w_t / n_t on the raw g_t); the
  authors' script instead used the weights to scale the raw losses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, MethodState, task_norms
from mtan_jax.weighting.simplex import hmatvec, project_simplex, quad

NORMALIZATIONS = ('none', 'l2', 'loss', 'loss+')
_EPS = 1e-12


def _min_norm_from2(v11, v12, v22):
  """gamma in [0, 1] minimising |gamma v1 + (1 - gamma) v2|^2 from the three dot products."""
  denom = v11 + v22 - 2.0 * v12
  gamma = jnp.clip((v22 - v12) / jnp.maximum(denom, _EPS), 0.0, 1.0)
  # v1 == v2 (denom 0): any gamma; keep the current point.
  gamma = jnp.where(denom > _EPS, gamma, 1.0)
  cost = gamma * gamma * v11 + 2.0 * gamma * (1.0 - gamma) * v12 + (1.0 - gamma) ** 2 * v22
  return gamma, cost


def _pairwise_init(g: jax.Array) -> jax.Array:
  """The authors' `_min_norm_2d`: the best min-norm point over all segments [g_i, g_j]."""
  t = g.shape[0]
  best_cost = jnp.inf
  best = jnp.zeros((t,), jnp.float32)
  for i in range(t):  # static: T is a Python int
    for j in range(i + 1, t):
      gamma, cost = _min_norm_from2(g[i, i], g[i, j], g[j, j])
      cand = jnp.zeros((t,), jnp.float32).at[i].set(gamma).at[j].set(1.0 - gamma)
      take = cost < best_cost
      best = jnp.where(take, cand, best)
      best_cost = jnp.where(take, cost, best_cost)
  return best


def _next_point(w: jax.Array, grad: jax.Array) -> jax.Array:
  """The authors' `_next_point`: a projected-gradient step along `grad` (= -G w)."""
  t = w.shape[0]
  proj = grad - jnp.sum(grad) / t
  tm1 = jnp.where(proj < 0, -w / jnp.where(proj < 0, proj, 1.0), jnp.inf)
  tm2 = jnp.where(proj > 0, (1.0 - w) / jnp.where(proj > 0, proj, 1.0), jnp.inf)
  # The step to the nearest face among those more than 1e-7 away; 1 if there is none.
  steps = jnp.concatenate([tm1, tm2])
  step = jnp.min(jnp.where(steps > 1e-7, steps, jnp.inf))
  step = jnp.where(jnp.isfinite(step), step, 1.0)
  return project_simplex(proj * step + w)


def min_norm_weights(g: jax.Array, max_iter: int = 250, frank_wolfe: bool = False) -> jax.Array:
  """argmin over the simplex of w^T G w by the authors' MinNormSolver (fixed iterations).

  Args:
    g: (T, T) Gram matrix.
    max_iter: number of iterations after the pairwise initialisation.
    frank_wolfe: Frank-Wolfe steps (the paper) or the authors' projected-gradient steps.

  Returns:
    (T,) weights on the simplex.
  """
  t = g.shape[0]
  if t == 1:
    return jnp.ones((1,), jnp.float32)
  w = _pairwise_init(g)
  if t == 2 or max_iter <= 0:
    return w  # the pairwise point is the solution for T = 2 (as the authors' code)
  eye = jnp.eye(t, dtype=jnp.float32)

  def body(_, w):
    gw = hmatvec(g, w)
    if frank_wolfe:
      new = eye[jnp.argmin(gw)]
      v12 = jnp.dot(w, hmatvec(g, new))
    else:
      new = _next_point(w, -gw)
      v12 = jnp.dot(new, gw)
    gamma, _ = _min_norm_from2(jnp.dot(w, gw), v12, quad(g, new))
    return gamma * w + (1.0 - gamma) * new

  return jax.lax.fori_loop(0, max_iter, body, w)


class MGDA(GradientMethod):
  """MGDA (Sener & Koltun, 2018): the min-norm point of the task gradients' convex hull."""

  name = 'mgda'
  defaults = {'normalization': 0.0, 'max_iter': 250.0, 'frank_wolfe': 0.0}

  def __init__(self, num_tasks: int, **hparams: Any):
    # The normalisation may be given by name; `self.hp` keeps floats, so store its code.
    norm = hparams.get('normalization')
    if isinstance(norm, str):
      if norm not in NORMALIZATIONS:
        raise ConfigError(f'config.weighting_params: mgda.normalization={norm!r}; expected one '
                          f'of {", ".join(map(repr, NORMALIZATIONS))} or their codes 0..3')
      hparams['normalization'] = float(NORMALIZATIONS.index(norm))
    super().__init__(num_tasks, **hparams)

  def check(self) -> None:
    norm = self.hp['normalization']
    if norm not in (0.0, 1.0, 2.0, 3.0):
      raise ConfigError(f'config.weighting_params: mgda.normalization={norm}; expected 0 (none), '
                        '1 (l2), 2 (loss) or 3 (loss+)')
    it = self.hp['max_iter']
    if it != int(it) or it < 0:
      raise ConfigError(f'config.weighting_params: mgda.max_iter={it}; expected an integer >= 0')
    if self.hp['frank_wolfe'] not in (0.0, 1.0):
      raise ConfigError(f'config.weighting_params: mgda.frank_wolfe={self.hp["frank_wolfe"]}; '
                        'expected 0 (projected-gradient steps) or 1 (Frank-Wolfe steps)')

  def normalizers(self, gram: jax.Array, losses: jax.Array) -> jax.Array:
    """The per-task divisors n_t of the authors' `gradient_normalizers`."""
    code = int(self.hp['normalization'])
    losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
    if code == 0:
      return jnp.ones_like(losses)
    if code == 1:
      return task_norms(gram)
    if code == 2:
      return losses
    return losses * task_norms(gram)

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del key
    n = self.normalizers(gram, losses)
    # Guard: a zero gradient (or loss) gives a zero normalised gradient instead of NaN.
    inv = jnp.where(jnp.abs(n) > _EPS, 1.0 / jnp.where(jnp.abs(n) > _EPS, n, 1.0), 0.0)
    g = gram * inv[:, None] * inv[None, :]
    # The weights do not depend on G's scale; unit mean diagonal keeps the solver's absolute
    # epsilons meaningful when the gradients are tiny.
    g = g / jnp.maximum(jnp.mean(jnp.diagonal(g)), 1e-30)
    w = min_norm_weights(g, int(self.hp['max_iter']), frank_wolfe=self.hp['frank_wolfe'] == 1.0)
    # The weights apply to the normalised gradients g_t / n_t.
    return w * inv, state
