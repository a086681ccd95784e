"""The Pallas `triu_project` kernel against the XLA path, on the GPU.

Run from the repository root on a GPU machine (one call, about two minutes):

  PYTHONPATH=. python benchmarks/kernels.py --json out/kernels.json

For D=768 (F=295,296), d_out=512 and B in {64, 256} (`--batches`), and the
three precision policies (`float32`: f32 S, HIGHEST; `tf32`: f32 S, DEFAULT;
`bfloat16`: bf16 S, f32 weight, DEFAULT), it times the forward
`y = triu_vector(S) @ W + b` and the forward+backward (gradients of
0.5 |y|^2 with respect to S, W and b) of
  xla:    split_matmul(triu_vector(S).astype(W.dtype), W, precision) + b
  kernel: moment_jax.kernels.triu_project(S, W, b, precision=precision,
          forward="kernel"), Pallas forward and backward
  hybrid: the same with forward="xla" (the default): XLA forward, Pallas
          backward (forward+backward only; its forward is xla's)
with `default_tiles(B)`. HIGHEST runs three TF32 products in the kernels.
as medians of `--reps` timings of `--inner` back-to-back calls, after a
warm-up. Beside them: the floor, max(bytes / copy ceiling, FLOPs / matmul
ceiling), with both ceilings measured in the same run (a 1 GiB
device-to-device `x + 1`, and a 8192^3 matmul per precision). Bytes: W read
and the triangle of S read in the forward; the backward adds W read again,
dW written, the triangle read again and the dense dS written
(`moment_jax.kernels.triu_project.hbm_bytes`). Before timing, it checks
kernel against XLA at full size: max |kernel - xla| / max |xla| of y, dS, dW
and db for one random cotangent.

Prints one table and writes JSON with `--json PATH`. `--sweep` also times a
few other tile settings (`SWEEP`) for the tf32 rows. The JSON is rewritten
after every row, so a run cut short still leaves what it measured.
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
import numpy as np

from moment_jax.kernels import Tiles, default_tiles, triu_project
from moment_jax.kernels.triu_project import flops, hbm_bytes
from moment_jax.ops import split_matmul, triu_vector

D, D_OUT = 768, 512
CASES = {  # policy: (dtype of S, matmul precision)
  "float32": (jnp.float32, jax.lax.Precision.HIGHEST),
  "tf32": (jnp.float32, jax.lax.Precision.DEFAULT),
  "bfloat16": (jnp.bfloat16, jax.lax.Precision.DEFAULT),
}
SWEEP = (  # changes to default_tiles(batch) timed by --sweep (forward="kernel")
  dict(stages=2),
  dict(fwd_k=32, stages=4),
  dict(fwd_programs=1056),
  dict(bwd_k=128, bwd_warps=8),
)


def timeit(fn, args, reps: int, inner: int) -> float:
  """Median seconds per call over `reps` runs of `inner` back-to-back calls."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / inner)
  return statistics.median(times)


def ceilings(reps: int, inner: int, log2_words: int = 28, n: int = 8192) -> dict[str, float]:
  a = jnp.zeros((1 << log2_words,), jnp.float32)  # 1 GiB by default
  out = {"copy_GBps": 2 * a.nbytes / timeit(jax.jit(lambda x: x + 1.0), (a,), reps, inner) / 1e9}
  del a
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  for name, prec in (("highest", "highest"), ("default", "default")):
    mm = jax.jit(lambda a, b, p=prec: jnp.matmul(a, b, precision=p))
    out[f"{name}_TFLOPs"] = 2 * n**3 / timeit(mm, (x, x), reps, inner) / 1e12
  return out


