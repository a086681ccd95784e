"""The head's projection with the upper triangle folded in: `triu_vector(S) @ W + b`.

The XLA path gathers the triangle into `[batch, F]` features (F = D(D+1)/2),
writes them to memory, reads them back for the product and, in the backward,
scatter-adds their cotangent into `[batch, D, D]`. Here the kernels read S
and write the cotangent of S straight from and into their tiles: the
cotangent of the `[batch, F]` features is never built. Under
differentiation the forward kernel writes the features it reads (in S's
dtype) as the backward's residual, about half the bytes of S; otherwise it
writes none.

Forward (`forward="kernel"`): split-K over groups of row chunks, one
`[m, n]` partial sum per group, summed (and the bias added) outside. A chunk
is the `k` columns of one `k`-aligned column block of one row of S, lanes
below the diagonal masked (`forward_chunk`): its features are one aligned
slice of S, which Triton loads in 16-byte vectors into its pipeline, and
its rows of W are consecutive. With the split backward the residual keeps
that chunk layout (`_Plan.chunked`: 8% more columns, stored in aligned
vectors too), else the packed one. (Tiles of `k` consecutive packed rows
span row ends at unaligned offsets: loaded and stored element by element,
outside the pipeline, they ran the B=128 forward in 0.50 ms against 0.33 on
an H100.)

Backward: a dS kernel (programs over batch blocks x tiles of `k`
consecutive packed rows, looping over the outputs: `dy W_tile^T`, scattered
to the flat offsets `i * D + j` it computes from each packed index (a square
root and a correction, no table; `upper_offsets`), plus the tile's share of
the zeros below the diagonal) and a dW kernel (output blocks x tiles of the
kept features, looping over the batch: `f_tile^T dy`; it never reads W, so
the split moves no more bytes than one kernel would; with 32-bit products
it reads `[columns, batch]` features and `dy^T`, `_Plan.f_transposed`).
Apart, XLA schedules the dW kernel late, so a backbone's backward does not
run with the 605 MB dW already allocated. The fused AdamW backward, which
updates W and the moments in place (no dW buffer), runs as one kernel when
the batch fits one block: one program per tile reads its tile of W once
for both its share of dS and the update (`Tiles.bwd_split` forces either
form).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax.typing import PrecisionLike
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moment_jax.ops import split_matmul, triu_vector

__all__ = [
  "FusedAdamW",
  "Tiles",
  "default_tiles",
  "flops",
  "hbm_bytes",
  "is_highest",
  "triu_project",
  "triu_project_adamw",
]

# Triton's tensor-core dot needs every block dimension to be at least 16.
_MIN_DOT_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class Tiles:
  """Block sizes and launch settings of the kernels.

  Every size is a power of two (Triton's blocks); compiled on a GPU, the
  `m`, `n` and `k` sizes must be at least 16 (the tensor-core dot).

  Attributes:
    fwd_m, fwd_n, fwd_k: forward block of batch rows, output columns and
      packed rows (one step of a program's loop).
    fwd_programs: target program count of the forward; sets the number of
      split-K groups (output blocks x groups ~ this).
    bwd_m, bwd_n, bwd_k: backward block of batch rows, output columns and
      packed rows.
    bwd_split: None: the fused backward when the batch fits one `bwd_m`
      block, the split one (a dW and a dS kernel) otherwise; True/False force.
    fwd_warps, bwd_warps, stages: Triton's `num_warps` and `num_stages`.
    dw_m, dw_n, dw_k, dw_warps: the split backward's dW kernel (with the
      fused AdamW, its update kernel); None: the `bwd_` value.
  """

  fwd_m: int = 64
  fwd_n: int = 128
  fwd_k: int = 64
  fwd_programs: int = 528
  bwd_m: int = 64
  bwd_n: int = 64
  bwd_k: int = 64
  bwd_split: bool | None = None
  fwd_warps: int = 4
  bwd_warps: int = 4
  stages: int = 3
  dw_m: int | None = None
  dw_n: int | None = None
  dw_k: int | None = None
  dw_warps: int | None = None

  def for_dw(self) -> "Tiles":
    """These tiles with the dW kernel's sizes in the `bwd_` fields."""
    pick = lambda dw, bwd: bwd if dw is None else dw
    return dataclasses.replace(
      self,
      bwd_m=pick(self.dw_m, self.bwd_m),
      bwd_n=pick(self.dw_n, self.bwd_n),
      bwd_k=pick(self.dw_k, self.bwd_k),
      bwd_warps=pick(self.dw_warps, self.bwd_warps),
    )

  def check(self, compiled: bool) -> None:
    for f in ("fwd_m", "fwd_n", "fwd_k", "bwd_m", "bwd_n", "bwd_k", "dw_m", "dw_n", "dw_k"):
      v = getattr(self, f)
      if v is None:
        continue
      if v < 1 or v & (v - 1):
        raise ValueError(f"tiles.{f}: expected a power of two, got {v}")
      if compiled and v < _MIN_DOT_BLOCK:
        raise ValueError(
          f"tiles.{f}: expected at least {_MIN_DOT_BLOCK} for the compiled GPU kernel "
          f"(Triton's dot), got {v}"
        )
    if self.fwd_programs < 1:
      raise ValueError(f"tiles.fwd_programs: expected >= 1, got {self.fwd_programs}")


@dataclasses.dataclass(frozen=True)
class FusedAdamW:
  """AdamW for the projection kernel, applied inside its backward kernel.

  The same update as `optax.adamw(learning_rate, b1, b2, eps,
  weight_decay=weight_decay, mu_dtype=moment_dtype)` on the kernel's
  gradient (`eps_root = 0`, no mask, no Nesterov), with both moments stored
  in `moment_dtype` (optax keeps `nu` in float32). The backward reads each
  kernel tile once for the cotangent of S and the update, and writes the
  new kernel and moments in place: the gradient itself is never written.

  Attributes:
    learning_rate: a float or an optax schedule `count -> rate` (called with
      the update count before this step, as optax does).
    b1, b2, eps, weight_decay: as `optax.adamw`.
    moment_dtype: dtype of both moments (float32 or bfloat16).
  """

  learning_rate: float | Callable[[jax.Array], jax.Array] = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-4
  moment_dtype: Any = jnp.float32

  def check(self) -> None:
    for f in ("b1", "b2"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"fused_adamw.{f}: expected a float in [0, 1), got {v!r}")
    for f in ("eps", "weight_decay"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0.0:
        raise ValueError(f"fused_adamw.{f}: expected a float >= 0, got {v!r}")
    lr = self.learning_rate
    if not callable(lr) and (isinstance(lr, bool) or not isinstance(lr, (int, float))):
      raise ValueError(
        f"fused_adamw.learning_rate: expected a float or a schedule callable, got {lr!r}"
      )
    if jnp.dtype(self.moment_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
      raise ValueError(
        f"fused_adamw.moment_dtype: expected float32 or bfloat16, got {self.moment_dtype!r}"
      )

  def hyper(self, count: jax.Array) -> jax.Array:
    """`[4]` float32: the learning rate and both bias corrections of the step after `count`."""
    count = jnp.asarray(count, jnp.float32)
    lr = self.learning_rate(count) if callable(self.learning_rate) else self.learning_rate
    t = count + 1.0
    # Padded to 4 entries: the kernels load it as one power-of-two block.
    return jnp.stack([jnp.asarray(lr, jnp.float32), 1.0 - self.b1**t, 1.0 - self.b2**t, 0.0 * t])


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shapes, dtypes and launch of one call (custom_vjp's static argument)."""

  batch: int
  dim: int
  extra: int  # sketch_dim of the trailing feature block, 0 without one
  d_out: int
  mm_dtype: Any  # the products' operand dtype (`dtype`, default the kernel's)
  kernel_dtype: Any
  s_dtype: Any
  extra_dtype: Any  # None without an extra block
  bias_dtype: Any
  precision: Any  # as given to lax.dot_general inside the kernels
  xla_precision: Any  # the caller's, for the XLA forward
  forward: str  # "xla" | "kernel"
  interpret: bool
  tiles: Tiles
  adam: FusedAdamW | None = None

  @property
  def f_dtype(self) -> Any:
    """Of the features kept for the backward: S's and extra's, exact."""
    extra = () if self.extra_dtype is None else (self.extra_dtype,)
    return jnp.result_type(self.s_dtype, *extra)

  @property
  def tri(self) -> int:
    return self.dim * (self.dim + 1) // 2

  @property
  def rows(self) -> int:
    return self.tri + self.extra

  @property
  def fwd_blocks(self) -> tuple[int, int, int, int]:
    """(output-column blocks, batch blocks, split-K groups, chunks per group)."""
    t = self.tiles
    nb, mb = _cdiv(self.d_out, t.fwd_n), _cdiv(self.batch, t.fwd_m)
    chunks = forward_chunks(self.dim, self.extra, t.fwd_k)
    per = _cdiv(chunks, max(1, min(chunks, _cdiv(t.fwd_programs, nb * mb))))
    return nb, mb, _cdiv(chunks, per), per

  @property
  def chunked(self) -> bool:
    """Whether the forward kernel keeps the features in its chunk layout (else packed).

    Chunks start at aligned columns, so the kernel stores them in vectors
    (B=128 forward 0.34 ms, not 0.51, on an H100), but they hold 8% more
    columns (masked lanes); the one-kernel backward, which runs a program
    per tile of them, ran 3-5% slower on those (fused AdamW, B=64). So only
    with the split backward.
    """
    return self.forward == "kernel" and self.split_backward

  @property
  def f_transposed(self) -> bool:
    """Whether the kept features are stored `[columns, batch]` (else `[batch, columns]`).

    With 32-bit operands the dW kernel's product `f^T dy` runs on the tensor
    cores (TF32) only with the batch, its contraction, contiguous in both
    operands; from `[batch, columns]` tiles Triton transposes them first, and
    the dW kernel took 462 µs instead of 248 (H100, B=64, docs/performance-history.md).
    16-bit operands do not need it. Only with XLA's forward and the split
    backward (the forward kernel and the fused one-kernel backward keep rows).
    """
    return self.forward == "xla" and self.split_backward and jnp.dtype(self.mm_dtype).itemsize == 4

  @property
  def f_cols(self) -> int:
    """Columns of the kept features: every forward chunk's `fwd_k` lanes, or the packed rows."""
    if self.chunked:
      return forward_chunks(self.dim, self.extra, self.tiles.fwd_k) * self.tiles.fwd_k
    return self.rows

  @property
  def bwd_blocks(self) -> tuple[int, int, int]:
    """(output-column blocks, batch blocks, tiles of the kept features' columns)."""
    t = self.tiles
    return _cdiv(self.d_out, t.bwd_n), _cdiv(self.batch, t.bwd_m), _cdiv(self.f_cols, t.bwd_k)

  @property
  def split_backward(self) -> bool:
    """Whether the backward runs a dS kernel and a dW (or update) kernel, not one."""
    m_blocks, split = _cdiv(self.batch, self.tiles.bwd_m), self.tiles.bwd_split
    # The fused AdamW update cannot accumulate dW over batch blocks: split then.
    return (m_blocks > 1 if split is None else split) or (self.adam is not None and m_blocks > 1)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def forward_chunks(dim: int, extra: int, k: int) -> int:
  """How many steps the forward kernel takes (`forward_chunk`'s range): `k T_C`
  chunks of the triangle, `T_C = C (C + 1) / 2` for `C = ceil(dim / k)`
  column blocks, then `ceil(extra / k)` of the extra block. For dim=768 and
  k=64: 4,992 chunks of 64 lanes for 295,296 packed rows (92% of lanes used)."""
  c = _cdiv(dim, k)
  return k * c * (c + 1) // 2 + _cdiv(extra, k)


def forward_chunk(t: jax.Array, dim: int, k: int) -> tuple[jax.Array, jax.Array]:
  """Row `i` and column block `c` of the forward kernel's chunk `t` of the triangle.

  Column block `c` (columns `c k` to `c k + k - 1`) holds a chunk for each
  row `i < (c + 1) k`, so it starts at chunk `k T_c`, `T_c = c (c + 1) / 2`;
  `c` is the root of a quadratic in `t // k`, corrected once each way as in
  `upper_offsets`. Chunk lanes below the diagonal (`j < i`) or past the
  matrix (`j >= dim`, `i >= dim`) are masked by the kernel. Chunks `t >= k
  T_C` are the extra block's (see `forward_chunks`); for them `c` and `i`
  are meaningless.

  Args:
    t: int32 scalar or array, `t >= 0`.
    dim: matrix size.
    k: chunk width.

  Returns:
    int32 `(i, c)`, `t`'s shape.
  """
  u = lax.div(t, k)
  c = jnp.maximum(_row_of(u, -1, 1), 0)  # floor((sqrt(1 + 8u) - 1) / 2)
  tri = lambda c: lax.div(c * (c + 1), 2)
  c = jnp.where(tri(c) > u, c - 1, c)
  c = jnp.where(tri(c + 1) <= u, c + 1, c)
  return t - k * tri(c), c


def _row_of(q: jax.Array, b: int, sign: int) -> jax.Array:
  """`floor((b + sign * sqrt(b^2 + sign' 8 q)) / 2)` in float32, as int32 (may be one off)."""
  disc = float(b * b) + (8.0 if sign > 0 else -8.0) * q.astype(jnp.float32)
  root = jnp.sqrt(jnp.maximum(disc, 0.0))
  return jnp.floor((b + sign * root) * 0.5).astype(jnp.int32)


def upper_offsets(p: jax.Array, dim: int) -> jax.Array:
  """Flat offset `i * dim + j` of packed row `p` of `numpy.triu_indices(dim)`.

  Row i starts at packed index `i (2 dim + 1 - i) / 2`; its inverse, a root
  of a quadratic, is exact up to float32 rounding (every quantity is an
  integer below 2^24 for dim < 2048), and one correction each way absorbs
  that. Entries `p >= F` get `dim * dim`, out of bounds: masked on the GPU,
  dropped by the interpreter's scatter.

  Args:
    p: int32 `[k]` packed indices, `p >= 0`.
    dim: matrix size.

  Returns:
    int32 `[k]`.
  """
  tri, b = dim * (dim + 1) // 2, 2 * dim + 1
  q = jnp.minimum(p, tri - 1)
  i = jnp.clip(_row_of(q, b, -1), 0, dim - 1)
  start = lambda i: lax.div(i * (b - i), 2)
  i = jnp.where(start(i) > q, i - 1, i)
  i = jnp.where(start(i + 1) <= q, i + 1, i)
  j = q - start(i) + i
  return jnp.where(p < tri, i * dim + j, dim * dim)


def lower_offsets(q: jax.Array, dim: int) -> jax.Array:
  """Flat offset of entry `q` of the strict lower triangle, row-major (row i from `i (i-1) / 2`).

  As `upper_offsets`: float32 root, one correction each way, `dim * dim`
  for `q >= dim (dim - 1) / 2`.
  """
  low = dim * (dim - 1) // 2
  qc = jnp.clip(q, 0, max(low - 1, 0))
  i = jnp.clip(_row_of(qc, 1, 1), 1, max(dim - 1, 1))
  start = lambda i: lax.div(i * (i - 1), 2)
  i = jnp.where(start(i) > qc, i - 1, i)
  i = jnp.where(start(i + 1) <= qc, i + 1, i)
  return jnp.where(q < low, i * dim + (qc - start(i)), dim * dim)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], precision: Any) -> jax.Array:
  return lax.dot_general(
    a,
    b,
    (((contract[0],), (contract[1],)), ((), ())),
    precision=precision,
    preferred_element_type=jnp.float32,
  )


def _grid2(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`[m]` and `[k]` index vectors broadcast to `[m, k]` (pallas gathers want equal shapes)."""
  shape = (a.shape[0], b.shape[0])
  return jnp.broadcast_to(a[:, None], shape), jnp.broadcast_to(b[None, :], shape)


def _extra_cols(plan: _Plan, p: jax.Array) -> jax.Array:
  # Rows of the triangle get an out-of-bounds column, never a wrapped negative one.
  return jnp.where(p >= plan.tri, p - plan.tri, plan.extra)


def _store_cotangent(
  plan: _Plan, ds_ref, dx_ref, df: jax.Array, p: jax.Array, q: jax.Array, rows: jax.Array
) -> None:
  """Scatters `df` `[m, k]` (packed rows `p`) into dS and dx; zeros dS at lower entries `q`."""
  row_ok = rows < plan.batch
  r, c = _grid2(rows, upper_offsets(p, plan.dim))
  plgpu.store(
    ds_ref.at[r, c], df.astype(ds_ref.dtype), mask=row_ok[:, None] & (p < plan.tri)[None, :]
  )
  r, c = _grid2(rows, lower_offsets(q, plan.dim))
  plgpu.store(
    ds_ref.at[r, c],
    jnp.zeros(df.shape, ds_ref.dtype),
    mask=row_ok[:, None] & (q < plan.tri - plan.dim)[None, :],
  )
  if dx_ref is not None:
    r, c = _grid2(rows, _extra_cols(plan, p))
    plgpu.store(
      dx_ref.at[r, c],
      df.astype(dx_ref.dtype),
      mask=row_ok[:, None] & ((p >= plan.tri) & (p < plan.rows))[None, :],
    )


def _load_2d(ref, r0, nr, c0, nc, n_rows, n_cols, dtype):
  rows_ok = r0 + jnp.arange(nr) < n_rows
  cols_ok = c0 + jnp.arange(nc) < n_cols
  x = plgpu.load(
    ref.at[pl.ds(r0, nr), pl.ds(c0, nc)], mask=rows_ok[:, None] & cols_ok[None, :], other=0.0
  )
  return x.astype(dtype)


class _Rows(NamedTuple):
  """Rows of W (or dW, mu, nu) for a tile's lanes."""

  p: jax.Array  # [k] int32 packed rows, `plan.rows` where masked
  start: Any  # p[0] when the lanes run consecutively (masked ones included), else None


def _rows_index(rows: _Rows, c0, nc):
  cols = c0 + jnp.arange(nc)
  if rows.start is not None:
    return (pl.ds(rows.start, rows.p.shape[0]), pl.ds(c0, nc)), cols
  return _grid2(rows.p, cols), cols


def _load_rows(ref, rows: _Rows, c0, nc, n_rows, n_cols, dtype):
  """`ref[rows, c0:c0 + nc]`, rows `>= n_rows` and columns `>= n_cols` masked to 0.
  Each row's columns stay contiguous, so Triton loads them in vectors."""
  idx, cols = _rows_index(rows, c0, nc)
  mask = (rows.p < n_rows)[:, None] & (cols < n_cols)[None, :]
  return plgpu.load(ref.at[idx], mask=mask, other=0.0).astype(dtype)


def _store_rows(ref, x, rows: _Rows, c0, n_rows, n_cols):
  idx, cols = _rows_index(rows, c0, x.shape[1])
  mask = (rows.p < n_rows)[:, None] & (cols < n_cols)[None, :]
  plgpu.store(ref.at[idx], x.astype(ref.dtype), mask=mask)


def _chunk_lanes(plan: _Plan, q: jax.Array, lane: Any):
  """Lanes `lane` of forward chunks `q` (broadcast together): `(i, c, in_tri, base, p)`.

  Row `i` and column block `c` of the chunk (`forward_chunk`), whether each
  lane is a triangle entry, the row of W of the chunk's lane 0 (`base`, the
  rows run consecutively along the lanes, masked ones included), and each
  lane's packed row `p` (`plan.rows` for masked lanes).
  """
  k, dim = plan.tiles.fwd_k, plan.dim
  tri_chunks = forward_chunks(dim, 0, k)
  i, c = forward_chunk(q, dim, k)
  j = c * k + lane
  in_tri = (q < tri_chunks) & (j >= i) & (j < dim)
  x0 = (q - tri_chunks) * k  # the chunk's first column of the extra block
  base = jnp.where(q < tri_chunks, lax.div(i * (2 * dim + 1 - i), 2) + c * k - i, plan.tri + x0)
  ok = in_tri | ((q >= tri_chunks) & (x0 + lane < plan.extra))
  return i, c, in_tri, base, jnp.where(ok, base + lane, plan.rows)


def _tile_rows(plan: _Plan, col0, k: int) -> _Rows:
  """The rows of W for kept-feature columns `col0` to `col0 + k - 1` (`col0` a multiple of `k`)."""
  lane = jnp.arange(k)
  if not plan.chunked:
    cols = col0 + lane
    return _Rows(jnp.where(cols < plan.rows, cols, plan.rows), col0)
  fk = plan.tiles.fwd_k
  if k <= fk:  # within one chunk: consecutive rows
    q, l0 = lax.div(col0, fk), lax.rem(col0, fk)
    *_, base, p = _chunk_lanes(plan, q, l0 + lane)
    return _Rows(p, base + l0)
  cols = col0 + lane
  return _Rows(_chunk_lanes(plan, lax.div(cols, fk), lax.rem(cols, fk))[-1], None)


def _fwd_kernel(plan: _Plan, keep: bool, s_ref, w_ref, *refs):
  x_ref, rest = (refs[0], refs[1:]) if plan.extra else (None, refs)
  o_ref, f_ref = (rest[0], rest[1]) if keep else (rest[0], None)
  t = plan.tiles
  bm, bn, bk = t.fwd_m, t.fwd_n, t.fwd_k
  dim = plan.dim
  nb, _, _, per = plan.fwd_blocks
  chunks = forward_chunks(dim, plan.extra, bk)
  n_id, m_id, g_id = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  m0, n0 = m_id * bm, n_id * bn
  row_ok = (m0 + jnp.arange(bm) < plan.batch)[:, None]
  lane = jnp.arange(bk)

  def step(q, acc):
    q = g_id * per + q
    i, c, in_tri, base, p = _chunk_lanes(plan, q, lane)
    rows = _Rows(p, base)
    s0 = pl.multiple_of(i * dim + c * bk, math.gcd(dim, bk))  # 16-byte vectors of bf16 S
    f = plgpu.load(
      s_ref.at[pl.ds(m0, bm), pl.ds(s0, bk)], mask=row_ok & in_tri[None, :], other=0.0
    ).astype(plan.f_dtype)
    if x_ref is not None:
      in_x = (p >= plan.tri) & (p < plan.rows)
      xs = plgpu.load(
        x_ref.at[pl.ds(m0, bm), pl.ds(base - plan.tri, bk)],  # meaningful for extra chunks only
        mask=row_ok & in_x[None, :],
        other=0.0,
      )
      f = jnp.where(in_x[None, :], xs.astype(plan.f_dtype), f)
    if f_ref is not None:
      # The features for the backward. The output-column blocks share the batch
      # rows (one block alone ran B=256 at 0.55 ms, not 0.50).
      mine = row_ok & (jnp.arange(bm) % nb == n_id)[:, None]
      if plan.chunked:  # aligned: vector stores
        col = pl.multiple_of(q * bk, bk)
        plgpu.store(f_ref.at[pl.ds(m0, bm), pl.ds(col, bk)], f, mask=mine & (q < chunks))
      else:
        mask = mine & (p < plan.rows)[None, :]
        plgpu.store(f_ref.at[pl.ds(m0, bm), pl.ds(rows.start, bk)], f, mask=mask)
    w = _load_rows(w_ref, rows, n0, bn, plan.rows, plan.d_out, plan.mm_dtype)
    return acc + _dot(f.astype(plan.mm_dtype), w, (1, 0), plan.precision)

  acc = lax.fori_loop(0, per, step, jnp.zeros((bm, bn), jnp.float32))
  mask = row_ok & (n0 + jnp.arange(bn) < plan.d_out)[None, :]
  plgpu.store(o_ref.at[g_id, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=mask)


def _hyper(hyper_ref) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The learning rate and both bias corrections (`FusedAdamW.hyper`) as scalars."""
  h = plgpu.load(hyper_ref.at[pl.ds(0, 4)])
  pick = lambda i: jnp.sum(jnp.where(jnp.arange(4) == i, h, 0.0))
  return pick(0), pick(1), pick(2)


def _adamw_tile(plan: _Plan, hyper, opt, w: jax.Array, dw: jax.Array, p: _Rows, n0) -> None:
  """Applies `FusedAdamW` to one `[k, n]` tile: reads the moments, writes the
  new kernel and moments (optax.adamw's arithmetic, in float32). `hyper` is
  `_hyper`'s; `opt` the refs `(mu, nu, new kernel, new mu, new nu)`."""
  mu_ref, nu_ref, w_out, mu_out, nu_out = opt
  a = plan.adam
  assert a is not None
  lr, c1, c2 = hyper
  bk, bn = dw.shape
  mu = _load_rows(mu_ref, p, n0, bn, plan.rows, plan.d_out, jnp.float32)
  nu = _load_rows(nu_ref, p, n0, bn, plan.rows, plan.d_out, jnp.float32)
  mu = a.b1 * mu + (1.0 - a.b1) * dw
  nu = a.b2 * nu + (1.0 - a.b2) * (dw * dw)
  w = w.astype(jnp.float32)
  update = (mu / c1) / (jnp.sqrt(nu / c2) + a.eps) + a.weight_decay * w
  _store_rows(w_out, w + (-lr) * update, p, n0, plan.rows, plan.d_out)
  _store_rows(mu_out, mu, p, n0, plan.rows, plan.d_out)
  _store_rows(nu_out, nu, p, n0, plan.rows, plan.d_out)


def _split_refs(plan: _Plan, refs):
  """(optimizer inputs, outputs) from a backward kernel's trailing refs: inputs
  `[hyper, mu, nu]` with `plan.adam`, else none; the outputs follow."""
  refs = list(refs)
  opt_in = [refs.pop(0) for _ in range(3)] if plan.adam else []
  return opt_in, refs


def _bwd_fused_kernel(plan: _Plan, f_ref, w_ref, dy_ref, *refs):
  opt_in, outs = _split_refs(plan, refs)
  if plan.adam:
    ds_ref, w_out, mu_out, nu_out, *dx = outs
    hyper = _hyper(opt_in[0])  # once per program, not per tile
    opt = (*opt_in[1:], w_out, mu_out, nu_out)
    dw_ref = None
  else:
    ds_ref, dw_ref, *dx = outs
  dx_ref = dx[0] if plan.extra else None
  t = plan.tiles
  bm, bn, bk = t.bwd_m, t.bwd_n, t.bwd_k
  n_blocks, m_blocks, _ = plan.bwd_blocks
  col0 = pl.program_id(0) * bk  # of the kept features
  w_rows = _tile_rows(plan, col0, bk)

  def batch_block(m, accumulate: bool):
    m0 = m * bm
    rows = m0 + jnp.arange(bm)
    f = _load_2d(f_ref, m0, bm, col0, bk, plan.batch, plan.f_cols, plan.mm_dtype)

    def step(n, df):
      n0 = n * bn
      w32 = _load_rows(w_ref, w_rows, n0, bn, plan.rows, plan.d_out, plan.kernel_dtype)
      g = _load_2d(dy_ref, m0, bm, n0, bn, plan.batch, plan.d_out, plan.mm_dtype)
      dw = _dot(f, g, (0, 0), plan.precision)  # [k, n]
      df = df + _dot(g, w32.astype(plan.mm_dtype), (1, 1), plan.precision)  # with the old W
      if plan.adam:
        _adamw_tile(plan, hyper, opt, w32, dw, w_rows, n0)
        return df
      if accumulate:
        dw = dw + _load_rows(dw_ref, w_rows, n0, bn, plan.rows, plan.d_out, jnp.float32)
      _store_rows(dw_ref, dw, w_rows, n0, plan.rows, plan.d_out)
      return df

    df = lax.fori_loop(0, n_blocks, step, jnp.zeros((bm, bk), jnp.float32))
    _store_cotangent(plan, ds_ref, dx_ref, df, w_rows.p, w_rows.p, rows)

  batch_block(0, accumulate=False)
  if m_blocks > 1:
    assert not plan.adam  # _backward splits the kernel then
    # Later batch blocks add to the dW tile this program wrote (its own rows only).
    lax.fori_loop(1, m_blocks, lambda m, c: (batch_block(m, accumulate=True), c)[1], 0)


def _dw_kernel(plan: _Plan, f_ref, dy_ref, *refs):
  w_ref = refs[0] if plan.adam else None  # then dS: an ordering dependency only
  opt_in, outs = _split_refs(plan, refs[2:] if plan.adam else refs)
  t = plan.tiles
  bm, bn, bk = t.bwd_m, t.bwd_n, t.bwd_k
  _, m_blocks, _ = plan.bwd_blocks
  n0, col0 = pl.program_id(0) * bn, pl.program_id(1) * bk
  w_rows = _tile_rows(plan, col0, bk)

  def step(m, acc):
    if plan.f_transposed:  # f^T and dy^T tiles: the batch contiguous in both
      f = _load_2d(f_ref, col0, bk, m * bm, bm, plan.f_cols, plan.batch, plan.mm_dtype)
      g = _load_2d(dy_ref, n0, bn, m * bm, bm, plan.d_out, plan.batch, plan.mm_dtype)
      return acc + _dot(f, g, (1, 1), plan.precision)
    f = _load_2d(f_ref, m * bm, bm, col0, bk, plan.batch, plan.f_cols, plan.mm_dtype)
    g = _load_2d(dy_ref, m * bm, bm, n0, bn, plan.batch, plan.d_out, plan.mm_dtype)
    return acc + _dot(f, g, (0, 0), plan.precision)

  acc = lax.fori_loop(0, m_blocks, step, jnp.zeros((bk, bn), jnp.float32))
  if plan.adam:
    w = _load_rows(w_ref, w_rows, n0, bn, plan.rows, plan.d_out, jnp.float32)
    _adamw_tile(plan, _hyper(opt_in[0]), (*opt_in[1:], *outs), w, acc, w_rows, n0)
  else:
    _store_rows(outs[0], acc, w_rows, n0, plan.rows, plan.d_out)


def _ds_kernel(plan: _Plan, w_ref, dy_ref, *refs):
  ds_ref, dx_ref = (refs[0], refs[1]) if plan.extra else (refs[0], None)
  t = plan.tiles
  bm, bn, bk = t.bwd_m, t.bwd_n, t.bwd_k
  n_blocks, _, _ = plan.bwd_blocks
  m0, p0 = pl.program_id(0) * bm, pl.program_id(1) * bk
  p = p0 + jnp.arange(bk)

  def step(n, acc):
    w = _load_2d(w_ref, p0, bk, n * bn, bn, plan.rows, plan.d_out, plan.mm_dtype)
    g = _load_2d(dy_ref, m0, bm, n * bn, bn, plan.batch, plan.d_out, plan.mm_dtype)
    return acc + _dot(g, w, (1, 1), plan.precision)

  df = lax.fori_loop(0, n_blocks, step, jnp.zeros((bm, bk), jnp.float32))
  _store_cotangent(plan, ds_ref, dx_ref, df, p, p, m0 + jnp.arange(bm))


def _call(plan: _Plan, kernel, out_shape, grid, warps: int, name: str, aliases=None):
  return pl.pallas_call(
    kernel if isinstance(kernel, functools.partial) else functools.partial(kernel, plan),
    out_shape=out_shape,
    grid=grid,
    interpret=plan.interpret,
    name=name,
    input_output_aliases=aliases or {},
    compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=plan.tiles.stages),
  )


def _forward(
  plan: _Plan,
  s: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  extra: jax.Array | None,
  keep: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """(y, the `[batch, plan.f_cols]` features in `plan.f_dtype` with `keep`, else None;
  `[plan.f_cols, batch]` with `plan.f_transposed`)."""
  if plan.forward == "xla":
    f = triu_vector(s).astype(plan.f_dtype)
    if extra is not None:
      f = jnp.concatenate([f, extra.astype(plan.f_dtype)], axis=-1)
    y = split_matmul(f.astype(plan.mm_dtype), kernel.astype(plan.mm_dtype), plan.xla_precision)
    kept = (f.T if plan.f_transposed else f) if keep else None
    return y.astype(plan.kernel_dtype) + bias, kept
  nb, mb, groups, _ = plan.fwd_blocks
  args = [s.reshape(plan.batch, plan.dim * plan.dim), kernel] + ([extra] if plan.extra else [])
  out = [jax.ShapeDtypeStruct((groups, plan.batch, plan.d_out), jnp.float32)]
  if keep:
    out.append(jax.ShapeDtypeStruct((plan.batch, plan.f_cols), plan.f_dtype))
  kern = functools.partial(_fwd_kernel, plan, keep)
  parts, *f = _call(plan, kern, out, (nb, mb, groups), plan.tiles.fwd_warps, "triu_project_fwd")(
    *args
  )
  y = jnp.sum(parts, axis=0).astype(plan.kernel_dtype) + bias
  return y, (f[0] if keep else None)


def _backward(
  plan: _Plan,
  f: jax.Array,
  kernel: jax.Array,
  dy: jax.Array,
  opt: tuple[jax.Array, jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, Any, jax.Array | None]:
  """(dS, dW or (new kernel, new mu, new nu) with `opt = (hyper, mu, nu)`, dx) from
  the features `f` that `_forward` kept (`plan.chunked`'s layout, `plan.f_transposed`'s)."""
  d2 = plan.dim * plan.dim
  ds_shape = [jax.ShapeDtypeStruct((plan.batch, d2), plan.s_dtype)]
  dx_shape = (
    [jax.ShapeDtypeStruct((plan.batch, plan.extra), plan.extra_dtype)] if plan.extra else []
  )
  w_shape = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype)
  opt_in = [] if opt is None else list(opt)
  # The new kernel and moments overwrite the old ones (when the caller donates them).
  w_outs = (
    [w_shape]
    if opt is None
    else [w_shape] + [jax.ShapeDtypeStruct(m.shape, m.dtype) for m in opt[1:]]
  )
  _, m_blocks, tiles = plan.bwd_blocks
  warps = plan.tiles.bwd_warps
  if plan.split_backward:
    ds_grid = (m_blocks, _cdiv(plan.rows, plan.tiles.bwd_k))  # tiles of packed rows
    ds, *dx = _call(plan, _ds_kernel, ds_shape + dx_shape, ds_grid, warps, "triu_project_bwd_ds")(
      kernel, dy
    )
    dw_plan = dataclasses.replace(plan, tiles=plan.tiles.for_dw())
    dw_grid = (dw_plan.bwd_blocks[0], dw_plan.bwd_blocks[2])
    dw_warps = dw_plan.tiles.bwd_warps
    dy_dw = dy.T if plan.f_transposed else dy
    if opt is None:
      w_new = _call(dw_plan, _dw_kernel, w_shape, dw_grid, dw_warps, "triu_project_bwd_dw")(
        f, dy_dw
      )
    else:
      # Inputs f, dy (dy^T with f_transposed), kernel, dS, hyper, mu, nu: the kernel
      # is updated in place after the dS kernel (an input here) has read it.
      w_new = _call(
        dw_plan,
        _dw_kernel,
        w_outs,
        dw_grid,
        dw_warps,
        "triu_project_bwd_adamw",
        aliases={2: 0, 5: 1, 6: 2},
      )(f, dy_dw, kernel, ds, *opt_in)
  else:
    aliases = None if opt is None else {1: 1, 4: 2, 5: 3}
    ds, *rest = _call(
      plan,
      _bwd_fused_kernel,
      ds_shape + w_outs + dx_shape,
      (tiles,),
      warps,
      "triu_project_bwd" if opt is None else "triu_project_bwd_adamw",
      aliases=aliases,
    )(f, kernel, dy, *opt_in)
    n_w = len(w_outs)
    w_new, dx = (rest[0] if opt is None else rest[:n_w]), rest[n_w:]
  ds = ds.reshape(plan.batch, plan.dim, plan.dim)
  return ds, w_new, (dx[0] if plan.extra else None)


# The residuals are the features (F + extra_dim columns in S's dtype, or the forward
# kernel's chunk layout, 8% more), not S itself (dim^2 columns): about half the bytes,
# and the backward reads them contiguously.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _triu_project(plan: _Plan, s, kernel, bias, extra):
  return _forward(plan, s, kernel, bias, extra)[0]


def _triu_project_fwd(plan: _Plan, s, kernel, bias, extra):
  y, f = _forward(plan, s, kernel, bias, extra, keep=True)
  return y, (f, kernel)


def _triu_project_bwd(plan: _Plan, res, dy):
  f, kernel = res
  ds, dw, dx = _backward(plan, f, kernel, dy)
  db = jnp.sum(dy, axis=0).astype(plan.bias_dtype)
  return ds, dw, db, dx


_triu_project.defvjp(_triu_project_fwd, _triu_project_bwd)


def is_highest(precision: PrecisionLike) -> bool:
  """Whether `precision` (None: JAX's default) asks for full float32 products."""
  if precision is None:
    precision = jax.config.jax_default_matmul_precision  # type: ignore[attr-defined]
  if isinstance(precision, (tuple, list)):
    return any(is_highest(p) for p in precision)
  if isinstance(precision, str):
    return precision.lower() in ("highest", "float32")
  return precision == lax.Precision.HIGHEST


def _kernel_precision(precision: PrecisionLike, interpret: bool, operands: Any) -> Any:
  # Triton's IEEE float32 dot runs on the CUDA cores and was 5x (forward) to
  # 17x (backward) slower than XLA's HIGHEST on an H100; three TF32 products
  # (hi*hi + hi*lo + lo*hi) keep float32-level error on the tensor cores.
  if interpret or isinstance(precision, lax.DotAlgorithmPreset) or not is_highest(precision):
    return precision
  if jnp.dtype(operands).itemsize < 4:  # 16-bit operands: one exact product per pair
    return None
  return lax.DotAlgorithmPreset.TF32_TF32_F32_X3


def default_tiles(batch: int, moment_dtype: Any = None) -> Tiles:
  """The tiles measured best on an H100 (benchmarks/kernels.py --sweep,
  benchmarks/kernel_sweep.py) for this batch and, for the fused AdamW
  backward, this moment dtype (None: the plain backward)."""
  # Above 64 rows, 128-row forward blocks read W half as often (B=256: 1.37 ms, not 2.16).
  # (128-row backward tiles on 8 warps ran the plain backward alone 9-12% faster in
  # benchmarks/kernel_sweep.py, but not the whole head step, and the fused AdamW step
  # at B=128 0.4 ms slower: H100, docs/performance-history.md.)
  wide = batch > 64
  fwd = Tiles(fwd_m=128, fwd_warps=8) if wide else Tiles()
  if moment_dtype is None:
    # The plain backward always runs a dS and a dW kernel. In one kernel both came out
    # of one launch, so the 605 MB dW was allocated as early as dS and lived through a
    # backbone's whole backward (ViT-B/16 step, B=64: peak 9,114 MB against 8,569);
    # alone, XLA schedules the dW kernel late. Its tiles: 32-row batch steps over
    # 128x128 tiles of dW (forward+backward 1.17 and 1.73 ms, not 1.33 and 1.97, at
    # B=128 and 256; bf16 products, H100, docs/performance-history.md).
    return dataclasses.replace(fwd, bwd_split=True, dw_m=32, dw_n=128, dw_k=128, dw_warps=8)
  # The fused AdamW backward updates the kernel and moments in place: no dW buffer,
  # so up to 64 rows it stays one kernel (dS and the update from one read of W).
  # Above, its update kernel reads the forward's chunk layout; with bf16 moments
  # 64-column tiles (one chunk each) ran forward+fused in 2.08 and 2.71 ms, not
  # 2.19 and 3.05 with 32 (B=128, 256; kernel_sweep.py, H100, docs/performance-history.md).
  return fwd


def _check_float(name: str, x: jax.Array) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")


def _make_plan(
  s, kernel, bias, extra, precision, forward, interpret, tiles, adam=None, dtype=None
) -> _Plan:
  """Checks `triu_project`'s arguments and plans its kernels."""
  if s.ndim != 3 or s.shape[1] != s.shape[2]:
    raise ValueError(f"s: expected [batch, dim, dim] square matrices, got shape {s.shape}")
  batch, dim, _ = s.shape
  n_extra = 0
  if extra is not None:
    if extra.ndim != 2 or extra.shape[0] != batch:
      raise ValueError(f"extra: expected [batch={batch}, extra_dim], got shape {extra.shape}")
    _check_float("extra", extra)
    n_extra = extra.shape[1]
  rows = dim * (dim + 1) // 2 + n_extra
  if kernel.ndim != 2 or kernel.shape[0] != rows:
    raise ValueError(
      f"kernel: expected [{rows}, d_out] (dim={dim}: {rows - n_extra} triangle rows"
      f" + {n_extra} extra), got shape {kernel.shape}"
    )
  if bias.shape != (kernel.shape[1],):
    raise ValueError(f"bias: expected [d_out={kernel.shape[1]}], got shape {bias.shape}")
  for name, x in (("s", s), ("kernel", kernel), ("bias", bias)):
    _check_float(name, x)
  if dim >= 2048:
    raise ValueError(f"s: expected dim < 2048 (float32 row recovery), got {dim}")
  if forward not in ("xla", "kernel", None):
    raise ValueError(f"forward: expected 'xla', 'kernel' or None, got {forward!r}")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if tiles is None:
    tiles = default_tiles(batch, None if adam is None else adam.moment_dtype)
  tiles.check(compiled=not interpret)
  mm_dtype = jnp.dtype(kernel.dtype if dtype is None else dtype)
  if not jnp.issubdtype(mm_dtype, jnp.floating):
    raise ValueError(f"dtype: expected a floating dtype (or None), got {mm_dtype}")
  if forward is None:
    # 16-bit products: the forward kernel rounds W's tiles in registers, where XLA
    # wrote a rounded copy of W first (H100, B=64: 0.29 ms against 0.37 for XLA's
    # float32 product and 0.30 + 0.29 for its copy and product).
    forward = "kernel" if mm_dtype.itemsize == 2 else "xla"
  plan = _Plan(
    batch=batch,
    dim=dim,
    extra=n_extra,
    d_out=kernel.shape[1],
    mm_dtype=mm_dtype,
    kernel_dtype=jnp.dtype(kernel.dtype),
    s_dtype=jnp.dtype(s.dtype),
    extra_dtype=None if extra is None else jnp.dtype(extra.dtype),
    bias_dtype=jnp.dtype(bias.dtype),
    precision=_kernel_precision(precision, bool(interpret), mm_dtype),
    xla_precision=precision,
    forward=forward,
    interpret=bool(interpret),
    tiles=tiles,
    adam=adam,
  )
  return plan


def triu_project(
  s: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  *,
  extra: jax.Array | None = None,
  precision: PrecisionLike = None,
  forward: Literal["xla", "kernel"] | None = None,
  interpret: bool | None = None,
  tiles: Tiles | None = None,
  dtype: Any = None,
) -> jax.Array:
  """`triu_vector(s) @ kernel + bias`, the features' cotangent never built.

  Equal, up to summation order, to
  `split_matmul(concat(triu_vector(s), extra).astype(kernel.dtype), kernel,
  precision) + bias`, with a custom VJP whose gradients match the XLA
  path's: the cotangent of `s` is upper-triangular (zeros below the
  diagonal), as the transpose of the gather gives. Products accumulate in
  float32.

  Args:
    s: `[batch, dim, dim]`, float32 or bfloat16; only the upper triangle
      (row-major, diagonal included) is read.
    kernel: `[F + extra_dim, d_out]` with F = dim (dim + 1) / 2.
    bias: `[d_out]`.
    extra: optional `[batch, extra_dim]` features after the triangle (the
      third-order sketch).
    precision: matmul precision. Compiled on a GPU, DEFAULT and HIGH (and
      None) run TF32, as XLA does; HIGHEST runs three TF32 products
      (float32-level error, not bit-equal to XLA's); a
      `lax.DotAlgorithmPreset` is passed to Triton as given
      (`F32_F32_F32`: IEEE float32 on the CUDA cores, slow).
    forward: "kernel" runs the forward kernel; "xla" runs the forward as the
      XLA path does and only the backward in Pallas. Either way the
      residuals are the kernel and the `[batch, F + extra_dim]` features
      in the dtype of `s` (and `extra`), not `s` (in the forward kernel's
      chunk layout, 8% wider, when the backward runs as two kernels;
      transposed, `[F + extra_dim, batch]`, after the XLA forward with
      32-bit products and two backward kernels).
      None: "kernel" for 16-bit products, else "xla". On an H100 the
      forward kernel ran 1.5x (B=64) to 2.3x (B=256) slower than XLA's
      gather and product with float32 operands, and 1.3x
      (B=64) to 1.8x (B=256) faster with bfloat16 ones
      (docs/performance-history.md).
    interpret: run the Pallas interpreter; None means on every backend but GPU.
    tiles: block sizes; None: `default_tiles(batch)`, measured on an H100
      at d_out = 512.
    dtype: the products' operand dtype, as `nn.Dense`'s `dtype`; default the
      kernel's. bfloat16 with a float32 kernel rounds the features, the
      kernel and the output's cotangent to bf16 as they enter each product
      (in registers: no copy of the kernel) and accumulates in float32; the
      kernel's gradient stays float32.

  Returns:
    `[batch, d_out]` in the promoted dtype of `kernel` and `bias`.

  Example:
    >>> s = jnp.ones((2, 4, 4)); w = jnp.ones((10, 3)); b = jnp.zeros(3)
    >>> triu_project(s, w, b).shape
    (2, 3)
  """
  plan = _make_plan(s, kernel, bias, extra, precision, forward, interpret, tiles, dtype=dtype)
  return _triu_project(plan, s, kernel, bias, extra)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _triu_project_adamw(plan: _Plan, s, kernel, bias, extra, mu, nu, count):
  return _forward(plan, s, kernel, bias, extra)[0]


def _triu_project_adamw_fwd(plan: _Plan, s, kernel, bias, extra, mu, nu, count):
  y, f = _forward(plan, s, kernel, bias, extra, keep=True)
  return y, (f, kernel, mu, nu, count)


def _triu_project_adamw_bwd(plan: _Plan, res, dy):
  f, kernel, mu, nu, count = res
  assert plan.adam is not None
  ds, (w, mu, nu), dx = _backward(plan, f, kernel, dy, (plan.adam.hyper(count), mu, nu))
  db = jnp.sum(dy, axis=0).astype(plan.bias_dtype)
  return ds, w, db, dx, mu, nu, count + 1


_triu_project_adamw.defvjp(_triu_project_adamw_fwd, _triu_project_adamw_bwd)


def triu_project_adamw(
  s: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  mu: jax.Array,
  nu: jax.Array,
  count: jax.Array,
  adamw: FusedAdamW,
  *,
  extra: jax.Array | None = None,
  precision: PrecisionLike = None,
  interpret: bool | None = None,
  tiles: Tiles | None = None,
  dtype: Any = None,
) -> jax.Array:
  """`triu_project` whose backward also takes one AdamW step on `kernel`.

  The forward is `triu_project`'s. In reverse mode the "cotangents" of
  `kernel`, `mu`, `nu` and `count` are their NEW VALUES after one
  `FusedAdamW` step on the kernel's gradient (which is never written to
  memory); `s`, `bias` and `extra` get their true cotangents. This is Flax's
  overwrite-with-gradient convention (`flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT`,
  which `flax.training.train_state.TrainState.apply_gradients` honours):
  keep the four arrays in that collection and replace them by their
  "gradients". It therefore needs the whole gradient of one call: one call
  per step, on one device (no gradient all-reduce or accumulation between
  the backward and the update), and no gradient clipping of the kernel.

  Args:
    s, kernel, bias, extra, precision, interpret, tiles, dtype: as `triu_project`.
    mu, nu: `[F + extra_dim, d_out]` Adam moments, in `adamw.moment_dtype`.
    count: float32 scalar, updates applied so far (exact up to 2^24 steps).
    adamw: the optimizer's hyperparameters.

  Returns:
    `[batch, d_out]`, as `triu_project`.

  Example:
    >>> s = jnp.ones((2, 4, 4)); w = jnp.ones((10, 3)); b = jnp.zeros(3)
    >>> mu = nu = jnp.zeros_like(w); opt = FusedAdamW(learning_rate=0.1)
    >>> loss = lambda w: triu_project_adamw(s, w, b, mu, nu, jnp.zeros(()), opt).sum()
    >>> new_w = jax.grad(loss)(w)   # the kernel after one AdamW step
    >>> bool(jnp.all(new_w < w))
    True
  """
  if not isinstance(adamw, FusedAdamW):
    raise ValueError(f"adamw: expected a FusedAdamW, got {type(adamw).__name__}")
  adamw.check()
  for name, m in (("mu", mu), ("nu", nu)):
    if m.shape != kernel.shape or m.dtype != jnp.dtype(adamw.moment_dtype):
      raise ValueError(
        f"{name}: expected {kernel.shape} {jnp.dtype(adamw.moment_dtype)} (the kernel's shape, "
        f"adamw.moment_dtype), got {m.shape} {m.dtype}"
      )
  if jnp.shape(count) != () or jnp.asarray(count).dtype != jnp.float32:
    raise ValueError(
      f"count: expected a float32 scalar, got {jnp.shape(count)} {jnp.asarray(count).dtype}"
    )
  if kernel.dtype != jnp.float32:
    raise ValueError(f"kernel: the fused AdamW update keeps a float32 kernel, got {kernel.dtype}")
  plan = _make_plan(s, kernel, bias, extra, precision, None, interpret, tiles, adamw, dtype)
  return _triu_project_adamw(plan, s, kernel, bias, extra, mu, nu, count)


def hbm_bytes(
  batch: int,
  dim: int,
  d_out: int,
  s_itemsize: int,
  w_itemsize: int = 4,
  *,
  backward: bool = False,
  extra: int = 0,
) -> int:
  """Least memory traffic of the op: W read, the triangle of S read (+ dW, dS written).

  The backward adds a second read of W, the write of dW, a second read of the
  triangle (for dW) and the write of the dense `[batch, dim, dim]` cotangent.
  """
  rows = dim * (dim + 1) // 2 + extra
  fwd = rows * d_out * w_itemsize + batch * rows * s_itemsize
  if not backward:
    return fwd
  bwd = 2 * rows * d_out * w_itemsize + batch * rows * s_itemsize
  bwd += batch * (dim * dim + extra) * s_itemsize
  return fwd + bwd


def flops(batch: int, dim: int, d_out: int, *, backward: bool = False, extra: int = 0) -> int:
  """Matmul FLOPs: 2 B F d_out forward, three times that with the backward."""
  f = 2 * batch * (dim * (dim + 1) // 2 + extra) * d_out
  return 3 * f if backward else f
