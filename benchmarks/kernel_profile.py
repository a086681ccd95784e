"""Per-kernel device profile of the head's training step on the GPU.

  PYTHONPATH=. python benchmarks/kernel_profile.py --batch 64 --policy bfloat16 --out out/

For each batch, policy and `use_kernels` setting, it compiles the
forward+backward of the optimized head with token gradients (as under a
backbone), times it (gpu.py's medians of synchronised calls; the median
per call of 10 back-to-back calls with one sync at the end, as a training
loop dispatches them; and the host time for one call to return), then
records a few steps with
`jax.profiler.trace` and reads the device plane back with
`jax.profiler.ProfileData`: every GPU kernel, grouped by the HLO
instruction that launched it. It prints the top kernels per step (time,
launches, share, kind: GEMM, Pallas/Triton or XLA fusion), the device-busy
time per step against the wall time, and writes profile.json plus each
step's optimized HLO under --out. `--row-align 1 16 --rounds 2` compares
the token-space path with and without its aligned token rows
(`ops.gram.ROW_ALIGN_BYTES`), interleaved; a table of every run ends the
output.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from moment_jax import MomentHead, grid_graph, steps
from moment_jax.ops import gram

sys.path.insert(0, os.path.dirname(__file__))
from gpu import SIDE, D, N, jax_sync, timeit  # noqa: E402

GEMM_MARKS = ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_")


def pipelined(fn, calls: int = 10, reps: int = 5) -> float:
  """Median seconds per call over `reps` runs of `calls` back-to-back calls, one sync each."""
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = [fn() for _ in range(calls)]
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / calls)
    del out
  return statistics.median(times)


def dispatch(fn, iters: int = 20) -> float:
  """Median host seconds for `fn()` to return (the device may still be running it)."""
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
    jax.block_until_ready(out)
  return statistics.median(times)


def kind(kernel: str, hlo_op: str) -> str:
  k = kernel.lower()
  if any(m in k for m in GEMM_MARKS):
    return "gemm"
  if "triton" in k or "pallas" in k or "triu" in k or "custom-call" in hlo_op:
    return "pallas"
  return "fusion"


def device_events(trace_dir: str) -> list[tuple[str, str, float, float]]:
  """(kernel, hlo_op, start_ns, duration_ns) of every GPU kernel in the trace."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
  data = jax.profiler.ProfileData.from_file(path)
  out = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    if os.environ.get("PROFILE_DEBUG"):
      for line in plane.lines:
        evs = list(line.events)
        print("  line", plane.name, line.name, len(evs), evs and (evs[0].name, dict(evs[0].stats)))
    for line in plane.lines:
      if "stream" not in line.name.lower() or "memcpy" in line.name.lower():
        continue
      for ev in line.events:
        stats = dict(ev.stats)
        hlo = str(stats.get("hlo_op", ""))
        out.append((ev.name, hlo, float(ev.start_ns), float(ev.duration_ns)))
  return out


