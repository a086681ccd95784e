"""Memory targets of the memory issue, measured on a GPU from device peaks.

Run on a GPU machine from the repository root:

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. python benchmarks/memory_gpu.py --out out/

It prints one table per target (measured vs target) and writes
memory_gpu.json. Definitions (docs/math.md section 10): forward
activations = device peak of the training-mode forward above what was in use
before it (parameters and inputs resident); step activations = device peak
of forward+backward above that, minus the parameter and token gradients.
Every figure is a fresh process (`moment_jax.memory.device_peak`); several
run at once, each with its own allocator statistics. Optimized preset, N=196,
D=768, 14x14 grid graph, float32 unless a row says otherwise. MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moment_jax import MomentHead, grid_graph, memory, moment_features

MB, MIB = 1e6, 2**20
N, D = 196, 768
GRAPH = grid_graph(14, 14)


def head(**kw):
  return MomentHead.from_preset("optimized", **kw)


def peaks(cfg):
  b, token_grad, kw = cfg
  p = memory.head_device_peaks(head(**kw), (b, N, D), GRAPH, token_grad)
  return dict(
    batch=b,
    token_grad=token_grad,
    config=kw,
    forward_mb=p["forward"] / MB,
    step_mb=p["step"] / MB,
    step_raw_mb=p["step_raw"] / MB,
    earlier_peak_mb=p["earlier_peak"] / MB,
    device=p["device"],
  )


def name(kw):
  return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--jobs", type=int, default=6)
  ap.add_argument(
    "--kernels",
    action="store_true",
    help="only the kernel path against the XLA path (bfloat16 policy, token grads, "
    "B=4 and 64): writes kernel_memory.json",
  )
  args = ap.parse_args()
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    sys.exit("memory_gpu.py measures device peaks: run it on a GPU")
  t0 = time.time()
  if args.kernels:
    return kernel_rows(args, dev)
  configs = [
    dict(),
    dict(remat_policy="isqrt"),
    dict(remat_policy="features"),
    dict(remat_policy="features", isqrt_chunk=1),
    dict(remat_policy="features", isqrt_chunk=4),
    dict(remat_policy="isqrt", isqrt_chunk=1),
    dict(remat_policy="isqrt", isqrt_chunk=4),
  ]
  grid = [(b, tg, kw) for kw in configs for b in (4, 64) for tg in (False, True)]
  ks = [(4, True, dict(remat_policy="isqrt", isqrt_iterations=k)) for k in range(2, 9)]
  # consecutive (float32, bfloat16) pairs of the same batch and configuration
  bf = [
    (b, True, dict(kw, policy=p))
    for b in (4, 64)
    for kw in (dict(), dict(remat_policy="features", isqrt_chunk=4))
    for p in ("float32", "bfloat16")
  ]
  bf += [(4, False, dict(policy=p)) for p in ("float32", "bfloat16")]
  with ThreadPoolExecutor(args.jobs) as pool:
    res = list(pool.map(peaks, grid + ks + bf))
  res_grid, res_k, res_bf = (
    res[: len(grid)],
    res[len(grid) : len(grid) + len(ks)],
    res[len(grid) + len(ks) :],
  )

  print(f"device: {dev.device_kind}; jax {jax.__version__}; MB = 1e6 bytes")
  print("\n== activations by remat policy and chunk (optimized, float32) ==")
  print(f"{'config':<40} {'B':>3} {'tok grad':>8} {'fwd act MB':>11} {'step act MB':>12}")
  for r in res_grid:
    print(
      f"{name(r['config']):<40} {r['batch']:>3} {str(r['token_grad']):>8} "
      f"{r['forward_mb']:>11.2f} {r['step_mb']:>12.2f}"
    )

  def best(b, tg, key):
    rows = [r for r in res_grid if r["batch"] == b and r["token_grad"] == tg]
    return min(rows, key=lambda r: r[key])

  targets = []
  r = best(4, False, "forward_mb")
  targets.append(
    ("seed scenario: forward activations, B=4", r["forward_mb"], 19.0, name(r["config"]))
  )
  r = best(4, True, "step_mb")
  targets.append(("token grads: step activations, B=4", r["step_mb"], 24.0, name(r["config"])))
  r = best(64, True, "step_mb")
  targets.append(("token grads: step activations, B=64", r["step_mb"], 190.0, name(r["config"])))

  print("\n== isqrt remat: step activations vs iterations (B=4, token grads) ==")
  print(f"{'K':>3} {'step act MB':>12} {'extra per K per sample MiB':>28}")
  per_iter = []
  for prev, r in zip([None] + res_k[:-1], res_k):
    k = r["config"]["isqrt_iterations"]
    extra = "" if prev is None else (r["step_mb"] - prev["step_mb"]) * MB / MIB / 4
    if extra != "":
      per_iter.append(extra)
    print(f"{k:>3} {r['step_mb']:>12.2f} {extra if extra == '' else f'{extra:.3f}':>28}")
  slope = (
    float(
      np.polyfit(
        [r["config"]["isqrt_iterations"] for r in res_k], [r["step_mb"] for r in res_k], 1
      )[0]
    )
    * MB
    / MIB
    / 4
  )
  targets.append(
    (
      "isqrt remat: MiB per extra iteration per sample (fit K=2..8)",
      slope,
      D * D * 4 / MIB,
      "remat_policy=isqrt",
    )
  )

  print("\n== bfloat16 vs float32 ==")
  for r in res_bf:
    print(
      f"{name(r['config']):<50} B={r['batch']:>3} tok grad={str(r['token_grad']):<5} "
      f"fwd {r['forward_mb']:>9.2f} MB  step {r['step_mb']:>9.2f} MB"
    )
  ratios = []
  for i in range(0, len(res_bf), 2):
    f32, b16 = res_bf[i], res_bf[i + 1]
    key = "step_mb" if f32["token_grad"] else "forward_mb"
    ratios.append(b16[key] / f32[key])
  x = jax.random.normal(jax.random.key(0), (4, N, D))
  f32 = moment_features(x, GRAPH, precision=jax.lax.Precision.HIGHEST)
  b16 = moment_features(
    x.astype(jnp.bfloat16), GRAPH, moment_dtype=jnp.bfloat16, sqrt_dtype=jnp.bfloat16
  )
  ferr = float(jnp.linalg.norm(b16.astype(jnp.float32) - f32) / jnp.linalg.norm(f32))
  targets.append(
    ("bfloat16: activations / float32 (worst row)", max(ratios), 0.55, "policy=bfloat16")
  )
  targets.append(("bfloat16: features relative error vs float32", ferr, 2e-2, "policy=bfloat16"))

  print("\n== the Dense weight in a full AdamW step (optimized, B=4, token grads) ==")
  h = head()
  bill = memory.step_bill(h, (4, N, D), optax.adamw(1e-3), GRAPH, True)
  w = 295296 * 512 * 4
  print(
    f"weight {w / MB:.1f} MB; compiled step temp {bill.activations / MB:.1f} MB; "
    f"bill {bill.as_mb()}"
  )
  targets.append(
    (
      "AdamW step temp / Dense weight bytes (<2: no second dW buffer)",
      bill.activations / w,
      2.0,
      "default",
    )
  )

  print("\n== targets ==")
  print(f"{'target':<66} {'measured':>10} {'target':>9}  met   config")
  for label, v, t, cfg in targets:
    print(f"{label:<66} {v:>10.3f} {t:>9.3f}  {'yes' if v <= t else 'NO ':<4}  {cfg}")
  out = dict(
    device=dev.device_kind,
    jax=jax.__version__,
    grid=res_grid,
    iterations=res_k,
    bfloat16=res_bf,
    feature_rel_err_bf16=ferr,
    bill_mb=bill.as_mb(),
    targets=[dict(label=l, measured=v, target=t, config=c) for l, v, t, c in targets],
    seconds=time.time() - t0,
  )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "memory_gpu.json"), "w") as f:
    json.dump(out, f, indent=1, default=str)
  print(f"wrote {os.path.join(args.out, 'memory_gpu.json')} in {time.time() - t0:.0f} s")


def kernel_rows(args, dev):
  """Forward and step activations of the kernel path (auto: on, on one GPU) and
  the XLA path (use_kernels=False), bfloat16 policy, token gradients."""
  cfgs = [(b, True, dict(policy="bfloat16", use_kernels=k)) for b in (4, 64) for k in (False, None)]
  with ThreadPoolExecutor(args.jobs) as pool:
    res = list(pool.map(peaks, cfgs))
  print(f"device: {dev.device_kind}; jax {jax.__version__}; MB = 1e6 bytes")
  print(f"{'B':>3} {'path':<8} {'fwd act MB':>11} {'step act MB':>12}")
  for r in res:
    path = "XLA" if r["config"]["use_kernels"] is False else "kernels"
    print(f"{r['batch']:>3} {path:<8} {r['forward_mb']:>11.2f} {r['step_mb']:>12.2f}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "kernel_memory.json"), "w") as f:
    json.dump(dict(device=dev.device_kind, jax=jax.__version__, rows=res), f, indent=1)


if __name__ == "__main__":
  main()
