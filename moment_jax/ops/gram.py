"""The Newton–Schulz square root of a token moment, run on the tokens' Gram
matrix instead of the channel-by-channel moment.

With `U = Hc / sqrt(n)` (`[tokens, dim]`), the moment is `M = eps I + U^T U`,
and every Newton–Schulz iterate is a polynomial in `M`. Such polynomials
have the form `a I + U^T P U` with a scalar `a` and a `[tokens, tokens]`
matrix `P` (itself a polynomial in the Gram matrix `G = U U^T`), and they
multiply as

    (a I + U^T P U)(b I + U^T Q U) = ab I + U^T (a Q + b P + P G Q) U.

So the iteration can carry `(a, P)` pairs: each product costs `2 tokens^3`
FLOPs instead of `dim^3`, and only the result is mapped back to channels,
`S = sqrt(c) (a I + U^T P U)`. In exact arithmetic this is docs/math.md section 3's
polynomial, product for product; for ViT-B (196 tokens, 768 channels) it
does ~10x fewer FLOPs at K=3 and keeps no `[dim, dim]` residual but `S`.
It pays off whenever tokens are fewer than channels (`use_token_space`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike
from jax.custom_derivatives import SymbolicZero

from moment_jax.ops import _checks
from moment_jax.ops.sqrtm import (
  Z_ONLY_MAX_ITERATIONS,
  check_iterations,
  check_normalization,
  check_stability,
)

__all__ = [
  "aligned_tokens",
  "gram_sqrtm",
  "iterate_dtype",
  "pad_tokens",
  "token_gram",
  "use_token_space",
]

SPACES = ("auto", "channel", "token")


class _Diag(NamedTuple):
  """`P = s I`, `s` `[batch, 1, 1]`: kept symbolic, so products with it cost
  one GEMM (or none) instead of two."""

  s: jax.Array


# A Newton–Schulz iterate `a I + U^T P U`: `a` is `[batch, 1, 1]` (float32 or
# wider), `P` a `[batch, tokens, tokens]` array in the iteration's dtype or a `_Diag`.
# (`Any` for P: mypy cannot narrow the union through the product rule's branches.)
_Element = tuple[jax.Array, Any]


def check_space(space: str) -> str:
  """Validates `isqrt_space` ("auto", "channel" or "token")."""
  _checks.check_choice("isqrt_space", space, SPACES)
  return space


def use_token_space(tokens: int, dim: int, iterations: int, space: str = "auto") -> bool:
  """Whether the square root runs on the Gram matrix: `space == "token"`, or
  "auto" and fewer FLOPs there (Gram, products and the map back, against
  the moment and `3K - 3` channel products; a token product costs two)."""
  if check_space(space) != "auto":
    return space == "token"
  products = max(3 * iterations - 3, 2)
  channel = tokens * dim**2 + products * dim**3
  token = 2 * tokens**2 * dim + tokens * dim**2 + 2 * (5 * iterations) * tokens**3
  return token < channel


class _Algebra:
  """Products and sums of `(a, P)` iterates for one Gram matrix `g`."""

  def __init__(self, g: jax.Array, dtype: jnp.dtype, precision: PrecisionLike):
    self.g, self.dtype, self.precision = g.astype(dtype), dtype, precision
    self.eye = jnp.eye(g.shape[-1], dtype=dtype)

  def mm(self, p: jax.Array, q: jax.Array) -> jax.Array:
    return jnp.matmul(p, q, precision=self.precision).astype(self.dtype)

  def cast(self, s: jax.Array) -> jax.Array:
    # float32 scalars would widen a bfloat16 `P`, and the backward would keep
    # the wide copies.
    return s.astype(self.dtype)

  def dense(self, p: "jax.Array | _Diag") -> jax.Array:
    return self.cast(p.s) * self.eye if isinstance(p, _Diag) else p

  def mul(self, x: _Element, y: _Element) -> _Element:
    """`(a, P)(b, Q) = (ab, aQ + bP + P G Q)`."""
    (a, p), (b, q) = x, y
    c = self.cast
    if isinstance(p, _Diag) and isinstance(q, _Diag):
      return a * b, c(a * q.s + b * p.s) * self.eye + c(p.s * q.s) * self.g
    if isinstance(p, _Diag):
      return a * b, c(a) * q + c(b * p.s) * self.eye + c(p.s) * self.mm(self.g, q)
    if isinstance(q, _Diag):
      return a * b, c(b) * p + c(a * q.s) * self.eye + c(q.s) * self.mm(p, self.g)
    return a * b, c(a) * q + c(b) * p + self.mm(self.mm(p, self.g), q)

  def comb(self, s: float, x: _Element, t: float, y: _Element) -> _Element:
    """`s x + t y`."""
    a = s * x[0] + t * y[0]
    if isinstance(x[1], _Diag) and isinstance(y[1], _Diag):
      return a, _Diag(s * x[1].s + t * y[1].s)
    return a, (s * self.dense(x[1]) + t * self.dense(y[1])).astype(self.dtype)

  def scale(self, s: float, x: _Element) -> _Element:
    return s * x[0], (s * self.dense(x[1])).astype(self.dtype)


def token_gram(
  hc: jax.Array,
  n: jax.Array,
  *,
  precision: PrecisionLike = None,
) -> jax.Array:
  """`[batch, tokens, tokens]` Gram matrix `hc hc^T / n` of centred tokens,
  in `hc`'s dtype, at least float32 (GEMMs accumulate in float32)."""
  return _gram(hc, n, precision)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _gram(hc: jax.Array, n: jax.Array, precision: PrecisionLike) -> jax.Array:
  acc = jnp.promote_types(hc.dtype, jnp.float32)
  g = jnp.einsum("bnd,bmd->bnm", hc, hc, precision=precision, preferred_element_type=acc)
  return g / n.astype(acc)[:, None, None]


