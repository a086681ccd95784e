"""Tile sweep of the Pallas projection backward, and of the XLA forward's split-K.

  PYTHONPATH=. python benchmarks/kernel_sweep.py --json out/kernel_sweep.json

For the bfloat16 policy's operands (bf16 S, float32 W, DEFAULT precision),
D=768, d_out=512 and each batch in --batches, it times the forward and
backward of `triu_project` (the VJP applied to a fixed cotangent; the
backward reads the packed features the forward keeps) for each tile setting
in `BWD` and each product operand dtype in --operands
(`triu_project(dtype=...)`), the same with the fused AdamW backward
(`triu_project_adamw`, kernel and moments donated and fed back, for float32
and bfloat16 moments) for the tiles in `FUSED`, then the forwards alone (so
that a backward is the difference of two rows of one call): the XLA forward
`triu_vector(S) @ W` split into c contraction pieces for c in `PIECES`
(`ops.split_matmul` uses 128). Medians of --reps timings of --inner
back-to-back calls (benchmarks/kernels.py's method), beside the copy
ceiling's floor for the bytes each must move. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from moment_jax.kernels import FusedAdamW, default_tiles, triu_project, triu_project_adamw
from moment_jax.ops import triu_vector

sys.path.insert(0, os.path.dirname(__file__))
from kernels import D_OUT, D, ceilings, fwd_bwd, inputs, timeit  # noqa: E402

BWD = (  # changes to default_tiles(batch)
  {},
  dict(bwd_n=128),
  dict(bwd_n=256),
  dict(bwd_n=128, bwd_warps=8),
  dict(bwd_n=256, bwd_warps=8),
  dict(bwd_k=32),
  dict(bwd_k=32, bwd_n=128),
  dict(bwd_k=32, bwd_n=256, bwd_warps=8),
  dict(bwd_k=128, bwd_warps=8),
  dict(bwd_warps=8),
  dict(stages=2),
  dict(stages=4),
  dict(bwd_n=128, stages=2),
  dict(bwd_m=128, bwd_split=False, bwd_warps=8),
  dict(bwd_m=128, bwd_n=128, bwd_split=False, bwd_warps=8),
  dict(bwd_split=False),  # one kernel for dS and dW (the default before the split)
  dict(dw_m=None, dw_n=None, dw_k=None, dw_warps=None),  # the dW kernel on the dS kernel's tiles
)
FUSED = (  # changes to default_tiles(batch, moment dtype), for the fused AdamW backward
  {},
  dict(bwd_m=128, bwd_split=False, bwd_warps=8),
  dict(bwd_k=32),
  dict(bwd_k=64),
  dict(bwd_k=128, bwd_warps=8),
)
PIECES = (16, 32, 64, 128)


def time_fused(b, s, w, bias, dy, moment_dtype, operands, tiles, reps, inner) -> float:
  """Median seconds of the forward and fused AdamW backward, the state donated and fed back."""
  opt = FusedAdamW(learning_rate=1e-4, moment_dtype=moment_dtype)

  def update(w, mu, nu, count, s, dy):
    f = lambda w, mu, nu, c: triu_project_adamw(
      s, w, bias, mu, nu, c, opt, dtype=operands, tiles=tiles
    )
    return fwd_bwd(f, dy, w, mu, nu, count)

  run = jax.jit(update, donate_argnums=(0, 1, 2))
  state = (w + 0.0, jnp.zeros_like(w, moment_dtype), jnp.zeros_like(w, moment_dtype), jnp.zeros(()))
  y, state = jax.block_until_ready(run(*state, s, dy))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(inner):
      y, state = run(*state, s, dy)
    jax.block_until_ready((y, state))
    times.append((time.perf_counter() - t) / inner)
  return statistics.median(times)


def split_product(x, w, c):
  k, n = w.shape
  parts = jax.lax.dot_general(
    x.reshape(-1, c, k // c),
    w.reshape(c, k // c, n),
    (((2,), (1,)), ((1,), (0,))),
    preferred_element_type=jnp.float32,
  )
  return jnp.sum(parts, axis=0)


def record(rows: list, label: str, **row) -> None:
  """Appends `row` (with `ms` and, where there is one, `floor_ms`) and prints it."""
  rows.append(row)
  floor = f"  floor {row['floor_ms']:.3f}" if "floor_ms" in row else ""
  print(f"B={row['batch']:4d} {label:64s} {row['ms']:.3f} ms{floor}", flush=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument(
    "--batches", type=int, nargs="+", default=[64, 128, 256], help="default: 64 128 256"
  )
  ap.add_argument("--reps", type=int, default=5, help="timings per setting (default: 5)")
  ap.add_argument("--inner", type=int, default=5, help="calls per timing (default: 5)")
  ap.add_argument(
    "--operands",
    nargs="+",
    default=["float32", "bfloat16"],
    help="product operand dtypes (triu_project's dtype; default: float32 bfloat16)",
  )
  ap.add_argument("--no-sweep", action="store_true", help="only the default tiles of `BWD`")
  ap.add_argument("--json", default=None, help="write the rows here")
  a = ap.parse_args(argv)
  ceil = ceilings(a.reps, a.inner)
  bw = ceil["copy_GBps"] * 1e9
  rows = []
  print(f"{jax.devices()[0].device_kind}: copy {ceil['copy_GBps']:.0f} GB/s")
  for b in a.batches:
    s, w, bias = inputs(b, D, D_OUT, jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(3), (b, D_OUT), jnp.float32)
    rows_w = w.shape[0]
    # The forward reads W and the triangle of S and writes the kept features (their packed
    # size: the least traffic; the chunk layout of the split backward writes 8% more); the
    # backward reads them and W, writes dW (or W and both moments) and the dense dS.
    fwd_keep = rows_w * D_OUT * 4 + 2 * b * rows_w * 2
    bwd_bytes = fwd_keep + 2 * rows_w * D_OUT * 4 + b * rows_w * 2 + b * D * D * 2
    fused_bytes = {
      md: fwd_keep
      + 2 * rows_w * D_OUT * (4 + 2 * jnp.dtype(md).itemsize)
      + b * rows_w * 2
      + b * D * D * 2
      for md in ("float32", "bfloat16")
    }
    for op in a.operands:
      for change in BWD[:1] if a.no_sweep else BWD:
        tiles = dataclasses.replace(default_tiles(b), **change)
        f = lambda s, w, bias, t=tiles, op=op: triu_project(s, w, bias, tiles=t, dtype=op)
        vjp = jax.jit(lambda s, w, bias, dy, f=f: fwd_bwd(f, dy, s, w, bias))
        try:
          t = timeit(vjp, (s, w, bias, dy), a.reps, a.inner)
        except Exception as e:  # a setting Triton cannot compile is reported, not fatal
          print(f"B={b} bwd {op} {change}: failed: {type(e).__name__}: {str(e)[:200]}")
          continue
        record(
          rows,
          f"fwd+bwd {op:8s} {change}",
          batch=b,
          what="fwd+bwd",
          operands=op,
          change=change,
          ms=1e3 * t,
          floor_ms=1e3 * bwd_bytes / bw,
        )
      for md in ("float32", "bfloat16"):
        for change in FUSED:
          tiles = dataclasses.replace(default_tiles(b, md), **change)
          try:
            t = time_fused(b, s, w, bias, dy, md, op, tiles, a.reps, a.inner)
          except Exception as e:
            print(f"B={b} fused {op} {md} {change}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
          record(
            rows,
            f"fwd+fused {op:8s} mom={md:8s} {change}",
            batch=b,
            what="fwd+fused",
            operands=op,
            moments=md,
            change=change,
            ms=1e3 * t,
            floor_ms=1e3 * fused_bytes[md] / bw,
          )
    fwd_bytes = rows_w * D_OUT * 4 + b * rows_w * 2
    for c in PIECES:
      fwd = jax.jit(lambda s, w, c=c: split_product(triu_vector(s).astype(w.dtype), w, c))
      t = timeit(fwd, (s, w), a.reps, a.inner)
      record(
        rows,
        f"fwd pieces={c}",
        batch=b,
        what="fwd",
        pieces=c,
        ms=1e3 * t,
        floor_ms=1e3 * fwd_bytes / bw,
      )
    fwd = jax.jit(lambda s, w: split_product(triu_vector(s), w.astype(jnp.bfloat16), 128))
    t = timeit(fwd, (s, w), a.reps, a.inner)
    record(
      rows, "fwd pieces=128, W cast to bf16", batch=b, what="fwd", pieces="128-bf16w", ms=1e3 * t
    )
    for op in a.operands:  # triu_project's own forward (forward=None: its default for op)
      for forward in ("xla", "kernel"):
        fwd = jax.jit(
          lambda s, w, op=op, fw=forward: triu_project(s, w, bias, dtype=op, forward=fw)
        )
        t = timeit(fwd, (s, w), a.reps, a.inner)
        hlo = fwd.lower(s, w).compile().as_text()
        copy = f"bf16[{rows_w},{D_OUT}]" in hlo  # a rounded copy of W
        note = " (writes a bf16 copy of W)" if copy else ""
        record(
          rows,
          f"fwd triu_project {op:8s} forward={forward}{note}",
          batch=b,
          what="fwd",
          operands=op,
          forward=forward,
          ms=1e3 * t,
          floor_ms=1e3 * fwd_bytes / bw,
          w_copy=copy,
        )
    del s, w
  if a.json:
    with open(a.json, "w") as fh:
      json.dump(dict(device=jax.devices()[0].device_kind, ceilings=ceil, rows=rows), fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
