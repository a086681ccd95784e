"""Matrix square roots of SPD matrices: the coupled Newton–Schulz iteration
(iSQRT-COV) and the exact root by `eigh`.

References:
  Li, Xie, Wang, Gao. "Towards Faster Training of Global Covariance Pooling
  Networks by Iterative Matrix Square Root Normalization", CVPR 2018.
  Higham. "Functions of Matrices", 2008, eq. (6.35).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, cast

import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike

from moment_jax.ops import _checks

__all__ = [
  "STABILITY_LIMITS",
  "Z_ONLY_MAX_ITERATIONS",
  "coupled_step",
  "matrix_sqrt",
  "newton_schulz_step",
  "sqrtm_eigh",
  "sqrtm_newton_schulz",
]


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

  That is docs/math.md's `T = (3I - Z Y) / 2;  Z <- T Z`, written so that no `T` is
  formed: the update is a product plus a scaled matrix, which XLA folds into
  the GEMM's epilogue (`alpha * A B + beta * C`). the spec's coupled iteration
  keeps `Y = A Z` at every step (true after the first step, and
  `Y T = A Z T = A (T Z)` because all iterates are polynomials in `A` and
  commute), so `Z` determines the state: a checkpointed loop keeps one
  matrix per step instead of two, for the same three products per step.
  Products are written in the operands' dtype (GEMMs accumulate bf16
  operands in float32).
  """
  y = _mm(a, z, precision)
  return 1.5 * z - 0.5 * _mm(_mm(z, y, precision), z, precision)


def coupled_step(
  y: jax.Array,
  z: jax.Array,
  precision: PrecisionLike = None,
) -> tuple[jax.Array, jax.Array]:
  """One step of the spec's coupled form: `P = Z Y;  Y <- 1.5 Y - 0.5 Y P;
  Z <- 1.5 Z - 0.5 P Z` (that is `T = (3I - Z Y) / 2`, `Y T`, `T Z`).

  Three products, like `newton_schulz_step`, but both iterates are carried.
  This form is stable in finite precision: it keeps converging for any
  number of steps, where the `Z`-only form amplifies round-off once the
  iterates have converged (see `Z_ONLY_MAX_ITERATIONS`).
  """
  p = _mm(z, y, precision)
  return 1.5 * y - 0.5 * _mm(y, p, precision), 1.5 * z - 0.5 * _mm(p, z, precision)


def _check_square(m: jax.Array, name: str = "m") -> None:
  if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
    raise ValueError(f"{name}: expected [..., dim, dim] square matrices, got shape {m.shape}")


def check_iterations(iterations: int) -> int:
  """Validates the Newton–Schulz iteration count (a static Python int >= 1)."""
  _checks.check_int("isqrt_iterations", iterations)
  return iterations


# Up to this many iterations the loop carries Z alone (one matrix per
# checkpointed step); beyond, both Y and Z. The Z-only form is the uncoupled
# Newton–Schulz iteration for M^{-1/2}, which is numerically unstable: with
# spread spectra (few tokens, many channels) its round-off grows once the
# large eigenvalues have converged. On an H100 at D=768, N=196
# (benchmarks/accuracy.py, docs/numerics.md) it matches the coupled form
# through K=7 in float32, TF32 and bfloat16, is worse from K=8 in TF32 and
# bfloat16 and blows up from K=12-20. Every preset uses K <= 5.
Z_ONLY_MAX_ITERATIONS = 7

# Iteration counts where the error grows again (warn) or the iteration
# diverges (refuse), by operand class; from the same H100 run. bfloat16: best
# at K=6-7, 0.05-2.0 relative error at K=12, NaN by K=15-20. TF32 (float32
# operands, products below HIGHEST precision on GPU): worse from K=12-15,
# 9.7 or NaN at K=20 in every family (warned only: XLA:CPU computes these
# products in float32). float32 at HIGHEST: the rank-16 family diverges from
# K=25.
STABILITY_LIMITS = {"bfloat16": (8, 12), "tf32": (12, None), "float32": (25, None)}

NORMALIZATIONS = ("trace", "frobenius")
METHODS = ("newton_schulz", "eigh")


def check_normalization(normalization: str) -> str:
  """Validates `isqrt_normalization` ("trace" or "frobenius")."""
  _checks.check_choice("isqrt_normalization", normalization, NORMALIZATIONS)
  return normalization


def check_method(method: str) -> str:
  """Validates `isqrt_method` ("newton_schulz" or "eigh")."""
  _checks.check_choice("isqrt_method", method, METHODS)
  return method


def _operand_class(dtype: jnp.dtype, precision: PrecisionLike) -> str | None:
  if jnp.finfo(dtype).bits <= 16:
    return "bfloat16"
  if jnp.finfo(dtype).bits > 32:
    return None
  default = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
  p = precision if precision is not None else default
  names = [str(q).lower() for q in (p if isinstance(p, tuple) else (p,))]
  return "float32" if all("highest" in q or q == "float32" for q in names) else "tf32"