def _gram_jvp(precision: PrecisionLike, primals: tuple, tangents: tuple) -> tuple:
  """`dG = (dH hc^T + hc dH^T) / n - G dn / n`. JAX transposes it into the
  backward: `dH = ((dG + dG^T) / n) hc`, one GEMM."""
  (hc, n), (dhc, dn) = primals, tangents
  g = _gram(hc, n, precision)
  n = n.astype(g.dtype)[:, None, None]
  terms = []
  if not _is_zero(dhc):
    # In hc's dtype, not the forward's float32: then the backward rounds dG to bf16 once and runs
    # a bf16 GEMM, as every bf16-policy product does, not a float32 one on upcast tokens.
    half = jnp.einsum(
      "bnd,bmd->bnm", dhc, hc, precision=precision, preferred_element_type=hc.dtype
    ).astype(g.dtype)
    terms.append((half + jnp.swapaxes(half, -1, -2)) / n)
  if not _is_zero(dn):
    terms.append(-g * (dn.astype(g.dtype)[:, None, None] / n))
  return g, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(g)


def _is_zero(t: Any) -> bool:
  """A tangent known to be zero: symbolic, or of an integer input (float0)."""
  return isinstance(t, SymbolicZero) or t.dtype == jax.dtypes.float0


_gram.defjvp(_gram_jvp, symbolic_zeros=True)


