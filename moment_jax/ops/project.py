"""The head's projection `x @ W` for very long contractions (F ~ 3e5), and its layout.

The projection's arrays carry logical axis names (`BATCH`, `PROJ_BATCH`,
`PROJ_IN`, `PROJ_OUT`): inside `flax.linen.logical_axis_rules(rules)` and
`jax.set_mesh(mesh)` (`moment_jax.sharding.use_layout`) they become sharding
constraints, which pin where the features meet the kernel; outside both they
are no-ops. `moment_jax.sharding.head_rules` holds the tables.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import PrecisionLike
from jax.sharding import PartitionSpec as P

from moment_jax.ops.chunk import map_samples

__all__ = [
  "BATCH",
  "KERNEL_AXES",
  "PROJ_BATCH",
  "PROJ_IN",
  "PROJ_OUT",
  "contraction_pieces",
  "mesh_spec",
  "per_device",
  "project",
  "project_chunked",
  "split_matmul",
]

# Below this many contraction terms the plain product is used.
_MIN_SPLIT = 1 << 14
_MAX_PIECES = 128

# Logical axis names of the projection's arrays.
BATCH = "batch"  # the batch, split as the rest of the model splits it
PROJ_BATCH = "proj_batch"  # the batch of the features where they meet the kernel
PROJ_IN = "proj_in"  # F: the kernel's rows, the contraction
PROJ_OUT = "proj_out"  # d_out: the kernel's columns
KERNEL_AXES: tuple[str, str] = (PROJ_IN, PROJ_OUT)


def contraction_pieces(k: int) -> int:
  """How many batched pieces `split_matmul` cuts a contraction of length `k` into."""
  return 1 if k < _MIN_SPLIT else math.gcd(k, _MAX_PIECES)


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
  parts = jax.lax.dot_general(
    xs, ws, (((2,), (1,)), ((1,), (0,))), precision=precision, preferred_element_type=acc
  )  # [c, batch, d_out]
  return jnp.sum(parts, axis=0).astype(dtype).reshape(*lead, n)


# Remat with nothing saved: the backward keeps `x` and `w` themselves (not
# their reshapes, which JAX would count as new residuals) and redoes only the
# free reshapes; the product is not needed by the backward and is not redone.
_split_matmul_remat = jax.checkpoint(
  _split_matmul, static_argnums=(2,), policy=jax.checkpoint_policies.nothing_saveable
)


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


def _product(x: jax.Array, kernel: jax.Array, precision: PrecisionLike) -> jax.Array:
  return split_matmul(x.astype(kernel.dtype), kernel, precision)


# Logical axes of the features where the pipeline makes them and where they
# meet the kernel. Pinning the first keeps XLA from moving the split over F
# back into the pipeline (it all-gathered the original preset's
# [batch, tokens, 4096] count sketches to do so).
_MADE = (BATCH, None)
_MET = (PROJ_BATCH, PROJ_IN)


def _is_half(x: jax.Array) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2


def _move(x: jax.Array, src: tuple[Any, ...], dst: tuple[Any, ...]) -> jax.Array:
  """`x` constrained to logical axes `src`, then `dst`; 16-bit floats move as raw bits."""
  if not nn.get_logical_axis_rules():
    return x
  if _is_half(x):
    return _move_bits(x, src, dst)
  return nn.with_logical_constraint(nn.with_logical_constraint(x, src), dst)


def _as_bits(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  return jax.lax.bitcast_convert_type(fn(jax.lax.bitcast_convert_type(x, jnp.uint16)), x.dtype)


# 16-bit features move as uint16: XLA would otherwise hoist their cast to the
# kernel's float32 above the all-to-all and send twice the bytes. Integers
# have no gradient, hence the rules: the cotangent moves back the same way.
def _constrain_bits(x: jax.Array, src: tuple[Any, ...], dst: tuple[Any, ...]) -> jax.Array:
  return _as_bits(lambda b: nn.with_logical_constraint(nn.with_logical_constraint(b, src), dst), x)


_move_bits = jax.custom_vjp(_constrain_bits, nondiff_argnums=(1, 2))
_move_bits.defvjp(
  lambda x, src, dst: (_constrain_bits(x, src, dst), None),
  lambda src, dst, _, g: (_constrain_bits(g, dst, src),),
)


def _all_to_all(x: jax.Array, axis: str, split: int, concat: int) -> jax.Array:
  """`lax.all_to_all(tiled=True)`; 16-bit floats move as raw bits (as in `_move`)."""
  if _is_half(x):
    return _all_to_all_bits(x, axis, split, concat)
  return jax.lax.all_to_all(x, axis, split, concat, tiled=True)


def _exchange_bits(x: jax.Array, axis: str, split: int, concat: int) -> jax.Array:
  return _as_bits(lambda b: jax.lax.all_to_all(b, axis, split, concat, tiled=True), x)


_all_to_all_bits = jax.custom_vjp(_exchange_bits, nondiff_argnums=(1, 2, 3))
_all_to_all_bits.defvjp(
  lambda x, axis, split, concat: (_exchange_bits(x, axis, split, concat), None),
  lambda axis, split, concat, _, g: (_exchange_bits(g, axis, concat, split),),
)


def project(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  precision: PrecisionLike = None,
) -> jax.Array:
  """The head's projection `x @ kernel + bias` (`split_matmul`), laid out by logical names.

  Under a layout's rules (`moment_jax.sharding.use_layout`) the features are
  constrained twice, `(BATCH, None)` where the pipeline made them and
  `(PROJ_BATCH, PROJ_IN)` where they meet the kernel `(PROJ_IN, PROJ_OUT)`,
  and the output to `(BATCH, PROJ_OUT)`. For the "rows" layout that is an
  all-to-all of the features and a reduce-scatter of the `[batch, d_out]`
  partial products; the kernel's gradient stays where its rows are.

  Args:
    x: `[batch, F]` features; they travel in their own dtype and are cast to
      the kernel's after (cheap, where casting the `[F, d_out]` kernel would
      copy it).
    kernel: `[F, d_out]`.
    bias: `[d_out]`.
    precision: matmul precision.

  Returns:
    `[batch, d_out]` in the kernel's dtype.

  Example:
    >>> y = project(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.zeros(4))
    >>> y.shape, float(y[0, 0])
    ((2, 4), 3.0)
  """
  x = _move(x, _MADE, _MET)
  kernel = nn.with_logical_constraint(kernel, KERNEL_AXES)
  y = nn.with_logical_constraint(_product(x, kernel, precision), (BATCH, PROJ_OUT))
  return y + bias


def project_chunked(
  feature_fn: Callable[..., jax.Array],
  kernel: jax.Array,
  bias: jax.Array,
  tokens: jax.Array,
  graph: jax.Array | None = None,
  mask: jax.Array | None = None,
  *,
  chunk: int,
  remat: Callable[..., Any] | None = None,
  precision: PrecisionLike = None,
) -> jax.Array:
  """`project(feature_fn(tokens, graph, mask), kernel, bias)`, `chunk` samples at a time.

  The features and the product run together over `chunk` samples
  (`map_samples`), under `jax.checkpoint(policy=remat)` when `remat` is
  given, so neither the `[batch, F]` features nor their cotangent exist for
  the whole batch. Each chunk reads the kernel once: fewer, larger chunks
  trade memory for speed.

  Under a layout's rules on a mesh of more than one device, the loop runs
  per device (`shard_map`) over that device's samples, `chunk` at a time:
  a loop over a split batch would otherwise gather it, and a kernel
  gradient summed over devices inside the loop is reduced once per chunk.
  The "rows" layout exchanges each chunk's features (`all_to_all`) and its
  partial products (`psum_scatter`), as `project` does for the whole batch;
  with `remat`, the backward pass redoes the exchange with the features.

  Args:
    feature_fn: `(tokens, graph, mask) -> [b, F]` for a batch of `b` samples.
    kernel, bias, precision: as `project`.
    tokens: `[batch, tokens, dim]`; graph `[tokens, tokens]` (shared, not
      sliced) or `[batch, tokens, tokens]`; mask `[batch, tokens]`.
    chunk: samples per step (per device under a layout), a static int >= 1.
    remat: checkpoint policy around each chunk's features and product.

  Returns:
    `[batch, d_out]` in the kernel's dtype.
  """
  mesh = _layout_mesh()
  if mesh is None:
    return _chunks(feature_fn, kernel, bias, tokens, graph, mask, chunk, remat, precision, None)
  return _chunks_per_device(
    mesh, feature_fn, kernel, bias, tokens, graph, mask, chunk, remat, precision
  )


def _chunks(
  feature_fn: Callable[..., jax.Array],
  kernel: jax.Array,
  bias: jax.Array,
  tokens: jax.Array,
  graph: jax.Array | None,
  mask: jax.Array | None,
  chunk: int,
  remat: Callable[..., Any] | None,
  precision: PrecisionLike,
  rows: str | None,
) -> jax.Array:
  """The chunk loop; `rows`: the mesh axis that splits F inside `shard_map`, or None."""

  def fused(t, g, m):
    x = feature_fn(t, g, m)
    if rows is not None:  # [b, F] -> [b n, F / n]: every device's samples, this device's rows
      x = _all_to_all(x, rows, 1, 0)
    y = _product(x, kernel, precision)
    if rows is not None:  # sum the n partial products, keep this device's b samples
      y = jax.lax.psum_scatter(y, rows, scatter_dimension=0, tiled=True)
    return y + bias

  if remat is not None:
    fused = jax.checkpoint(fused, policy=remat)
  return map_samples(fused, chunk, tokens, graph, mask)


def mesh_spec(names: tuple[str | None, ...], rules: Any = None) -> P:
  """The `PartitionSpec` of logical axes `names` under `rules` (default: the context's)."""
  spec = nn.logical_to_mesh_axes(names, rules)
  assert spec is not None  # None only for names None
  return spec


def _layout_mesh() -> Any:
  """The context's mesh when a layout's rules are active on more than one device, else None."""
  if not nn.get_logical_axis_rules():
    return None
  mesh = jax.sharding.get_abstract_mesh()
  # Inside a shard_map (manual axes) the work is already per device.
  return None if mesh.empty or mesh.size == 1 or mesh.manual_axes else mesh


def _mesh_axes(spec: P) -> set[str]:
  axes: set[str] = set()
  for entry in spec:
    axes.update(entry if isinstance(entry, tuple) else () if entry is None else (entry,))
  return axes


def _chunks_per_device(
  mesh: Any,
  feature_fn: Callable[..., jax.Array],
  kernel: jax.Array,
  bias: jax.Array,
  tokens: jax.Array,
  graph: jax.Array | None,
  mask: jax.Array | None,
  chunk: int,
  remat: Callable[..., Any] | None,
  precision: PrecisionLike,
) -> jax.Array:
  batch = mesh_spec((BATCH,))[0]
  k_spec = mesh_spec(KERNEL_AXES)
  rows = k_spec[0]
  if rows is not None and rows != batch:
    raise ValueError(
      f"rules: the kernel's rows ({PROJ_IN!r}) are split over {rows!r}, expected the "
      f"batch's axis {batch!r} or none (the chunks exchange features over it)"
    )
  args, specs = _sample_args(batch, tokens, graph, mask)
  args.update(kernel=kernel, bias=bias)
  specs.update(kernel=k_spec, bias=P(k_spec[1]))

  out_spec = P(batch, k_spec[1])
  varying = tuple(a for a in mesh.axis_names if a in _mesh_axes(out_spec))

  def local(a):
    # Every input varies over the output's axes from here on, so the cotangent
    # of one replicated over such an axis is summed over it once, after the
    # loop, not once per chunk inside it.
    a = {k: _varying(v, varying, specs[k]) for k, v in a.items()}
    return _chunks(
      feature_fn,
      a["kernel"],
      a["bias"],
      a["tokens"],
      a.get("graph"),
      a.get("mask"),
      chunk,
      remat,
      precision,
      rows,
    )

  return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=out_spec)(args)


