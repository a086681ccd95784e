"""The head's projection `x @ W` for very long contractions (F ~ 3e5)."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax.typing import PrecisionLike

from moment_jax.ops.features import map_samples

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


def project(
    x: jax.Array | None,
    kernel: jax.Array,
    bias: jax.Array,
    *,
    precision: PrecisionLike = None,
    feature_fn: Callable[..., jax.Array] | None = None,
    tokens: jax.Array | None = None,
    graph: jax.Array | None = None,
    mask: jax.Array | None = None,
    chunk: int | None = None,
    remat: Callable[..., Any] | None = None,
) -> jax.Array:
  """The head's projection `x @ kernel + bias`, optionally fused with its features.

  Without `chunk`: `split_matmul(x, kernel) + bias` for `x` `[batch, F]`.
  With `chunk`: `feature_fn(tokens, graph, mask) @ kernel + bias` over `chunk`
  samples at a time (`map_samples`), under `jax.checkpoint(policy=remat)`
  when `remat` is given, so neither the `[batch, F]` features nor their
  cotangent exist for the whole batch. Each chunk reads the kernel once.

  Returns:
    `[batch, d_out]` in the kernel's dtype.
  """
  proj = lambda f: split_matmul(f.astype(kernel.dtype), kernel, precision) + bias
  if chunk is None:
    return proj(x)

  def fused(t, g, m):
    return proj(feature_fn(t, g, m))

  if remat is not None:
    fused = jax.checkpoint(fused, policy=remat)
  return map_samples(fused, chunk, tokens, graph, mask)
