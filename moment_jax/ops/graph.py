"""Token graphs: symmetric normalisation, propagation and ViT grid graphs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import PrecisionLike

from moment_jax.ops.moment import center

__all__ = ["center_graph", "grid_graph", "normalize_graph", "propagate"]


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


def center_graph(a_hat: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """The graph with the centring of `ops.center` folded in:
  `C = diag(m) (A_hat - 1 m^T A_hat / n)`, `n` the valid tokens.

  `propagate(center_graph(a_hat, mask), x)` is `center(propagate(a_hat, x),
  mask)[0]` in exact arithmetic, as one product: no mean over the tokens and
  no subtraction in the forward or the backward, and the centred tokens are
  rounded once, from a float32 accumulator.

  Args:
    a_hat: `[tokens, tokens]` or `[batch, tokens, tokens]` normalised graph.
    mask: optional `[batch, tokens]` bool, `False` for padding tokens (their
      rows of `C` are zero).

  Returns:
    `C` in `a_hat`'s dtype: `[batch, tokens, tokens]` with a mask, else
    `a_hat`'s shape.

  Example:
    >>> a = ops.normalize_graph(jnp.asarray(grid_graph(2, 2)))
    >>> x = jax.random.normal(jax.random.key(0), (1, 4, 3))
    >>> hc = ops.propagate(ops.center_graph(a), x)
    >>> bool(jnp.allclose(hc, ops.center(ops.propagate(a, x))[0], atol=1e-6))
    True
  """
  # The rows of A_hat are centred as `center` centres tokens: C x = A_hat x - 1 mu.
  a = a_hat if a_hat.ndim == 3 else a_hat[None]
  if mask is not None:
    a = jnp.broadcast_to(a, mask.shape[:1] + a.shape[1:])
  c, _ = center(a, mask, dtype=a_hat.dtype)
  return c if a_hat.ndim == 3 or mask is not None else c[0]


def propagate(
  a_hat: jax.Array,
  tokens: jax.Array,
  precision: PrecisionLike = None,
) -> jax.Array:
  """`H = A_hat @ tokens` for a `[tokens, tokens]` or `[batch, tokens, tokens]` graph.

  Args:
    a_hat: normalised graph; it may have more rows than tokens (`[rows,
      tokens]`, `[batch, rows, tokens]`), as the pipeline's centred graph
      does with zero rows in token space (`ops.gram.aligned_tokens`).
    tokens: `[batch, tokens, dim]`.
    precision: matmul precision.

  Returns:
    `[batch, rows, dim]` in the promoted dtype of the two inputs.
  """
  if a_hat.ndim == 2:
    return _shared_graph_product(a_hat, tokens, precision)
  return jnp.einsum("bnm,bmd->bnd", a_hat, tokens, precision=precision)


# A batched product, not one `[batch * dim, tokens]` GEMM: XLA fuses the broadcast into
# the GEMM, and the result keeps the `[batch, tokens, dim]` layout. As one GEMM, XLA gave
# it a `[batch, dim, tokens]` layout that reached every later product, and the map back
# to channels ran 2.4x slower (H100 head step, bf16, busy 1.67 -> 1.60 ms at B=64,
# 5.02 -> 4.69 at B=256; docs/performance-history.md). Rematerialised, so that the backward
# keeps `a_hat`, not its `[batch, tokens, tokens]` broadcast.
@functools.partial(
  jax.checkpoint, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable
)
def _shared_graph_product(
  a_hat: jax.Array, tokens: jax.Array, precision: PrecisionLike
) -> jax.Array:
  a = jnp.broadcast_to(a_hat, tokens.shape[:1] + a_hat.shape)
  return jnp.einsum("bnm,bmd->bnd", a, tokens, precision=precision)


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
