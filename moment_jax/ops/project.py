"""The head's projection `x @ W` for very long contractions (F ~ 3e5)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax.typing import PrecisionLike

# Below this many contraction terms the plain product is used.
MIN_SPLIT = 1 << 14
MAX_PIECES = 128


def contraction_pieces(k: int) -> int:
  """How many batched pieces `split_matmul` cuts a contraction of length `k` into."""
  return 1 if k < MIN_SPLIT else math.gcd(k, MAX_PIECES)


def _split_matmul(x, w, precision):
  k, n = w.shape
  c = contraction_pieces(k)
  dtype = jnp.promote_types(x.dtype, w.dtype)
  if c == 1:
    return jnp.matmul(x, w, precision=precision)
  lead = x.shape[:-1]
  xs = x.reshape(-1, c, k // c)
  ws = w.reshape(c, k // c, n)
  acc = jnp.promote_types(dtype, jnp.float32)
  parts = jax.lax.dot_general(xs, ws, (((2,), (1,)), ((1,), (0,))), precision=precision,
                              preferred_element_type=acc)  # [c, batch, d_out]
  return jnp.sum(parts, axis=0).astype(dtype).reshape(*lead, n)


# Remat with nothing saved: the backward keeps `x` and `w` themselves (not
# their reshapes, which JAX would count as new residuals) and redoes only the
# free reshapes; the product is not needed by the backward and is not redone.
_split_matmul_remat = jax.checkpoint(
    _split_matmul, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable)


def split_matmul(
    x: jax.Array,
    w: jax.Array,
    precision: PrecisionLike = None,
) -> jax.Array:
  """`x @ w` with the contraction cut into `c` pieces kept as a batch dimension.

  For a skinny `[batch, F] @ [F, d_out]` with F ~ 3e5, XLA:GPU's split-K
  rewrite pads F and so materialises a padded copy of the whole weight
  (605 MB for the optimized head) in the forward and in the gradient step.
  Free reshapes to `[batch, c, F/c]` and `[c, F/c, d_out]`, a batched product
  with `c` as the output's leading batch dimension, and a sum over it give the
  same result with no copy of the weight (see benchmarks/dense_split.py and
  docs/memory.md). The reshapes are bitcasts: the weight is read once.

  Args:
    x: `[..., F]`.
    w: `[F, d_out]`.
    precision: matmul precision.

  Returns:
    `[..., d_out]` in the promoted dtype of `x` and `w`; the partial sums are
    accumulated in at least float32.
  """
  if contraction_pieces(w.shape[0]) == 1:
    return jnp.matmul(x, w, precision=precision)
  return _split_matmul_remat(x, w, precision)
