"""Nash-MTL: the Nash bargaining solution of the tasks' gradients.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022 (arXiv:2202.01017). The update is d = sum_t alpha_t g_t with
alpha > 0 solving the bargaining condition

    (G alpha)_t = 1 / alpha_t   for every t        (G = the Gram matrix of the g_t),

so every task gets the same "utility" alpha_t <g_t, d> = 1, and ||d||^2 = alpha^T G alpha = T.
The authors' code (AvivNavon/nash-mtl, LibMTL, TorchJD) approximates it by a sequence of
convex programs (CCP with cvxpy/ECOS) on G scaled by its Frobenius norm n_F, whose
constraints alpha_t n_F (G/n_F alpha)_t >= 1 are on the raw G; then clips the norm of the
shared gradient to `max_norm`.

Here alpha solves the same condition on device: alpha = a / sqrt(n_F), where a minimises
the strictly convex f(a) = a^T Gn a / 2 - sum_t log a_t with Gn = G / n_F + reg I (its
stationarity condition is Gn a = 1/a), by damped Newton with a fraction-to-boundary
rule (a stays > 0), a fixed iteration count, from a diagonal initial guess, on the
diagonally scaled matrix (unit diagonal) for conditioning. The shared
update is then clipped: w = alpha min(1, max_norm / sqrt(alpha^T G alpha)).

Hyper-parameters:
  max_norm (default 1.0, the authors' / LibMTL's): the clip on ||d||; 0 disables it.
  update_weights_every (default 1, the authors' / LibMTL's): recompute alpha every k steps
    and reuse the last one in between (kept in the state; the clip uses the current G).
  newton_iters (default 50): Newton iterations (quadratic convergence near the solution;
    about 30 suffice for nearly singular Gram matrices).
  reg (default 1e-6): ridge added to the Frobenius-normalised Gram matrix, so a solution
    exists when some non-negative combination of the gradients vanishes (e.g. two
    opposite gradients), where the exact condition has none (the CCP then fails in the
    authors' code, which keeps the previous alpha).

Deviations from the original: the exact solution of the bargaining condition instead of
the authors' 20 CCP iterations with early stopping (which stop at ||Gn a - 1/a|| < 1e-3);
the ridge `reg`; the clip is applied to the shared parameters' update only (the authors clip
the shared parameters' gradient too; the task-specific parameters here get the plain sum of
their tasks' gradients, as every method in this package, instead of alpha-weighted ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtan_jax.errors import ConfigError
from mtan_jax.weighting.base import GradientMethod, MethodState
from mtan_jax.weighting.simplex import hmatvec, quad


def nash_solve(gn: jax.Array, iters: int = 30) -> jax.Array:
  """The positive a with gn a = 1/a, by damped Newton on a^T gn a / 2 - sum log a.

  Args:
    gn: (T, T) symmetric positive definite matrix.
    iters: Newton iterations.

  Returns:
    (T,) positive solution.
  """
  t = gn.shape[0]
  # Exact for a diagonal gn; then scaled so that a^T gn a = T, which the solution satisfies.
  a = jax.lax.rsqrt(jnp.diagonal(gn))
  a = a * jnp.sqrt(t / quad(gn, a))

  def body(_, a):
    grad = hmatvec(gn, a) - 1.0 / a
    hess = gn + jnp.diag(1.0 / (a * a))
    step = -jnp.linalg.solve(hess, grad)
    # Newton decrement: damped steps 1/(1+lambda) (self-concordant f) until lambda < 1/4.
    lam = jnp.sqrt(jnp.maximum(-jnp.dot(grad, step), 0.0))
    size = jnp.where(lam < 0.25, 1.0, 1.0 / (1.0 + lam))
    # Fraction to the boundary: never move more than 90% of the way to a_t = 0.
    ratio = jnp.where(step < 0, -0.9 * a / jnp.where(step < 0, step, -1.0), jnp.inf)
    size = jnp.minimum(size, jnp.min(ratio))
    new = a + size * step
    return jnp.where(jnp.all(jnp.isfinite(new)) & jnp.all(new > 0), new, a)

  return jax.lax.fori_loop(0, iters, body, a)


class NashMTL(GradientMethod):
  """Nash-MTL (Navon et al., 2022): weights solving G alpha = 1/alpha, norm-clipped."""

  name = 'nash_mtl'
  defaults = {'max_norm': 1.0, 'update_weights_every': 1.0, 'newton_iters': 50.0,
              'reg': 1e-6}

  def check(self) -> None:
    if not self.hp['max_norm'] >= 0:
      raise ConfigError(f'config.weighting_params: nash_mtl.max_norm={self.hp["max_norm"]}; '
                        'expected a number >= 0 (0 disables the clip)')
    for hp in ('update_weights_every', 'newton_iters'):
      v = self.hp[hp]
      if v != int(v) or v < 1:
        raise ConfigError(f'config.weighting_params: nash_mtl.{hp}={v}; expected an integer >= 1')
    if not 0 < self.hp['reg'] < 1:
      raise ConfigError(f'config.weighting_params: nash_mtl.reg={self.hp["reg"]}; '
                        'expected a number in (0, 1)')

  def init_state(self, shared_params) -> MethodState:
    del shared_params
    return {'alpha': jnp.ones((self.num_tasks,), jnp.float32),
            'step': jnp.zeros((), jnp.int32)}

  def solve(self, gram: jax.Array) -> jax.Array:
    """The unclipped alpha > 0 with G alpha = 1/alpha (G regularised, see `reg`)."""
    t = gram.shape[0]
    norm = jnp.sqrt(jnp.sum(gram * gram))
    safe = jnp.maximum(norm, 1e-30)
    gn = gram / safe + self.hp['reg'] * jnp.eye(t, dtype=jnp.float32)
    # Diagonal scaling for conditioning: with D = diag(gn)^-1/2, a = D b where b solves the
    # same condition for D gn D (unit diagonal), so disparate gradient norms cost nothing.
    d = jax.lax.rsqrt(jnp.diagonal(gn))
    b = nash_solve(gn * d[:, None] * d[None, :], int(self.hp['newton_iters']))
    alpha = d * b * jax.lax.rsqrt(safe)
    # All gradients zero: any weights give a zero update; report ones.
    return jnp.where(norm > 1e-30, alpha, 1.0)

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del losses, key
    every = int(self.hp['update_weights_every'])
    if every == 1:
      alpha = self.solve(gram)
    else:
      alpha = jnp.where(state['step'] % every == 0, self.solve(gram), state['alpha'])
    w = alpha
    if self.hp['max_norm'] > 0:
      norm = jnp.sqrt(jnp.maximum(quad(gram, alpha), 0.0))
      w = alpha * jnp.minimum(1.0, self.hp['max_norm'] / jnp.maximum(norm, 1e-30))
    return w, {'alpha': alpha, 'step': state['step'] + 1}
