"""The head's projection `x @ W` for very long contractions (F ~ 3e5), and its layout.

The projection's arrays carry logical axis names (`BATCH`, `PROJ_BATCH`,
`PROJ_IN`, `PROJ_OUT`): inside `flax.linen.logical_axis_rules(rules)` and
`jax.set_mesh(mesh)` (`moment_jax.sharding.use_layout`) they become sharding
constraints, which pin where the features meet the kernel; outside both they
are no-ops. `moment_jax.sharding.head_rules` holds the tables.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import PrecisionLike
from jax.sharding import PartitionSpec as P

from moment_jax.ops.chunk import map_samples

# Below this many contraction terms the plain product is used.
MIN_SPLIT = 1 << 14
MAX_PIECES = 128

# Logical axis names of the projection's arrays.
BATCH = "batch"            # the batch, split as the rest of the model splits it
PROJ_BATCH = "proj_batch"  # the batch of the features where they meet the kernel
PROJ_IN = "proj_in"        # F: the kernel's rows, the contraction
PROJ_OUT = "proj_out"      # d_out: the kernel's columns
KERNEL_AXES: tuple[str, str] = (PROJ_IN, PROJ_OUT)


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


def _product(x: jax.Array, kernel: jax.Array, precision: PrecisionLike) -> jax.Array:
  return split_matmul(x.astype(kernel.dtype), kernel, precision)


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
  # Pinning the features where they are made keeps XLA from moving the
  # split over F back into the pipeline (it all-gathered the original
  # preset's [batch, tokens, 4096] count sketches to do so).
  x = nn.with_logical_constraint(x, (BATCH, None))
  x = nn.with_logical_constraint(x, (PROJ_BATCH, PROJ_IN))
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
  return _chunks_per_device(mesh, feature_fn, kernel, bias, tokens, graph, mask, chunk, remat,
                            precision)


def _chunks(feature_fn, kernel, bias, tokens, graph, mask, chunk, remat, precision, rows):
  """The chunk loop; `rows`: the mesh axis that splits F inside `shard_map`, or None."""
  def fused(t, g, m):
    x = feature_fn(t, g, m)
    if rows is not None:  # [b, F] -> [b n, F / n]: every device's samples, this device's rows
      x = jax.lax.all_to_all(x, rows, 1, 0, tiled=True)
    y = _product(x, kernel, precision)
    if rows is not None:  # sum the n partial products, keep this device's b samples
      y = jax.lax.psum_scatter(y, rows, scatter_dimension=0, tiled=True)
    return y + bias

  if remat is not None:
    fused = jax.checkpoint(fused, policy=remat)
  return map_samples(fused, chunk, tokens, graph, mask)


def _layout_mesh() -> Any:
  """The context's mesh when a layout's rules are active on more than one device, else None."""
  if not nn.get_logical_axis_rules():
    return None
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty or mesh.size == 1 else mesh


def _mesh_axes(spec: P) -> set[str]:
  axes: set[str] = set()
  for entry in spec:
    axes.update(entry if isinstance(entry, tuple) else () if entry is None else (entry,))
  return axes


def _chunks_per_device(mesh, feature_fn, kernel, bias, tokens, graph, mask, chunk, remat,
                       precision):
  batch = nn.logical_to_mesh_axes((BATCH,))[0]
  k_spec = nn.logical_to_mesh_axes(KERNEL_AXES)
  rows = k_spec[0]
  if rows is not None and rows != batch:
    raise ValueError(
        f"rules: the kernel's rows ({PROJ_IN!r}) are split over {rows!r}, expected the "
        f"batch's axis {batch!r} or none (the chunks exchange features over it)")
  args = {"tokens": tokens, "kernel": kernel, "bias": bias}
  specs = {"tokens": P(batch), "kernel": k_spec, "bias": P(k_spec[1])}
  if graph is not None:
    args["graph"], specs["graph"] = graph, P() if graph.ndim == 2 else P(batch)
  if mask is not None:
    args["mask"], specs["mask"] = mask, P(batch)

  def local(a):
    # Every input varies over every axis from here on, so the cotangent of one
    # that is replicated over an axis is summed over it once, after the loop,
    # not once per chunk inside it.
    a = {k: _varying(v, mesh.axis_names, specs[k]) for k, v in a.items()}
    return _chunks(feature_fn, a["kernel"], a["bias"], a["tokens"], a.get("graph"),
                   a.get("mask"), chunk, remat, precision, rows)

  return jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=P(batch, k_spec[1]))(args)


def _varying(x: jax.Array, axis_names: tuple[str, ...], spec: P) -> jax.Array:
  missing = tuple(a for a in axis_names if a not in _mesh_axes(spec))
  return jax.lax.pcast(x, missing, to="varying") if missing else x
