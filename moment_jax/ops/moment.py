"""Centred statistics of token sets, with padding masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike

__all__ = ["center", "centered_moment", "second_moment", "token_count"]


def _stage_dtype(x: jax.Array, dtype: Dtype | None) -> jnp.dtype:
  """The dtype a statistic is computed in: `dtype`, or at least float32."""
  if dtype is not None:
    return jnp.dtype(dtype)
  return jnp.promote_types(x.dtype, jnp.float32)


def center(
  h: jax.Array,
  mask: jax.Array | None = None,
  *,
  dtype: Dtype | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Subtracts the mean over valid tokens and zeroes padding rows.

  Args:
    h: `[batch, tokens, dim]`.
    mask: optional `[batch, tokens]` bool, `False` for padding.
    dtype: dtype of the result; default: `h`'s, at least float32.

  Returns:
    `(hc, n)`: centred `[batch, tokens, dim]` with zero padding rows, and the
    number of valid tokens `[batch]` (float, at least 1).
  """
  dtype = _stage_dtype(h, dtype)
  h = h.astype(dtype)
  n = token_count(h, mask, dtype=dtype)
  if mask is None:
    return h - jnp.mean(h, axis=1, keepdims=True), n
  m = mask.astype(dtype)[..., None]
  mu = jnp.sum(h * m, axis=1, keepdims=True) / n[:, None, None]
  return (h - mu) * m, n


def token_count(
  h: jax.Array, mask: jax.Array | None = None, *, dtype: Dtype | None = None
) -> jax.Array:
  """Valid tokens per sample, `[batch]` floating, at least 1.

  Args:
    h: `[batch, tokens, dim]` tokens (only the shape is read).
    mask: optional `[batch, tokens]` bool, `False` for padding.
    dtype: dtype of the result; default `h`'s, at least float32.
  """
  dtype = _stage_dtype(h, dtype)
  if mask is None:
    return jnp.full(h.shape[:1], h.shape[1], dtype)
  # An all-padding row has n = 0: clamp to 1 so its moment is eps * I.
  return jnp.maximum(jnp.sum(mask.astype(dtype), axis=1), 1)


def centered_moment(
  hc: jax.Array,
  n: jax.Array,
  eps: float = 1e-5,
  *,
  precision: PrecisionLike = None,
  accumulate: Dtype | None = None,
) -> jax.Array:
  """`Hc^T Hc / n + eps * I` from already centred tokens.

  Args:
    hc: centred `[batch, tokens, dim]`, zero on padding rows.
    n: valid tokens per sample, `[batch]`.
    eps: ridge on the diagonal; makes the result positive definite.
    precision: matmul precision.
    accumulate: dtype of the result (`preferred_element_type`); default:
      `hc`'s dtype, at least float32. GEMMs accumulate in float32 either way.

  Returns:
    `[batch, dim, dim]` symmetric positive definite, in the `accumulate` dtype.
  """
  acc = _stage_dtype(hc, accumulate)
  m2 = jnp.einsum("bnd,bne->bde", hc, hc, precision=precision, preferred_element_type=acc)
  d = hc.shape[-1]
  return m2 / n.astype(acc)[:, None, None] + eps * jnp.eye(d, dtype=acc)


def second_moment(
  h: jax.Array,
  mask: jax.Array | None = None,
  eps: float = 1e-5,
  *,
  dtype: Dtype | None = None,
  precision: PrecisionLike = None,
) -> jax.Array:
  """Centred second moment of each sample's tokens, docs/math.md section 2.

  Args:
    h: `[batch, tokens, dim]` (propagated) tokens.
    mask: optional `[batch, tokens]` bool; padding tokens take no part.
    eps: ridge `eps * I` added to the moment.
    dtype: compute dtype; default `h`'s, at least float32.
    precision: matmul precision.

  Returns:
    `[batch, dim, dim]` symmetric positive definite matrices.

  Example:
    >>> m2 = second_moment(jnp.ones((2, 5, 3)))   # eps * I for constant tokens
  """
  hc, n = center(h, mask, dtype=dtype)
  return centered_moment(hc, n, eps, precision=precision)
