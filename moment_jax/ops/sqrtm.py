"""Matrix square root by the coupled Newton–Schulz iteration (iSQRT-COV).

References:
  Li, Xie, Wang, Gao. "Towards Faster Training of Global Covariance Pooling
  Networks by Iterative Matrix Square Root Normalization", CVPR 2018.
  Higham. "Functions of Matrices", 2008, eq. (6.35).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike


def _mm(a, b, precision, out=None):
  # GPU GEMMs accumulate bf16 operands in float32 whatever the output dtype,
  # so writing the product in the operands' dtype loses nothing more.
  return jnp.matmul(a, b, precision=precision, preferred_element_type=out)


def newton_schulz_step(
    z: jax.Array,
    a: jax.Array,
    precision: PrecisionLike = None,
) -> jax.Array:
  """One coupled step, carried by `Z` alone: `Y = A Z;  Z <- 1.5 Z - 0.5 (Z Y) Z`.

  That is SPEC's `T = (3I - Z Y) / 2;  Z <- T Z`, written so that no `T` is
  formed: the update is a product plus a scaled matrix, which XLA folds into
  the GEMM's epilogue (`alpha * A B + beta * C`). SPEC's coupled iteration
  keeps `Y = A Z` at every step (true after the first step, and
  `Y T = A Z T = A (T Z)` because all iterates are polynomials in `A` and
  commute), so `Z` determines the state: a checkpointed loop keeps one
  matrix per step instead of two, for the same three products per step.
  Products are written in the operands' dtype (GEMMs accumulate bf16
  operands in float32).
  """
  y = _mm(a, z, precision)
  return 1.5 * z - 0.5 * _mm(_mm(z, y, precision), z, precision)


def _check_square(m: jax.Array, name: str = "m") -> None:
  if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
    raise ValueError(
        f"{name}: expected [..., dim, dim] square matrices, got shape {m.shape}")


def check_iterations(iterations: int) -> int:
  """Validates the Newton–Schulz iteration count (a static Python int >= 1)."""
  if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
    raise ValueError(
        f"isqrt_iterations: expected an int >= 1, got {iterations!r}")
  return iterations


def sqrtm_newton_schulz(
    m: jax.Array,
    iterations: int,
    *,
    dtype: Dtype | None = None,
    precision: PrecisionLike = None,
    remat_body: bool = False,
) -> jax.Array:
  """Approximate square root of SPD matrices by `iterations` coupled steps.

  SPEC section 3: `A = M / tr(M)`, `K` coupled steps (the first and the
  last specialised), `S = sqrt(tr M) * Y`; `3K - 3` matrix products for
  `K >= 2`, a single one for `K = 1`. The middle `K - 2` steps run in a
  `lax.fori_loop` with a static trip count, carrying `Z` (see
  `newton_schulz_step`); the result is SPEC's polynomial in `A`.

  Args:
    m: `[..., dim, dim]` symmetric positive definite.
    iterations: `K >= 1`, a static Python int.
    dtype: dtype of the iteration's operands and state; default `m`'s, at
      least float32. The trace and the final scale stay in float32 or wider.
    precision: matmul precision.
    remat_body: checkpoint the loop body, so reverse mode keeps one matrix
      (`Z`) per step and recomputes the rest in the backward pass.

  Returns:
    `[..., dim, dim]` approximation of `m^{1/2}`, in `dtype`.

  Example:
    >>> s = sqrtm_newton_schulz(jnp.eye(4)[None] * 4.0, iterations=5)  # ~2 I
  """
  _check_square(m)
  k = check_iterations(iterations)
  acc = jnp.promote_types(m.dtype, jnp.float32)
  dtype = jnp.dtype(dtype) if dtype is not None else acc
  eye = jnp.eye(m.shape[-1], dtype=acc)
  m = m.astype(acc)  # trace and scaling in float32 or wider
  t = jnp.trace(m, axis1=-2, axis2=-1)[..., None, None]  # > 0: M has eps * I
  a = m / t
  if k == 1:
    y = 0.5 * _mm(a.astype(dtype), (3.0 * eye - a).astype(dtype), precision)
  else:
    a_op = a.astype(dtype)
    z = (1.5 * eye - 0.5 * a).astype(dtype)  # iteration 1: Z = T, Y = A T
    step = functools.partial(newton_schulz_step, a=a_op, precision=precision)
    if remat_body:
      step = jax.checkpoint(step)
    z = jax.lax.fori_loop(0, k - 2, lambda _, z: step(z), z)
    y = _mm(a_op, z, precision)  # iteration K, Y only: 1.5 Y - 0.5 Y (Z Y)
    y = 1.5 * y - 0.5 * _mm(y, _mm(z, y, precision), precision)
  return (jnp.sqrt(t) * y.astype(acc)).astype(dtype)
