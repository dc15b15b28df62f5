"""PCGrad: projecting conflicting gradients (gradient surgery).

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020, arXiv:2001.06782.

Update: for each task i, g_i' = g_i; then for each other task j in a random order,
if g_i' . g_j < 0: g_i' <- g_i' - (g_i' . g_j) / |g_j|^2 g_j. The update is sum_i g_i'.

Every g_i' stays a linear combination of the original gradients, so the surgery runs on the
T x T Gram matrix: g_i' = sum_k C_ik g_k, g_i' . g_j = (C G)_ij, and a projection only
changes C_ij. The combination weights are w = C.sum(0) (column sums), applied once to the
gradients by the shared `weighted_sum`.

Hyper-parameters: none.

Randomness: task i's order is `jax.random.permutation(fold_in(key, i), T)` with i itself
skipped (see `surgery_orders`).

Deviations: the original code (and LibMTL's) shuffles all T tasks, i included, so g_i' can be
projected against its own g_i when earlier projections turned it against g_i; we follow the
paper's text and project only against the other tasks. Gradients are the shared parameters'
(as in the paper and LibMTL with rep_grad=False). A zero g_j is never projected against
(the division by |g_j|^2 is skipped rather than eps-damped, so projections are exact).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtan_jax.weighting.base import GradientMethod, MethodState


def surgery_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """(T, T) int32: row i is task i's random visiting order (a permutation of all tasks; the
  surgery skips j = i). Shared by PCGrad and GradVac so tests can replay the same orders."""
  return jnp.stack([jax.random.permutation(jax.random.fold_in(key, i), num_tasks)
                    for i in range(num_tasks)]).astype(jnp.int32)


class PCGrad(GradientMethod):
  """Projecting conflicting gradients, in Gram form (see the module docstring)."""

  name = 'pcgrad'
  defaults = {}

  def weights(self, gram: jax.Array, losses: jax.Array, state: MethodState,
              key: jax.Array) -> tuple[jax.Array, MethodState]:
    del losses
    coeffs = surgery_coefficients(gram, surgery_orders(key, self.num_tasks))
    return coeffs.sum(0), state


def surgery_coefficients(gram: jax.Array, orders: jax.Array) -> jax.Array:
  """C (T, T) with g_i' = sum_k C_ik g_k after PCGrad's surgery in the given orders.

  Args:
    gram: the Gram matrix G (T, T) of the task gradients.
    orders: (T, T) int, row i the order in which task i visits the tasks (i is skipped).
  """
  num_tasks = gram.shape[0]
  gram = gram.astype(jnp.float32)
  sq_norms = jnp.diagonal(gram)
  eye = jnp.eye(num_tasks, dtype=jnp.float32)

  def one_task(i, order):
    def visit(k, c):
      j = order[k]
      dot = c @ gram[:, j]  # g_i' . g_j
      norm2 = sq_norms[j]
      project = (j != i) & (dot < 0) & (norm2 > 0)
      coef = jnp.where(project, dot / jnp.where(norm2 > 0, norm2, 1.0), 0.0)
      return c - coef * eye[j]

    return jax.lax.fori_loop(0, num_tasks, visit, eye[i])

  return jax.vmap(one_task)(jnp.arange(num_tasks), orders)