def relerr(a, b) -> float:
  """max |a - b| / max |b|, on the device (the full-size arrays stay there)."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def paths(precision, tiles: Tiles | None):
  xla = lambda s, w, b: split_matmul(triu_vector(s).astype(w.dtype), w, precision) + b
  ker = lambda s, w, b: triu_project(s, w, b, precision=precision, forward="kernel", tiles=tiles)
  hyb = lambda s, w, b: triu_project(s, w, b, precision=precision, forward="xla", tiles=tiles)
  return {"xla": xla, "kernel": ker, "hybrid": hyb}


def step(f):
  return jax.grad(lambda s, w, b: 0.5 * jnp.sum(jnp.square(f(s, w, b))), argnums=(0, 1, 2))


def fwd_bwd(f, dy, *args):
  """`(f(*args), its VJP with dy)`: returning y keeps XLA from dropping a
  forward whose only other use is the kept features (the XLA forward's
  product; a forward kernel computes both in one call anyway)."""
  y, back = jax.vjp(f, *args)
  return y, back(dy)


def inputs(b: int, d: int, d_out: int, s_dtype):
  k = jax.random.split(jax.random.key(b), 3)
  f = d * (d + 1) // 2
  s = jax.random.normal(k[0], (b, d, d), jnp.float32).astype(s_dtype)
  w = jax.random.normal(k[1], (f, d_out), jnp.float32) / np.sqrt(f)
  bias = jax.random.normal(k[2], (d_out,), jnp.float32)
  return s, w, bias


def check(fns, s, w, bias) -> dict[str, float]:
  y = {k: jax.jit(f)(s, w, bias) for k, f in fns.items()}
  dy = jax.random.normal(jax.random.key(7), y["xla"].shape, y["xla"].dtype)
  g = {
    k: jax.jit(lambda s, w, b, dy, f=f: jax.vjp(f, s, w, b)[1](dy))(s, w, bias, dy)
    for k, f in fns.items()
  }
  out = {"y": relerr(y["kernel"], y["xla"])}
  for name, a, r in zip(("dS", "dW", "db"), g["kernel"], g["xla"]):
    out[name] = relerr(a, r)
  # dS must be exactly zero below the diagonal, as the transpose of the gather.
  ds = g["kernel"][0].astype(jnp.float32)
  out["dS_lower_max_abs"] = float(jnp.max(jnp.abs(jnp.tril(ds, -1))))
  return out


RAGGED = ((33, 3, 17, 7), (50, 70, 40, 0), (768, 5, 512, 1024))  # dim, batch, d_out, extra


def ragged_checks() -> list[dict]:
  """Kernel against XLA on shapes that leave ragged tiles (HIGHEST precision, f32 and bf16 S)."""
  out = []
  for dim, b, d_out, n_extra in RAGGED:
    for s_dtype in (jnp.float32, jnp.bfloat16):
      s, w, bias = inputs(b, dim, d_out, s_dtype)
      k = jax.random.split(jax.random.key(dim), 3)
      w = jax.random.normal(k[0], (w.shape[0] + n_extra, d_out)) / np.sqrt(w.shape[0])
      x = jax.random.normal(k[1], (b, n_extra)).astype(s_dtype) if n_extra else None
      dy = jax.random.normal(k[2], (b, d_out))

      def xla(s, w, bias, *x):
        f = triu_vector(s).astype(w.dtype)
        f = jnp.concatenate([f, x[0].astype(w.dtype)], -1) if x else f
        return split_matmul(f, w, "highest") + bias

      def ker(s, w, bias, *x):
        return triu_project(
          s, w, bias, extra=x[0] if x else None, precision="highest", forward="kernel"
        )

      args = (s, w, bias) + ((x,) if n_extra else ())
      res = {}
      for name, f in (("xla", xla), ("kernel", ker)):
        res[name] = jax.jit(lambda dy, *a, f=f: (lambda y, g: (y, *g))(*fwd_bwd(f, dy, *a)))(
          dy, *args
        )
      errs = {
        n: relerr(a, r) for n, a, r in zip(("y", "dS", "dW", "db", "dx"), res["kernel"], res["xla"])
      }
      out.append(
        {
          "dim": dim,
          "batch": b,
          "d_out": d_out,
          "extra": n_extra,
          "s_dtype": jnp.dtype(s_dtype).name,
          "err": errs,
        }
      )
      print(json.dumps(out[-1]), flush=True)
  return out


def floors(b: int, d: int, d_out: int, s_dtype, precision_name: str, ceil) -> tuple[float, float]:
  isz = jnp.dtype(s_dtype).itemsize
  mm = ceil[("highest" if precision_name == "float32" else "default") + "_TFLOPs"] * 1e12
  bw = ceil["copy_GBps"] * 1e9
  fwd = max(hbm_bytes(b, d, d_out, isz) / bw, flops(b, d, d_out) / mm)
  stp = max(hbm_bytes(b, d, d_out, isz, backward=True) / bw, flops(b, d, d_out, backward=True) / mm)
  return fwd, stp


def save(path, dev, ceil, rows, sweep, ragged, t0) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(
      {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax": jax.__version__,
        "d": rows[0]["d"] if rows else None,
        "d_out": rows[0]["d_out"] if rows else None,
        "ceilings": ceil,
        "rows": rows,
        "sweep": sweep,
        "ragged_checks": ragged,
        "command": "python benchmarks/kernels.py " + " ".join(sys.argv[1:]),
        "wall_s": time.perf_counter() - t0,
      },
      fh,
      indent=1,
    )


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
  ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
  ap.add_argument("--dim", type=int, default=D)
  ap.add_argument("--d-out", type=int, default=D_OUT)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--inner", type=int, default=5)
  ap.add_argument("--sweep", action="store_true")
  ap.add_argument("--ragged", action="store_true", help="first check ragged shapes (RAGGED)")
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)

  dev = jax.devices()[0]
  t0 = time.perf_counter()
  # A small problem (a CPU smoke run) gets small ceiling probes too.
  ceil = ceilings(args.reps, args.inner, *((22, 512) if args.dim < D else (28, 8192)))
  print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
  print("ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()), flush=True)
  rows, sweep = [], []
  ragged = ragged_checks() if args.ragged else []
  for b in args.batches:
    for case in args.cases:
      s_dtype, prec = CASES[case]
      s, w, bias = inputs(b, args.dim, args.d_out, s_dtype)
      fns = paths(prec, None)
      err = check({k: fns[k] for k in ("xla", "kernel")}, s, w, bias)
      row = {
        "batch": b,
        "d": args.dim,
        "d_out": args.d_out,
        "policy": case,
        "s_dtype": jnp.dtype(s_dtype).name,
        "tiles": dataclasses.asdict(default_tiles(b)),
        "err": err,
      }
      for name, f in fns.items():
        if name != "hybrid":  # its forward is the XLA path's
          row[f"{name}_fwd_ms"] = 1e3 * timeit(jax.jit(f), (s, w, bias), args.reps, args.inner)
        row[f"{name}_step_ms"] = 1e3 * timeit(jax.jit(step(f)), (s, w, bias), args.reps, args.inner)
      fl = floors(b, args.dim, args.d_out, s_dtype, case, ceil)
      row["floor_fwd_ms"], row["floor_step_ms"] = 1e3 * fl[0], 1e3 * fl[1]
      rows.append(row)
      print(json.dumps(row), flush=True)
      save(args.json, dev, ceil, rows, sweep, ragged, t0)
      if args.sweep and case == "tf32":
        for change in SWEEP:
          tiles = dataclasses.replace(default_tiles(b), **change)
          f = paths(prec, tiles)["kernel"]
          r = {
            "batch": b,
            "policy": case,
            "tiles": dataclasses.asdict(tiles),
            "fwd_ms": 1e3 * timeit(jax.jit(f), (s, w, bias), args.reps, args.inner),
            "step_ms": 1e3 * timeit(jax.jit(step(f)), (s, w, bias), args.reps, args.inner),
          }
          sweep.append(r)
          print(json.dumps(r), flush=True)
          save(args.json, dev, ceil, rows, sweep, ragged, t0)
      del s, w, bias

  hdr = (
    f"{'B':>4} {'policy':9} {'xla fwd':>8} {'kern fwd':>8} {'floor':>6} "
    f"{'xla f+b':>8} {'kern f+b':>8} {'hyb f+b':>8} {'floor':>6}  "
    "max rel err y/dS/dW (kernel vs xla)"
  )
  print(hdr)
  for r in rows:
    e = r["err"]
    print(
      f"{r['batch']:4d} {r['policy']:9} {r['xla_fwd_ms']:8.3f} {r['kernel_fwd_ms']:8.3f} "
      f"{r['floor_fwd_ms']:6.3f} {r['xla_step_ms']:8.3f} {r['kernel_step_ms']:8.3f} "
      f"{r['hybrid_step_ms']:8.3f} {r['floor_step_ms']:6.3f}  "
      f"{e['y']:.1e}/{e['dS']:.1e}/{e['dW']:.1e}"
    )
  print(
    "times in ms, medians; floor = max(bytes / copy ceiling, FLOPs / matmul ceiling); "
    "hyb: XLA forward, Pallas backward (forward='xla')"
  )
  save(args.json, dev, ceil, rows, sweep, ragged, t0)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
