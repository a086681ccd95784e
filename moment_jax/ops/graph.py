"""Token graphs: symmetric normalisation, propagation and ViT grid graphs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import PrecisionLike

__all__ = ["grid_graph", "normalize_graph", "propagate"]


def normalize_graph(
  graph: jax.Array,
  eps: float = 1e-5,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Symmetric normalisation `D^-1/2 A D^-1/2` of non-negative edge weights.

  Args:
    graph: `[tokens, tokens]` (shared by the batch) or
      `[batch, tokens, tokens]` edge weights.
    eps: floor of the degrees, so isolated tokens stay finite.
    mask: optional `[batch, tokens]` bool; rows and columns of padding tokens
      (`False`) are zeroed before the degrees are taken.

  Returns:
    `A_hat` in the dtype of `graph`: `[batch, tokens, tokens]`, or
    `[tokens, tokens]` for a shared graph without a mask.
  """
  if mask is not None:
    m = mask.astype(graph.dtype)
    graph = graph * m[:, :, None] * m[:, None, :]
  deg = jnp.sum(graph, axis=-1)  # row sums: never a matmul with ones
  dinv = jax.lax.rsqrt(jnp.maximum(deg, eps))
  return dinv[..., :, None] * graph * dinv[..., None, :]


def propagate(
  a_hat: jax.Array,
  tokens: jax.Array,
  precision: PrecisionLike = None,
) -> jax.Array:
  """`H = A_hat @ tokens` for a `[tokens, tokens]` or `[batch, tokens, tokens]` graph.

  Args:
    a_hat: normalised graph.
    tokens: `[batch, tokens, dim]`.
    precision: matmul precision.

  Returns:
    `[batch, tokens, dim]` in the promoted dtype of the two inputs.
  """
  spec = "nm,bmd->bnd" if a_hat.ndim == 2 else "bnm,bmd->bnd"
  return jnp.einsum(spec, a_hat, tokens, precision=precision)


def grid_graph(
  height: int,
  width: int,
  connectivity: int = 4,
  self_loops: bool = True,
) -> np.ndarray:
  """Adjacency of a `height x width` patch grid, row-major like ViT patches.

  Args:
    height: rows of patches.
    width: columns of patches.
    connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).
    self_loops: put 1 on the diagonal.

  Returns:
    `[height*width, height*width]` float32 NumPy array of 0/1 weights, a
    host constant that jit embeds once.
  """
  if connectivity not in (4, 8):
    raise ValueError(f"connectivity: expected 4 or 8, got {connectivity!r}")
  if height < 1 or width < 1:
    raise ValueError(f"height, width: expected positive sizes, got ({height}, {width})")
  rows, cols = np.divmod(np.arange(height * width), width)
  dr = np.abs(rows[:, None] - rows[None, :])
  dc = np.abs(cols[:, None] - cols[None, :])
  if connectivity == 4:
    adj = (dr + dc) == 1
  else:
    adj = np.maximum(dr, dc) == 1
  if self_loops:
    adj |= np.eye(height * width, dtype=bool)
  return adj.astype(np.float32)