def busy_ns(events) -> float:
  """Union of the kernels' intervals (streams can overlap)."""
  spans = sorted((s, s + d) for _, _, s, d in events)
  total, end = 0.0, -1.0
  for s, e in spans:
    if s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def profile(
  b: int,
  policy: str,
  kernels: str,
  trace_steps: int,
  out_dir: str,
  top: int,
  row_align: int | None = None,
):
  use = {"auto": None, "on": True, "off": False}[kernels]
  if row_align is None:
    row_align = gram.ROW_ALIGN_BYTES
  gram.ROW_ALIGN_BYTES = row_align  # read when the step is traced
  head = MomentHead.from_preset("optimized", policy=policy, dropout_rate=0.0, use_kernels=use)
  graph = grid_graph(SIDE, SIDE)
  pol = head.resolved_policy(jnp.float32)
  tokens = jax.random.normal(jax.random.key(1), (b, N, D)).astype(pol.compute_dtype)
  v = jax.jit(lambda k: head.init(k, tokens, graph, train=False))(jax.random.key(0))
  step = steps.make_grad_step(head, graph, token_grad=True)
  key = jax.random.key(2)
  args = (v["params"], v["batch_stats"], tokens, key)
  name = f"b{b}_{policy}_{kernels}_align{row_align}"
  with open(os.path.join(out_dir, f"profile_{name}.hlo.txt"), "w") as f:
    f.write(step.lower(*args).compile().as_text())
  box = [None]

  def run():
    box[0] = step(*args)

  ms = 1e3 * timeit(run, jax_sync(box), warmup=3, iters=30)
  ms_pipelined = 1e3 * pipelined(lambda: step(*args))
  ms_dispatch = 1e3 * dispatch(lambda: step(*args))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(trace_steps):
        run()
        jax.block_until_ready(box[0])
    events = device_events(d)
  groups: dict = collections.defaultdict(lambda: [0.0, 0])
  for kern, hlo, _, dur in events:
    g = groups[(hlo or kern, kern[:60], kind(kern, hlo))]
    g[0] += dur / trace_steps
    g[1] += 1 / trace_steps
  total = sum(g[0] for g in groups.values())
  rows = sorted(
    (
      dict(hlo_op=h, kernel=k, kind=kd, us=t / 1e3, launches=round(n, 2), share=t / total)
      for (h, k, kd), (t, n) in groups.items()
    ),
    key=lambda r: -r["us"],
  )
  by_kind: dict = collections.defaultdict(lambda: [0.0, 0.0])
  for r in rows:
    by_kind[r["kind"]][0] += r["us"]
    by_kind[r["kind"]][1] += r["launches"]
  summary = dict(
    batch=b,
    policy=policy,
    kernels=kernels,
    row_align=row_align,
    ms_per_step=ms,
    ms_per_step_pipelined=ms_pipelined,
    ms_dispatch=ms_dispatch,
    kernel_us_per_step=total / 1e3,
    busy_us_per_step=busy_ns(events) / trace_steps / 1e3,
    launches_per_step=sum(r["launches"] for r in rows),
    by_kind={k: dict(us=u, launches=n) for k, (u, n) in by_kind.items()},
  )
  print(
    f"\n== B={b} {policy} kernels={kernels} row_align={row_align}: {ms:.3f} ms/step wall, "
    f"{ms_pipelined:.3f} pipelined, {ms_dispatch:.3f} to dispatch, "
    f"{summary['busy_us_per_step']:.0f} us busy, {summary['launches_per_step']:.0f} launches"
  )
  for k, (u, n) in sorted(by_kind.items(), key=lambda x: -x[1][0]):
    print(f"   {k:7s} {u:8.1f} us  {n:5.0f} launches")
  print(f"   {'us':>7s} {'n':>5s} {'share':>6s} kind    hlo_op / kernel")
  for r in rows[:top]:
    print(
      f"   {r['us']:7.1f} {r['launches']:5.1f} {100 * r['share']:5.1f}% {r['kind']:7s} "
      f"{r['hlo_op'][:40]:40s} {r['kernel'][:50]}"
    )
  return dict(summary=summary, rows=rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument(
    "--out", default=os.environ.get("OUT", "."), help="output folder (default: $OUT or .)"
  )
  ap.add_argument("--batch", nargs="+", type=int, default=[64], help="batch sizes (default: 64)")
  ap.add_argument(
    "--policy", nargs="+", default=["bfloat16"], help="precision policies (default: bfloat16)"
  )
  ap.add_argument(
    "--kernels",
    nargs="+",
    default=["auto"],
    choices=["auto", "on", "off"],
    help="use_kernels settings (default: auto)",
  )
  ap.add_argument(
    "--row-align",
    nargs="+",
    type=int,
    default=[gram.ROW_ALIGN_BYTES],
    help="ops.gram.ROW_ALIGN_BYTES settings: 1 turns the token padding off (default: 16)",
  )
  ap.add_argument("--rounds", type=int, default=1, help="rounds over the settings (default: 1)")
  ap.add_argument("--trace-steps", type=int, default=5, help="traced steps (default: 5)")
  ap.add_argument("--top", type=int, default=40, help="kernels printed per run (default: 40)")
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  res = dict(
    device=jax.devices()[0].device_kind,
    jax=jax.__version__,
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    runs=[],
  )
  for b in a.batch:
    for p in a.policy:
      for r in range(a.rounds):  # settings interleaved, so drift hits them alike
        for k in a.kernels:
          for align in a.row_align:
            run = profile(b, p, k, a.trace_steps, a.out, a.top, align)
            run["summary"]["round"] = r
            res["runs"].append(run)
            with open(os.path.join(a.out, "profile.json"), "w") as f:
              json.dump(res, f, indent=1)
  print("\n    B policy    kernels align round   sync    b2b   busy  pallas    gemm  fusion")
  for run in res["runs"]:
    s = run["summary"]
    us = {k: v["us"] for k, v in s["by_kind"].items()}
    print(
      f"{s['batch']:5d} {s['policy']:9s} {s['kernels']:7s} {s['row_align']:5d} {s['round']:5d} "
      f"{s['ms_per_step']:6.3f} {s['ms_per_step_pipelined']:6.3f} "
      f"{s['busy_us_per_step'] / 1e3:6.3f} "
      + " ".join(f"{us.get(k, 0.0):7.1f}" for k in ("pallas", "gemm", "fusion"))
    )


if __name__ == "__main__":
  main()