def check_stability(iterations: int, dtype: Dtype, precision: PrecisionLike = None) -> None:
  """Refuses (`ValueError`) or warns for iteration counts that
  `STABILITY_LIMITS` shows diverge for these operands."""
  cls = _operand_class(jnp.dtype(dtype), precision)
  if cls is None:
    return
  warn, refuse = STABILITY_LIMITS[cls]
  where = (
    "on GPU, float32 products below HIGHEST precision run in TF32"
    if cls == "tf32"
    else f"{cls} operands"
  )
  if refuse is not None and iterations >= refuse:
    raise ValueError(
      f"isqrt_iterations: {iterations} Newton–Schulz iterations diverge with {where} "
      f"(NaN or relative error over 0.4 from K={refuse}; docs/numerics.md); use "
      f"K < {refuse}, or float32 operands (policy 'bfloat16-sqrt32')"
    )
  if iterations >= warn:
    warnings.warn(
      f"isqrt_iterations={iterations}: with {where} the square root's error grows "
      f"again from K={warn} and the iteration can diverge (docs/numerics.md); "
      + (
        "use precision='highest'"
        if cls == "tf32"
        else "use isqrt_method='eigh' for a near-exact root"
        if cls == "float32"
        else "use float32 operands (policy 'bfloat16-sqrt32') or fewer iterations"
      ),
      stacklevel=3,
    )


def _scale(m: jax.Array, normalization: str) -> jax.Array:
  """`[..., 1, 1]` scale `c` with `A = M / c` inside the iteration's region of
  convergence (all eigenvalues in (0, 1]): `tr M`, or `||M||_F <= tr M`, which
  is tighter when the spectrum is spread (few tokens, many channels)."""
  if normalization == "trace":
    return jnp.trace(m, axis1=-2, axis2=-1)[..., None, None]
  # Scaled by the largest entry: the plain sum of squares overflows float32
  # for moments above ~1e19 (tokens of ~3e9), long before the trace does.
  big = jnp.max(jnp.abs(m), axis=(-2, -1), keepdims=True)
  return big * jnp.sqrt(jnp.sum(jnp.square(m / big), axis=(-2, -1), keepdims=True))


def sqrtm_newton_schulz(
  m: jax.Array,
  iterations: int,
  *,
  normalization: str = "trace",
  dtype: Dtype | None = None,
  precision: PrecisionLike = None,
  remat_body: bool = False,
  coupled: bool | None = None,
  stability_check: bool = True,
) -> jax.Array:
  """Approximate square root of SPD matrices by `iterations` coupled steps.

  docs/math.md section 3: `A = M / c` with `c = tr(M)`, `K` coupled steps (the
  first and the last specialised), `S = sqrt(c) * Y`; `3K - 3` products for
  `K >= 2`, a single one for `K = 1`. The middle `K - 2` steps run in a
  `lax.fori_loop` with a static trip count. For `K <= Z_ONLY_MAX_ITERATIONS`
  the loop carries `Z` alone (`newton_schulz_step`), otherwise `Y` and `Z`
  (`coupled_step`, stable for any `K`); both compute the spec's polynomial in `A`.

  Args:
    m: `[..., dim, dim]` symmetric positive definite.
    iterations: `K >= 1`, a static Python int.
    normalization: `"trace"` (the spec's, the original's numbers) or
      `"frobenius"` (`c = ||M||_F`: the same products, several times closer
      to the exact root at K <= 5 when the spectrum is spread; see
      docs/numerics.md).
    dtype: dtype of the iteration's operands and state; default `m`'s, at
      least float32. The trace and the final scale stay in float32 or wider.
    precision: matmul precision.
    remat_body: checkpoint the loop body, so reverse mode keeps only the
      carried state (`Z`, or `Y` and `Z`) per step and recomputes the rest
      in the backward pass.
    coupled: carry `Y` and `Z` (True) or `Z` alone (False); default: `Z`
      alone up to `Z_ONLY_MAX_ITERATIONS` iterations, where the two agree to
      round-off.
    stability_check: refuse or warn for iteration counts that diverge with
      these operands (`check_stability`); off only to study divergence.

  Returns:
    `[..., dim, dim]` approximation of `m^{1/2}`, in `dtype`.

  Example:
    >>> s = sqrtm_newton_schulz(jnp.eye(4)[None] * 4.0, iterations=5)  # ~2 I
  """
  _check_square(m)
  k = check_iterations(iterations)
  check_normalization(normalization)
  acc = jnp.promote_types(m.dtype, jnp.float32)
  dtype = jnp.dtype(dtype) if dtype is not None else acc
  if stability_check:
    check_stability(k, dtype, precision)
  eye = jnp.eye(m.shape[-1], dtype=acc)
  m = m.astype(acc)  # trace and scaling in float32 or wider
  t = _scale(m, normalization)  # > 0: M has eps * I
  a = m / t
  if k == 1:
    y = 0.5 * _mm(a.astype(dtype), (3.0 * eye - a).astype(dtype), precision)
  else:
    if coupled is None:
      coupled = k > Z_ONLY_MAX_ITERATIONS
    a_op = a.astype(dtype)
    z = (1.5 * eye - 0.5 * a).astype(dtype)  # iteration 1: Z = T, Y = A T
    step: Callable[..., Any]
    init: Any
    if coupled:
      step = functools.partial(coupled_step, precision=precision)
      init = (_mm(a_op, z, precision), z)
    else:
      step = functools.partial(newton_schulz_step, a=a_op, precision=precision)
      init = z
    run = cast(Callable[..., Any], jax.checkpoint(step) if remat_body else step)
    body: Callable[[int, Any], Any] = (lambda _, yz: run(*yz)) if coupled else (lambda _, z: run(z))
    out = jax.lax.fori_loop(0, k - 2, body, init)
    # iteration K, Y only: 1.5 Y - 0.5 Y (Z Y)
    y, z = out if coupled else (_mm(a_op, out, precision), out)
    y = 1.5 * y - 0.5 * _mm(y, _mm(z, y, precision), precision)
  return (jnp.sqrt(t) * y.astype(acc)).astype(dtype)


