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


def _mm(a, b, precision, acc):
  return jnp.matmul(a, b, precision=precision, preferred_element_type=acc)


def newton_schulz_step(
    y: jax.Array,
    z: jax.Array,
    precision: PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
  """One coupled step: `T = (3I - Z Y) / 2;  Y <- Y T;  Z <- T Z`.

  `Y -> A^{1/2}` and `Z -> A^{-1/2}` quadratically for `||I - A|| < 1`. All
  three are polynomials in `A`, so they commute: `Y T` and `T Z = Z T` are one
  batched product of the stacked `[Y; Z]` with `T`. Products accumulate in
  float32 (or wider) and are cast back to the operands' dtype.
  """
  dtype = y.dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  eye = jnp.eye(y.shape[-1], dtype=acc)
  t = (0.5 * (3.0 * eye - _mm(z, y, precision, acc))).astype(dtype)
  yz = _mm(jnp.stack([y, z]), t, precision, acc).astype(dtype)
  return yz[0], yz[1]


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

  SPEC section 3: `A = M / tr(M)`, `K - 1` coupled steps (the first and the
  last specialised), `S = sqrt(tr M) * Y`; `3K - 3` matrix products for
  `K >= 2`, a single one for `K = 1`. The middle `K - 2` steps run in a
  `lax.fori_loop` with a static trip count.

  Args:
    m: `[..., dim, dim]` symmetric positive definite.
    iterations: `K >= 1`, a static Python int.
    dtype: dtype of the iteration's operands and state; default `m`'s, at
      least float32. The trace and the final scale stay in float32 or wider.
    precision: matmul precision.
    remat_body: checkpoint the loop body, so reverse mode keeps only the
      carried state per step and recomputes the rest in the backward pass.

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
  m = m.astype(acc)
  t = jnp.trace(m, axis1=-2, axis2=-1)[..., None, None]  # > 0: M has eps * I
  a = m / t
  if k == 1:
    y = 0.5 * _mm(a.astype(dtype), (3.0 * eye - a).astype(dtype), precision, acc)
  else:
    tt = (0.5 * (3.0 * eye - a)).astype(dtype)
    y = _mm(a.astype(dtype), tt, precision, acc).astype(dtype)
    z = tt
    step = functools.partial(newton_schulz_step, precision=precision)
    if remat_body:
      step = jax.checkpoint(step)
    y, z = jax.lax.fori_loop(0, k - 2, lambda _, c: step(*c), (y, z))
    zy = _mm(z, y, precision, acc)
    y = 0.5 * _mm(y, (3.0 * eye - zy).astype(dtype), precision, acc)
  return (jnp.sqrt(t) * y).astype(dtype)