def gram_sqrtm(
  g: jax.Array,
  hc: jax.Array,
  n: jax.Array,
  eps: float,
  iterations: int,
  *,
  normalization: str = "trace",
  dtype: Dtype | None = None,
  precision: PrecisionLike = None,
  remat_body: bool = False,
  coupled: bool | None = None,
  stability_check: bool = True,
) -> jax.Array:
  """Newton–Schulz root of `M = hc^T hc / n + eps I`, run on the Gram matrix
  `g = token_gram(hc, n)`.

  The same iterates as `second_moment` followed by `sqrtm_newton_schulz`
  (docs/math.md sections 2-3: trace or Frobenius scaling, `K` coupled steps, `Z`
  alone in the loop up to `Z_ONLY_MAX_ITERATIONS`), computed as described
  in this module's docstring.

  Args:
    g: `[batch, tokens, tokens]` `token_gram(hc, n)`.
    hc: centred `[batch, tokens, dim]` tokens, zero on padding rows.
    n: valid tokens per sample, `[batch]`, at least 1.
    eps: the moment's ridge.
    iterations: `K >= 1`, a static Python int.
    normalization: "trace" or "frobenius" (see `sqrtm_newton_schulz`).
    dtype: dtype of the Gram matrix, the iterates and the result; default:
      `hc`'s, at least float32. Scales stay in float32 or wider.
    precision: matmul precision of every product.
    remat_body: checkpoint the loop body (see `sqrtm_newton_schulz`).
    coupled: carry `Y` and `Z` (True) or `Z` alone (False); default as in
      `sqrtm_newton_schulz`.
    stability_check: refuse or warn for diverging iteration counts.

  Returns:
    `[batch, dim, dim]` approximation of `M^{1/2}` in `dtype`.

  Example:
    >>> tokens = jax.random.normal(jax.random.key(0), (2, 16, 32))
    >>> hc, n = ops.center(tokens)
    >>> s = gram_sqrtm(token_gram(hc, n), hc, n, 1e-5, iterations=3)
    >>> s.shape   # [batch, dim, dim], as the channel-space root
    (2, 32, 32)
  """
  k = check_iterations(iterations)
  check_normalization(normalization)
  acc = jnp.promote_types(g.dtype, jnp.float32)
  dtype = iterate_dtype(g.dtype, dtype)
  if stability_check:
    check_stability(k, dtype, precision)
  dim = hc.shape[-1]
  n = n.astype(acc)[:, None, None]
  g = g.astype(acc)
  c = _scale(g, eps, dim, normalization)
  rows = aligned_tokens(g.shape[-1], dtype)
  alg = _Algebra(pad_tokens(g, rows, axes=(-2, -1)), dtype, precision)
  a_el = (eps / c, _Diag(1 / c))  # A = M / c
  if k == 1:
    three_minus_a = (3.0 - a_el[0], _Diag(-1 / c))
    y = alg.scale(0.5, alg.mul(a_el, three_minus_a))
  else:
    if coupled is None:
      coupled = k > Z_ONLY_MAX_ITERATIONS
    z = (1.5 - 0.5 * a_el[0], _Diag(-0.5 / c))  # iteration 1: Z = T

    def z_only(z):  # Z <- 1.5 Z - 0.5 (Z (A Z)) Z
      return alg.comb(1.5, z, -0.5, alg.mul(alg.mul(z, alg.mul(a_el, z)), z))

    def both(yz):  # P = Z Y;  Y <- 1.5 Y - 0.5 Y P;  Z <- 1.5 Z - 0.5 P Z
      y, z = yz
      p = alg.mul(z, y)
      return alg.comb(1.5, y, -0.5, alg.mul(y, p)), alg.comb(1.5, z, -0.5, alg.mul(p, z))

    step: Callable[..., Any] = both if coupled else z_only
    init: Any
    if remat_body:
      step = jax.checkpoint(step)
    if coupled:
      init, loops = (alg.mul(a_el, z), (z[0], alg.dense(z[1]))), k - 2
    elif k > 2:  # iteration 2 outside the loop: with Z = T it costs 2 GEMMs, not 6
      init, loops = step(z), k - 3
    else:
      init, loops = z, 0
    out = jax.lax.fori_loop(0, loops, lambda _, s: step(s), init) if loops else init
    y, z = out if coupled else (alg.mul(a_el, out), out)
    y = alg.comb(1.5, y, -0.5, alg.mul(y, alg.mul(z, y)))  # iteration K: Y only
  tokens = hc.shape[1]  # P's block for hc's rows, padded or not
  return _to_channels((y[0], y[1][:, :tokens, :tokens]), c, hc, n, dtype, precision)


