"""The whole feature pipeline of docs/math.md sections 1-6, as one pure function."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike
from jax.ad_checkpoint import checkpoint_name

from moment_jax.ops import _checks as checks
from moment_jax.ops.chunk import check_chunk, map_samples
from moment_jax.ops.gram import (
  aligned_tokens,
  check_space,
  gram_sqrtm,
  iterate_dtype,
  pad_tokens,
  token_gram,
  use_token_space,
)
from moment_jax.ops.graph import center_graph, normalize_graph, propagate
from moment_jax.ops.moment import center, centered_moment, token_count
from moment_jax.ops.sketch import check_sketch_dim, tensor_sketch_moment
from moment_jax.ops.sqrtm import check_iterations, check_method, check_normalization, matrix_sqrt
from moment_jax.ops.triu import triu_size, triu_vector

__all__ = ["feature_size", "moment_features"]


def feature_size(dim: int, use_third_order: bool = False, sketch_dim: int = 1024) -> int:
  """Length `F = dim (dim + 1) / 2 (+ sketch_dim)` of `moment_features`."""
  return triu_size(dim) + (sketch_dim if use_third_order else 0)


def check_config(
  isqrt_iterations: int,
  use_third_order: bool,
  sketch_dim: int,
  isqrt_normalization: str = "trace",
  isqrt_method: str = "newton_schulz",
  isqrt_space: str = "auto",
) -> None:
  """Validates the static configuration of the pipeline."""
  check_iterations(isqrt_iterations)
  check_normalization(isqrt_normalization)
  check_method(isqrt_method)
  check_space(isqrt_space)
  if isqrt_space == "token" and isqrt_method != "newton_schulz":
    raise ValueError(
      f"isqrt_space: 'token' runs the Newton–Schulz iteration; with "
      f"isqrt_method={isqrt_method!r} use 'auto' or 'channel'"
    )
  if use_third_order:
    check_sketch_dim(sketch_dim)


def moment_features(
  tokens: jax.Array,
  graph: jax.Array | None = None,
  mask: jax.Array | None = None,
  *,
  isqrt_iterations: int = 3,
  isqrt_normalization: str = "trace",
  isqrt_method: str = "newton_schulz",
  isqrt_space: str = "auto",
  use_third_order: bool = False,
  sketch_dim: int = 1024,
  sketch_seed: int = 0,
  eps: float = 1e-5,
  moment_dtype: Dtype | None = None,
  sqrt_dtype: Dtype | None = None,
  precision: PrecisionLike = None,
  remat_isqrt: bool = False,
  isqrt_chunk: int | None = None,
  check_values: bool | str = False,
) -> jax.Array:
  """Moment features of token sets: graph propagation, square-rooted
  covariance, upper triangle and optional third-order sketch.

  Args:
    tokens: `[batch, tokens, dim]` floating.
    graph: optional `[tokens, tokens]` or `[batch, tokens, tokens]`
      non-negative edge weights; `None` means no propagation.
    mask: optional `[batch, tokens]` bool, `False` for padding tokens.
    isqrt_iterations: Newton–Schulz steps `K >= 1`.
    isqrt_normalization: "trace" (the spec's; the original's numbers) or
      "frobenius" (same cost, closer to the exact root at small K; see
      docs/numerics.md).
    isqrt_method: "newton_schulz" or "eigh" (the exact root, for evaluation
      and reference; much slower on GPU).
    isqrt_space: where Newton–Schulz runs: "channel" (on the `[dim, dim]`
      moment, docs/math.md's literal form), "token" (on the `[tokens, tokens]` Gram
      matrix: the same iterates, far fewer FLOPs when tokens < dim; see
      `ops.gram`) or "auto" (the cheaper of the two; "channel" for "eigh").
    use_third_order: append the Tensor Sketch of the third moment.
    sketch_dim: sketch length (only used with the third order).
    sketch_seed: seed of the sketch hashes.
    eps: ridge of the moment, degree floor and power-normalisation offset.
    moment_dtype: dtype of the propagation, centring, moment and sketch;
      default: the tokens', at least float32.
    sqrt_dtype: dtype of the Newton–Schulz operands and state; default: the
      moment's. Trace and scaling stay in float32 or wider.
    precision: matmul precision of every product.
    remat_isqrt: recompute the Newton–Schulz loop in the backward pass, with
      a checkpointed loop body (one matrix per step in flight).
    isqrt_chunk: run the per-sample pipeline (propagation, moment, square
      root, triangle, sketch) over the batch in chunks of this many samples
      (`lax.map` with `batch_size`), so its workspace stops growing with the
      batch.
    check_values: also check values: finite tokens, non-negative graph, no
      all-padding mask row, and finite results of each stage (propagation,
      moment, square root, features), named in the error. `True` or
      "callback": host callbacks (a small device-to-host sync); "checkify":
      `checkify.check`s for a `checkify.checkify`-wrapped caller. See
      `checks.check_mode`.

  Returns:
    `[batch, F]` features, `F = feature_size(dim, use_third_order,
    sketch_dim)`, in the square-root stage's dtype (float32 by default).
    The moment, the square root and the features are tagged with
    `checkpoint_name` ("moment", "sqrtm", "features") for remat policies.

  Example:
    >>> f = moment_features(jnp.ones((2, 196, 64)), grid_graph(14, 14))
    >>> f.shape
    (2, 2080)
  """
  checks.check_call(tokens, graph, mask, values=check_values)
  check_config(
    isqrt_iterations, use_third_order, sketch_dim, isqrt_normalization, isqrt_method, isqrt_space
  )
  check_chunk(isqrt_chunk)
  fn = functools.partial(
    pipeline,
    isqrt_iterations=isqrt_iterations,
    isqrt_normalization=isqrt_normalization,
    isqrt_method=isqrt_method,
    isqrt_space=isqrt_space,
    use_third_order=use_third_order,
    sketch_dim=sketch_dim,
    sketch_seed=sketch_seed,
    eps=eps,
    moment_dtype=moment_dtype,
    sqrt_dtype=sqrt_dtype,
    precision=precision,
    remat_isqrt=remat_isqrt,
    check=checks.check_mode(check_values),
  )
  if isqrt_chunk is None:
    return fn(tokens, graph, mask)
  return map_samples(fn, isqrt_chunk, tokens, graph, mask)


def pipeline(
  tokens: jax.Array,
  graph: jax.Array | None,
  mask: jax.Array | None,
  **options: Any,
) -> jax.Array:
  """`moment_features` without its input checks, for callers that made them
  once (the heads check a call's inputs before their remat and chunk
  wrappers). `options` are `root_and_sketch`'s; `check` (a
  `checks.check_mode`) adds the stage checks."""
  s, v3 = root_and_sketch(tokens, graph, mask, **options)
  feats = triu_vector(s)
  if v3 is not None:
    feats = jnp.concatenate([feats, v3.astype(feats.dtype)], axis=-1)
  return checkpoint_name(feats, "features")


def root_and_sketch(
  tokens: jax.Array,
  graph: jax.Array | None,
  mask: jax.Array | None,
  *,
  isqrt_iterations: int,
  use_third_order: bool,
  sketch_dim: int,
  sketch_seed: int,
  eps: float,
  moment_dtype: Dtype | None,
  sqrt_dtype: Dtype | None,
  precision: PrecisionLike,
  remat_isqrt: bool,
  isqrt_normalization: str = "trace",
  isqrt_method: str = "newton_schulz",
  isqrt_space: str = "auto",
  check: str | None = None,
) -> tuple[jax.Array, jax.Array | None]:
  """The pipeline up to the features: the square root `S` `[batch, dim, dim]`
  (tagged "sqrtm") and, with the third order, the sketch `[batch, sketch_dim]`
  (else None). `pipeline` makes the features from them; the Pallas
  projection (`moment_jax.kernels.triu_project`) reads them directly."""
  dtype = (
    jnp.dtype(moment_dtype)
    if moment_dtype is not None
    else (jnp.promote_types(tokens.dtype, jnp.float32))
  )
  h = tokens.astype(dtype)
  token_space = isqrt_method == "newton_schulz" and use_token_space(
    h.shape[1], h.shape[2], isqrt_iterations, isqrt_space
  )
  # In token space the centred tokens get zero rows up to an aligned count
  # (`ops.gram.aligned_tokens`); the graph's padded rows make them for free.
  rows = h.shape[1]
  if token_space:
    rows = aligned_tokens(rows, iterate_dtype(dtype, sqrt_dtype))
  if graph is not None:
    # The graph is small: normalised and centred in float32 or wider, rounded once.
    wide = jnp.promote_types(dtype, jnp.float32)
    c = center_graph(normalize_graph(jnp.asarray(graph, wide), eps, mask), mask)
    c = pad_tokens(c, rows)
    hc = checks.check_finite(propagate(c.astype(dtype), h, precision), "propagation", check)
    n = token_count(h, mask, dtype=dtype)
  else:
    hc, n = center(h, mask, dtype=dtype)
    hc = pad_tokens(hc, rows)
  if token_space:
    s = _token_root(
      hc, n, eps, isqrt_iterations, isqrt_normalization, sqrt_dtype, precision, remat_isqrt, check
    )
  else:
    s = _channel_root(
      hc,
      n,
      eps,
      isqrt_iterations,
      isqrt_normalization,
      isqrt_method,
      sqrt_dtype,
      precision,
      remat_isqrt,
      check,
    )
  s = checkpoint_name(checks.check_finite(s, "sqrtm", check), "sqrtm")
  if not use_third_order:
    return s, None
  v3 = tensor_sketch_moment(hc[:, : h.shape[1]], sketch_dim, sketch_seed, mask, eps, dtype=dtype)
  return s, checks.check_finite(v3.astype(s.dtype), "features", check)


def _channel_root(
  hc, n, eps, iterations, normalization, method, sqrt_dtype, precision, remat_isqrt, check
) -> jax.Array:
  """The moment `[batch, dim, dim]` and its square root (docs/math.md sections 2-3)."""
  # The moment is stored in the square root's dtype: bf16 policies keep a
  # bf16 moment (accumulated in f32 by the GEMM); its trace is taken in f32.
  m2 = centered_moment(hc, n, eps, precision=precision, accumulate=sqrt_dtype)
  m2 = checkpoint_name(checks.check_finite(m2, "moment", check), "moment")
  sqrt: Callable[..., jax.Array] = functools.partial(
    matrix_sqrt,
    method=method,
    iterations=iterations,
    normalization=normalization,
    dtype=sqrt_dtype,
    precision=precision,
    remat_body=remat_isqrt,
  )
  if remat_isqrt:  # keep only the moment; the backward re-runs the loop
    sqrt = jax.checkpoint(sqrt, policy=jax.checkpoint_policies.nothing_saveable)
  return sqrt(m2)


def _token_root(
  hc, n, eps, iterations, normalization, sqrt_dtype, precision, remat_isqrt, check
) -> jax.Array:
  """The same root through the `[batch, tokens, tokens]` Gram matrix
  (`ops.gram`), which is tagged "moment" for remat policies."""

  def root(hc, n):
    g = token_gram(hc, n, precision=precision)
    g = checkpoint_name(checks.check_finite(g, "moment", check), "moment")
    return gram_sqrtm(
      g,
      hc,
      n,
      eps,
      iterations,
      normalization=normalization,
      dtype=sqrt_dtype,
      precision=precision,
      remat_body=remat_isqrt,
    )

  if remat_isqrt:  # keep only the centred tokens; the backward re-runs the rest
    root = jax.checkpoint(root, policy=jax.checkpoint_policies.nothing_saveable)
  return root(hc, n)
