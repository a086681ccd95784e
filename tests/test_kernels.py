"""The Pallas `triu_project` (interpreted on CPU) against the XLA path it replaces.

Reference: `split_matmul(concat(triu_vector(s), extra).astype(kernel.dtype),
kernel) + bias` and its autodiff gradients. Both paths cast S (and the extra
block) to float32 before any arithmetic and accumulate in float32, so they
differ only in summation order: over at most ~600 terms here, that moves
results by well under 1e-5 of their largest entry (float32's unit round-off
is 6e-8), the tolerance below. A bfloat16 cotangent of S is rounded from
those float32 values in both paths, so it may differ by one bfloat16 unit
in the last place, 2^-7 relative at worst: rtol 8e-3 there. The
interpreter fills outputs with NaN before the kernel runs, so every element
of dS (zeros below the diagonal included), dW and the extra block's
cotangent must have been written for the comparisons to pass.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moment_jax.kernels import Tiles, default_tiles, triu_project
from moment_jax.kernels.triu_project import (
  _kernel_precision,
  forward_chunk,
  forward_chunks,
  lower_offsets,
  upper_offsets,
)
from moment_jax.ops import split_matmul, triu_vector

RTOL_F32 = 1e-5
RTOL_BF16_ULP = 8e-3

# Small tiles so that tiny problems still cut into ragged tiles, several
# split-K groups, several output blocks and several batch blocks (m=2, batch 3).
# Batch 1 takes the fused backward, batch 3 the split one (dW and dS kernels);
# FUSED forces the fused backward over two batch blocks (its dW accumulation).
SMALL = Tiles(fwd_m=2, fwd_n=8, fwd_k=16, fwd_programs=8, bwd_m=2, bwd_n=8, bwd_k=16)
FUSED = dataclasses.replace(SMALL, bwd_split=False)
# The split backward's dW kernel on its own tiles: other batch steps, row tiles and
# output blocks than the dS kernel's (its grid follows them).
DW = dataclasses.replace(SMALL, dw_m=1, dw_n=16, dw_k=32, dw_warps=2)


def xla_path(s, kernel, bias, extra=None):
  f = triu_vector(s).astype(kernel.dtype)
  if extra is not None:
    f = jnp.concatenate([f, extra.astype(kernel.dtype)], axis=-1)
  return split_matmul(f, kernel) + bias


def make(dim, batch, d_out, n_extra, s_dtype, seed=0):
  rng = np.random.default_rng(seed)
  rows = dim * (dim + 1) // 2 + n_extra
  s = jnp.asarray(rng.normal(size=(batch, dim, dim)), s_dtype)
  kernel = jnp.asarray(rng.normal(size=(rows, d_out)) / np.sqrt(rows), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(d_out,)), jnp.float32)
  extra = jnp.asarray(rng.normal(size=(batch, n_extra)), s_dtype) if n_extra else None
  dy = jnp.asarray(rng.normal(size=(batch, d_out)), jnp.float32)
  return s, kernel, bias, extra, dy


def assert_close(x, ref, name):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  assert x.shape == ref.shape, name
  assert np.isfinite(x).all(), f"{name}: non-finite entries (an element left unwritten?)"
  scale = np.abs(ref).max()
  np.testing.assert_allclose(x, ref, rtol=0, atol=RTOL_F32 * scale, err_msg=name)


@pytest.mark.parametrize(
  "dim,batch,d_out,n_extra,s_dtype,tiles",
  [
    (5, 1, 8, 0, jnp.float32, SMALL),
    (16, 3, 17, 0, jnp.float32, SMALL),
    (33, 3, 17, 7, jnp.float32, SMALL),
    (16, 3, 8, 0, jnp.bfloat16, SMALL),
    (33, 1, 17, 5, jnp.bfloat16, SMALL),
    (33, 3, 8, 0, jnp.float32, None),  # the default tiles: one ragged tile per kernel
    (16, 3, 17, 4, jnp.float32, FUSED),
    (33, 3, 17, 7, jnp.float32, DW),
  ],
)
def test_matches_xla_path(dim, batch, d_out, n_extra, s_dtype, tiles, forward="kernel"):
  s, kernel, bias, extra, dy = make(dim, batch, d_out, n_extra, s_dtype)
  args = (s, kernel, bias) + ((extra,) if n_extra else ())

  def kern(s, kernel, bias, *extra):
    return triu_project(
      s,
      kernel,
      bias,
      extra=extra[0] if extra else None,
      forward=forward,
      interpret=True,
      tiles=tiles,
    )

  y, vjp = jax.vjp(kern, *args)
  y_ref, vjp_ref = jax.vjp(lambda *a: xla_path(*a), *args)
  assert y.dtype == y_ref.dtype
  assert_close(y, y_ref, "y")
  grads, grads_ref = vjp(dy), vjp_ref(dy)
  for name, g, r in zip(("ds", "dkernel", "dbias", "dextra"), grads, grads_ref):
    assert g.dtype == r.dtype, name
    if g.dtype == jnp.bfloat16:
      g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
      assert np.isfinite(g).all(), name
      np.testing.assert_allclose(
        g, r, rtol=RTOL_BF16_ULP, atol=RTOL_F32 * np.abs(r).max(), err_msg=name
      )
    else:
      assert_close(g, r, name)
  lower = np.tril_indices(dim, -1)
  assert not np.asarray(grads[0], np.float32)[:, lower[0], lower[1]].any()


def test_dw_kernel_runs_on_its_own_tiles():
  s, kernel, bias, extra, dy = make(33, 3, 17, 7, jnp.float32)
  f = lambda s, k, b, x: triu_project(s, k, b, extra=x, interpret=True, tiles=DW)
  jaxpr = jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[1](dy))(s, kernel, bias, extra)
  grids = {
    e.params["name"]: e.params["grid_mapping"].grid
    for e in jaxpr.jaxpr.eqns
    if e.primitive.name == "pallas_call"
  }
  rows = kernel.shape[0]
  # dS: batch blocks of bwd_m x row tiles of bwd_k; dW: output blocks of dw_n x row tiles of dw_k
  assert grids["triu_project_bwd_ds"] == (2, -(-rows // 16))
  assert grids["triu_project_bwd_dw"] == (2, -(-rows // 32))


def test_split_backward_leaves_dw_free_to_run_late():
  """The default plain backward is two kernels, and the dW one reads only the
  kept features and the output's cotangent: XLA may run it after a backbone's
  backward instead of holding dW through it (H100 ViT-B/16 step at B=64: peak
  9,114 MB with one kernel for dS and dW, 8,569 with two; docs/performance-history.md).
  (The interpreter's compiled memory on the CPU tells nothing here: it runs
  the kernels as loops over scatters, which it buffers differently.)"""
  s, kernel, bias, extra, dy = make(33, 3, 17, 7, jnp.float32)
  assert default_tiles(3).bwd_split is True
  f = lambda s, k, b, x: triu_project(s, k, b, extra=x, interpret=True)
  _, vjp = jax.vjp(f, s, kernel, bias, extra)
  jaxpr = jax.make_jaxpr(vjp)(dy).jaxpr
  calls = {e.params["name"]: e for e in jaxpr.eqns if e.primitive.name == "pallas_call"}
  assert set(calls) == {"triu_project_bwd_ds", "triu_project_bwd_dw"}, set(calls)
  ds, dw = calls["triu_project_bwd_ds"], calls["triu_project_bwd_dw"]
  # dS (and the extra block's cotangent) only; dW from the residual and dy only.
  assert [v.aval.shape for v in ds.outvars] == [(3, 33 * 33), (3, 7)]
  assert [v.aval.shape for v in dw.outvars] == [kernel.shape]
  assert not set(dw.invars) & set(ds.outvars)
  # float32 operands: the kept features and dy enter transposed (`_Plan.f_transposed`).
  assert [v.aval.shape for v in dw.invars] == [(kernel.shape[0], 3), dy.shape[::-1]]


def test_default_tiles():
  for batch in (1, 64, 65, 256):
    assert default_tiles(batch).bwd_split is True  # the plain backward: dS and dW kernels
  # the fused AdamW backward stays one kernel while the batch fits one block
  assert default_tiles(64, jnp.float32).bwd_split is None
  assert default_tiles(64, jnp.bfloat16) == Tiles()
  assert default_tiles(128, jnp.bfloat16) == default_tiles(128, jnp.float32)
  assert default_tiles(128, jnp.bfloat16).bwd_k == Tiles().fwd_k  # one forward chunk per tile
  assert default_tiles(128).fwd_m == default_tiles(128, jnp.float32).fwd_m == 128


def _bf16(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize(
  "forward,tiles,n_extra", [("xla", SMALL, 0), ("kernel", SMALL, 5), ("xla", FUSED, 3)]
)
def test_bf16_operands_against_float64(forward, tiles, n_extra):
  """`dtype=bfloat16`: the features, the kernel and dy enter every product
  rounded to bf16, products are exact and accumulate in float32. Against
  float64 NumPy on the rounded operands: dW (float32) within float32
  summation round-off, 1e-5 of its largest entry; y and dS, rounded to bf16
  once at the end, within one bf16 unit (2^-8 relative) of each entry plus
  that round-off."""
  dim, batch, d_out = 16, 3, 17
  s, kernel, bias, extra, dy = make(dim, batch, d_out, n_extra, jnp.bfloat16, seed=4)
  args = (s, kernel, bias) + ((extra,) if n_extra else ())

  def kern(s, kernel, bias, *extra):
    x = extra[0] if extra else None
    return triu_project(
      s, kernel, bias, extra=x, forward=forward, interpret=True, tiles=tiles, dtype=jnp.bfloat16
    )

  y, vjp = jax.vjp(kern, *args)
  ds, dk, db, *dx = vjp(dy)
  assert y.dtype == dk.dtype == jnp.float32 and ds.dtype == jnp.bfloat16
  iu = np.triu_indices(dim)
  f = np.asarray(s, np.float64)[:, iu[0], iu[1]]
  if n_extra:
    f = np.concatenate([f, np.asarray(extra, np.float64)], axis=1)
  w, g = _bf16(kernel), _bf16(dy)
  tol = lambda r: 2**-8 * np.abs(r) + 1e-5 * np.abs(r).max()
  p = f @ w  # rounded to bf16 before the float32 bias is added
  y_ref = p + np.asarray(bias, np.float64)
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - y_ref), tol(p) + 1e-6)
  np.testing.assert_allclose(np.asarray(dk), f.T @ g, rtol=0, atol=1e-5 * np.abs(f.T @ g).max())
  df = g @ w.T
  ds_ref = np.zeros((batch, dim, dim))
  ds_ref[:, iu[0], iu[1]] = df[:, : len(iu[0])]
  np.testing.assert_array_less(np.abs(np.asarray(ds, np.float64) - ds_ref), tol(ds_ref) + 1e-30)
  if n_extra:
    dx_ref = df[:, len(iu[0]) :]
    np.testing.assert_array_less(
      np.abs(np.asarray(dx[0], np.float64) - dx_ref), tol(dx_ref) + 1e-30
    )
  np.testing.assert_allclose(np.asarray(db), np.asarray(dy).sum(0), rtol=1e-6)


@pytest.mark.parametrize(
  "forward,dtype", [("xla", None), ("xla", jnp.bfloat16), ("kernel", jnp.bfloat16)]
)
def test_residuals_are_the_features_not_s(forward, dtype):
  """The backward keeps the features in S's dtype, not S (`dim^2` columns per
  sample): packed (`F + extra` columns) after the XLA forward, transposed
  (`[F + extra, batch]`) for float32 products, in the forward kernel's chunk
  layout (every chunk's `fwd_k` lanes) after the kernel."""
  dim, batch, n_extra = 16, 3, 5
  s, kernel, bias, extra, _ = make(dim, batch, 8, n_extra, jnp.bfloat16)
  fn = lambda s, k, b, x: triu_project(
    s, k, b, extra=x, forward=forward, interpret=True, tiles=SMALL, dtype=dtype
  )
  _, vjp = jax.vjp(fn, s, kernel, bias, extra)
  shapes = {(x.shape, x.dtype) for x in jax.tree.leaves(vjp)}
  rows = dim * (dim + 1) // 2 + n_extra
  if forward == "kernel":
    want = (batch, forward_chunks(dim, n_extra, SMALL.fwd_k) * SMALL.fwd_k)
  else:
    want = (batch, rows) if dtype else (rows, batch)
  assert (want, jnp.dtype(jnp.bfloat16)) in shapes
  assert not any(shape[1:] == (dim, dim) for shape, _ in shapes)
  # At ViT-B's size the chunk layout keeps 8.2% more columns than the packed one.
  assert forward_chunks(768, 0, 64) * 64 == 319_488 and 319_488 / 295_296 < 1.082


def test_forward_chunks_cover_the_triangle_once():
  """`forward_chunk` walks column blocks in order, rows 0 to (c + 1) k - 1 in
  each, and the unmasked lanes hold every packed row exactly once."""
  for dim, k in ((768, 64), (33, 16), (8, 16), (50, 8), (767, 64)):
    n = forward_chunks(dim, 0, k)
    i, c = (np.asarray(a) for a in forward_chunk(jnp.arange(n, dtype=jnp.int32), dim, k))
    want = [(r, b) for b in range(-(-dim // k)) for r in range((b + 1) * k)]
    assert list(zip(i.tolist(), c.tolist())) == want, (dim, k)
    j = c[:, None] * k + np.arange(k)
    ok = (j >= i[:, None]) & (j < dim) & (i[:, None] < dim)
    offsets = np.sort((i[:, None] * dim + j)[ok])
    iu = np.triu_indices(dim)
    np.testing.assert_array_equal(offsets, iu[0] * dim + iu[1])


def test_xla_forward_kernel_backward():
  test_matches_xla_path(16, 3, 17, 4, jnp.bfloat16, SMALL, forward="xla")


def test_jit_vmap_grad():
  s, kernel, bias, _, _ = make(9, 3, 8, 0, jnp.float32, seed=1)
  s = jnp.stack([s, -2.0 * s])  # [2, batch, dim, dim]

  def loss(fn):
    return lambda s, kernel: jnp.sum(jnp.square(fn(s, kernel, bias)))

  kern = lambda s, k, b: triu_project(s, k, b, forward="kernel", interpret=True, tiles=SMALL)
  y = jax.jit(jax.vmap(kern, in_axes=(0, None, None)))(s, kernel, bias)
  y_ref = jax.vmap(xla_path, in_axes=(0, None, None))(s, kernel, bias)
  assert_close(y, y_ref, "y")
  grad = jax.vmap(jax.grad(loss(kern), argnums=(0, 1)), in_axes=(0, None))
  grad_ref = jax.vmap(jax.grad(loss(xla_path), argnums=(0, 1)), in_axes=(0, None))
  for name, g, r in zip(("ds", "dkernel"), jax.jit(grad)(s, kernel), grad_ref(s, kernel)):
    assert_close(g, r, name)


@pytest.mark.parametrize("dim", [1, 2, 7, 33, 768, 2047])
def test_offsets_cover_the_matrix_once(dim):
  tri, low = dim * (dim + 1) // 2, dim * (dim - 1) // 2
  pad = 5
  upper = np.asarray(upper_offsets(jnp.arange(tri + pad, dtype=jnp.int32), dim))
  lower = np.asarray(lower_offsets(jnp.arange(low + pad, dtype=jnp.int32), dim))
  rows, cols = np.triu_indices(dim)
  np.testing.assert_array_equal(upper[:tri], rows * dim + cols)
  rows, cols = np.tril_indices(dim, -1)
  np.testing.assert_array_equal(lower[:low], rows * dim + cols)
  # Past the end: out of bounds (masked on the GPU, dropped when interpreted).
  assert (upper[tri:] == dim * dim).all() and (lower[low:] == dim * dim).all()


def test_highest_runs_three_tf32_products_when_compiled():
  x3 = jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  f32, bf16 = jnp.float32, jnp.bfloat16
  assert _kernel_precision("highest", False, f32) == x3
  assert _kernel_precision(jax.lax.Precision.HIGHEST, False, f32) == x3
  assert _kernel_precision(jax.lax.Precision.DEFAULT, False, f32) == jax.lax.Precision.DEFAULT
  assert _kernel_precision("highest", True, f32) == "highest"  # the CPU dot is exact f32
  assert _kernel_precision("highest", False, bf16) is None  # bf16 operands: exact products
  ieee = jax.lax.DotAlgorithmPreset.F32_F32_F32
  assert _kernel_precision(ieee, False, f32) == ieee


@pytest.mark.parametrize(
  "what,kwargs,match",
  [
    ("s", dict(s=np.zeros((2, 4, 5))), "s: expected"),
    ("kernel", dict(kernel=np.zeros((9, 3))), "kernel: expected"),
    ("bias", dict(bias=np.zeros(4)), "bias: expected"),
    ("extra", dict(extra=np.zeros((3, 2))), "extra: expected"),
    ("int s", dict(s=np.zeros((2, 4, 4), np.int32)), "s: expected a floating"),
    ("tiles", dict(tiles=Tiles(fwd_k=24)), "tiles.fwd_k: expected a power of two"),
    ("dw tiles", dict(tiles=Tiles(dw_n=48)), "tiles.dw_n: expected a power of two"),
    ("compiled", dict(tiles=SMALL, interpret=False), "tiles.fwd_m: expected at least 16"),
    ("forward", dict(forward="pallas"), "forward: expected 'xla', 'kernel' or None"),
  ],
)
def test_bad_input_raises(what, kwargs, match):
  args = dict(
    s=np.zeros((2, 4, 4), np.float32),
    kernel=np.zeros((10, 3), np.float32),
    bias=np.zeros(3, np.float32),
  )
  args.update({k: kwargs.pop(k) for k in ("s", "kernel", "bias") if k in kwargs})
  args = {k: jnp.asarray(v) for k, v in args.items()}
  if "extra" in kwargs:
    kwargs["extra"] = jnp.asarray(kwargs["extra"], jnp.float32)
  with pytest.raises(ValueError, match=match):
    triu_project(args["s"], args["kernel"], args["bias"], **kwargs)


@pytest.mark.slow  # a subprocess, ~7 s on two cores
def test_benchmark_script_runs_and_checks(tmp_path):
  """benchmarks/kernels.py at a toy size on CPU: it runs, and its full-size check passes."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / "kernels.json"
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [
      sys.executable,
      "benchmarks/kernels.py",
      "--dim",
      "12",
      "--d-out",
      "16",
      "--batches",
      "3",
      "--cases",
      "bfloat16",
      "--reps",
      "1",
      "--inner",
      "1",
      "--json",
      str(out),
    ],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  [row] = json.loads(out.read_text())["rows"]
  assert row["err"]["dS_lower_max_abs"] == 0.0
  assert max(row["err"][k] for k in ("y", "dS", "dW", "db")) < RTOL_F32
  assert all(row[k] > 0 for k in ("xla_step_ms", "kernel_step_ms", "hybrid_step_ms"))