# Rows of the token-space operands start on 16-byte boundaries: GPU GEMMs load
# aligned rows with vector and bulk (TMA) copies, and 196 bf16 tokens make a
# 392-byte row. Padded to 200, the bf16 head step ran 7-13% faster (H100,
# B=64-256; docs/performance-history.md). 1 turns the padding off.
ROW_ALIGN_BYTES = 16


def iterate_dtype(dtype: Dtype, requested: Dtype | None = None) -> jnp.dtype:
  """dtype of `gram_sqrtm`'s iterates for a Gram matrix (or tokens) in
  `dtype`: `requested`, else `dtype` at least float32."""
  if requested is not None:
    return jnp.dtype(requested)
  return jnp.dtype(jnp.promote_types(dtype, jnp.float32))


def aligned_tokens(tokens: int, dtype: Dtype) -> int:
  """`tokens` rounded up to a whole number of `ROW_ALIGN_BYTES` in `dtype`.

  Example:
    >>> aligned_tokens(196, jnp.bfloat16), aligned_tokens(196, jnp.float32)
    (200, 196)
  """
  multiple = max(ROW_ALIGN_BYTES // jnp.dtype(dtype).itemsize, 1)
  return -(-tokens // multiple) * multiple


def pad_tokens(x: jax.Array, rows: int, axes: tuple[int, ...] = (-2,)) -> jax.Array:
  """`x` with zero entries appended along `axes` up to `rows`.

  Exact for the token-space root: zero token rows add nothing to the Gram
  matrix's products, and with `G = diag(G', 0)` every iterate `P` is
  block-diagonal, its leading block the unpadded iterate.
  """
  widths = [(0, 0)] * x.ndim
  for axis in axes:
    widths[axis] = (0, rows - x.shape[axis])
  return jnp.pad(x, widths) if any(w for _, w in widths) else x


def _scale(g: jax.Array, eps: float, dim: int, normalization: str) -> jax.Array:
  """`[batch, 1, 1]` `tr M` or `||M||_F` of `M = eps I_dim + U^T U`, from
  `G = U U^T`: `tr M = dim eps + tr G`, and `||M||_F^2 = dim eps^2 +
  2 eps tr G + ||G||_F^2` (`U^T U` and `U U^T` share their nonzero spectrum)."""
  tr = jnp.trace(g, axis1=-2, axis2=-1)[..., None, None]
  if normalization == "trace":
    return dim * eps + tr
  # Scaled by the largest entry, as in `sqrtm._scale`, against overflow.
  big = jnp.maximum(jnp.max(jnp.abs(g), axis=(-2, -1), keepdims=True), eps)
  sq = jnp.sum(jnp.square(g / big), axis=(-2, -1), keepdims=True)
  return big * jnp.sqrt(dim * (eps / big) ** 2 + 2 * (eps / big) * (tr / big) + sq)


def _to_channels(y: _Element, c, hc, n, dtype, precision) -> jax.Array:
  """`sqrt(c) (a I + U^T P U)` as `[batch, dim, dim]`, with `U = hc / sqrt(n)`."""
  a, p = y
  root = jnp.sqrt(c)
  w = jnp.matmul((p * (root / n)).astype(dtype), hc.astype(dtype), precision=precision)
  s = jnp.einsum(
    "bnd,bne->bde", hc.astype(dtype), w, precision=precision, preferred_element_type=dtype
  )
  # A diagonal update, not `+ a I`: the backward of a broadcast identity keeps it.
  i = jnp.arange(hc.shape[-1])
  return s.at[:, i, i].add((root * a)[:, :, 0].astype(dtype))