def per_device(feature_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`feature_fn(tokens, graph, mask)`, run per device over its own samples
  (`shard_map` over the layout's batch axis) when a layout's rules are active
  on more than one device; otherwise `feature_fn` itself.

  For per-sample pipelines that XLA's SPMD partitioner does not split by
  batch: it all-gathers the batch of every FFT (the third-order sketch's),
  which costs the original preset 13 GB per device and step at 64 samples
  per device on 8 devices.
  """

  @functools.wraps(feature_fn)
  def run(
    tokens: jax.Array, graph: jax.Array | None = None, mask: jax.Array | None = None
  ) -> jax.Array:
    mesh = _layout_mesh()
    if mesh is None:
      return feature_fn(tokens, graph, mask)
    batch = mesh_spec((BATCH,))[0]
    args, specs = _sample_args(batch, tokens, graph, mask)
    local = lambda a: feature_fn(a["tokens"], a.get("graph"), a.get("mask"))
    return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=P(batch))(args)

  return run


def _sample_args(
  batch: Any, tokens: jax.Array, graph: jax.Array | None, mask: jax.Array | None
) -> tuple[dict[str, jax.Array], dict[str, P]]:
  """Per-sample inputs and their specs: split over `batch`, a shared graph whole."""
  args, specs = {"tokens": tokens}, {"tokens": P(batch)}
  if graph is not None:
    args["graph"], specs["graph"] = graph, P() if graph.ndim == 2 else P(batch)
  if mask is not None:
    args["mask"], specs["mask"] = mask, P(batch)
  return args, specs


def _varying(x: jax.Array, axis_names: tuple[str, ...], spec: P) -> jax.Array:
  missing = tuple(a for a in axis_names if a not in _mesh_axes(spec))
  return jax.lax.pcast(x, missing, to="varying") if missing else x