_exact = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _eigh_root(m):
  w, v = jnp.linalg.eigh(m, symmetrize_input=True)
  s = jnp.sqrt(jnp.maximum(w, 0.0))
  return _exact(v * s[..., None, :], jnp.swapaxes(v, -1, -2)), v, s


@jax.custom_jvp
def _sqrtm_eigh(m: jax.Array) -> jax.Array:
  return _eigh_root(m)[0]


@_sqrtm_eigh.defjvp
def _sqrtm_eigh_jvp(primals, tangents):
  # dS solves the Lyapunov equation S dS + dS S = dM; in the eigenbasis that
  # is an elementwise division by s_i + s_j, finite for repeated eigenvalues
  # (where the derivative of `eigh` itself divides by zero). The rule is
  # linear in dM, so reverse mode follows by transposition.
  (m,), (dm,) = primals, tangents
  out, v, s = _eigh_root(m)
  vt = jnp.swapaxes(v, -1, -2)
  dm = 0.5 * (dm + jnp.swapaxes(dm, -1, -2))
  den = s[..., :, None] + s[..., None, :]
  den = jnp.where(den > 0, den, jnp.inf)  # S singular: no derivative there, use 0
  return out, _exact(_exact(v, _exact(_exact(vt, dm), v) / den), vt)


def sqrtm_eigh(m: jax.Array, *, dtype: Dtype | None = None) -> jax.Array:
  """Exact square root `V sqrt(max(w, 0)) V^T` of symmetric PSD matrices.

  For evaluation and as a reference: `eigh` is many times slower than
  Newton–Schulz on GPU. The derivative is the Lyapunov one (see
  `_sqrtm_eigh_jvp`; forward and reverse mode), finite for repeated
  eigenvalues; it needs `S` to be nonsingular, which the moment's `eps * I`
  ridge guarantees.

  Args:
    m: `[..., dim, dim]` symmetric positive semi-definite; the symmetric
      part is used.
    dtype: output dtype; the decomposition runs in `m`'s dtype, at least
      float32 (`eigh` has no bfloat16 kernel).

  Returns:
    `[..., dim, dim]` `m^{1/2}` in `dtype` (default: the decomposition's).
  """
  _check_square(m)
  acc = jnp.promote_types(m.dtype, jnp.float32)
  out = _sqrtm_eigh(m.astype(acc))
  return out.astype(dtype if dtype is not None else acc)


def matrix_sqrt(
  m: jax.Array,
  *,
  method: str = "newton_schulz",
  iterations: int = 3,
  normalization: str = "trace",
  dtype: Dtype | None = None,
  precision: PrecisionLike = None,
  remat_body: bool = False,
) -> jax.Array:
  """`sqrtm_newton_schulz` or `sqrtm_eigh` by `method`; the Newton–Schulz
  arguments are ignored (but still validated) for `"eigh"`."""
  check_method(method)
  if method == "eigh":
    check_iterations(iterations)
    check_normalization(normalization)
    return sqrtm_eigh(m, dtype=dtype)
  return sqrtm_newton_schulz(
    m,
    iterations,
    normalization=normalization,
    dtype=dtype,
    precision=precision,
    remat_body=remat_body,
  )
