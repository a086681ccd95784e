"""Hardware counters of the Pallas projection kernels (Nsight Compute), on the GPU.

  PYTHONPATH=. python benchmarks/kernel_ncu.py --batch 64 --json out/kernel_ncu.json

It runs itself under `ncu` (a child process) for each batch in --batch: with
the bfloat16 policy's operands (bf16 S and products, float32 W) the child
calls, once each, the forward that differentiation runs (it writes the
packed features), the forward and backward, and the forward and fused AdamW
backward with bfloat16 and with float32 moments. For every Pallas kernel it
reads back: duration, DRAM throughput (% of peak and TB/s), registers per
thread, shared memory per block, the occupancy limits and the theoretical
and achieved occupancy, and local-memory spill requests. It prints a table
and writes JSON (the parsed rows and the raw CSV).

Nsight Compute serialises the kernels and fixes the clocks while it
profiles, so its durations are not benchmarks/kernel_sweep.py's times; the
point is why a kernel sits where it does against its floor. Needs `ncu` on
PATH (or --ncu) and access to the GPU's performance counters.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "MemoryWorkloadAnalysis")
CALLS = ("forward", "forward+backward", "forward+fused, bf16 moments", "forward+fused, f32 moments")
# (section's metric name, unit or None for any) -> row key; units are normalised below.
METRICS = {
  ("Duration", None): "duration_us",
  ("DRAM Throughput", "%"): "dram_pct",
  ("Memory Throughput", None): "memory_TBps",
  ("Registers Per Thread", None): "registers",
  ("Dynamic Shared Memory Per Block", None): "smem_KB",
  ("Block Limit Registers", None): "block_limit_registers",
  ("Block Limit Shared Mem", None): "block_limit_smem",
  ("Theoretical Occupancy", None): "occupancy_theoretical_pct",
  ("Achieved Occupancy", None): "occupancy_achieved_pct",
  ("Local Memory Spilling Requests", None): "spill_requests",
}
# ncu's CSV gives base units (ns, byte/s, byte/block); its text view scaled ones.
_TIME = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
_RATE = {"byte/s": 1e-12, "gbyte/s": 1e-3, "tbyte/s": 1.0}
_SIZE = {"byte/block": 1e-3, "kbyte/block": 1.0, "mbyte/block": 1e3}


def _number(text: str) -> float | None:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return None


def _value(key: str, unit: str, value: float) -> float | None:
  """`value` in the row's unit (us, TB/s, KB), or None for a unit it does not know."""
  u = unit.strip().lower()
  if key == "duration_us":
    return value * _TIME[u] if u in _TIME else None
  if key == "memory_TBps":
    return value * _RATE[u] if u in _RATE else None  # the "%" row of the same name is skipped
  if key == "smem_KB":
    return value * _SIZE[u] if u in _SIZE else None
  return value


def parse(text: str) -> list[dict]:
  """Rows of `ncu --csv --page details` output, one dict per profiled kernel
  (in launch order): `kernel`, `grid`, `block` and the `METRICS` keys found.

  Lines before the CSV header (the program's own output, ncu's `==PROF==`
  notes) are skipped; so are metrics with units it does not know.

  Example:
    >>> text = '\\n'.join([
    ...   '==PROF== Disconnected',
    ...   '"ID","Kernel Name","Block Size","Grid Size","Section Name","Metric Name",'
    ...   '"Metric Unit","Metric Value"',
    ...   '"0","triu_project_fwd","(128, 1, 1)","(4, 1, 132)","GPU Speed Of Light Throughput",'
    ...   '"Duration","us","297.57"',
    ...   '"0","triu_project_fwd","(128, 1, 1)","(4, 1, 132)","Launch Statistics",'
    ...   '"Registers Per Thread","register/thread","127"'])
    >>> parse(text)
    [{'kernel': 'triu_project_fwd', 'grid': '(4, 1, 132)', 'block': '(128, 1, 1)', \
'duration_us': 297.57, 'registers': 127.0}]
  """
  lines = text.splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
  if start is None:
    return []
  body = [line for line in lines[start:] if line.startswith('"')]
  rows: dict[str, dict] = {}
  for rec in csv.DictReader(io.StringIO("\n".join(body))):
    row = rows.setdefault(
      rec["ID"],
      dict(kernel=rec["Kernel Name"], grid=rec.get("Grid Size"), block=rec.get("Block Size")),
    )
    name, unit, raw = rec["Metric Name"], rec.get("Metric Unit") or "", rec["Metric Value"]
    key = METRICS.get((name, unit)) or METRICS.get((name, None))
    number = _number(raw)
    if key is None or number is None or key in row:
      continue
    value = _value(key, unit, number)
    if value is not None:
      row[key] = value
  return [rows[k] for k in sorted(rows, key=int)]


def label(rows: list[dict]) -> list[dict]:
  """Adds `call` (an entry of `CALLS`): each call starts with the forward kernel."""
  i = -1
  for r in rows:
    if r["kernel"].startswith("triu_project_fwd"):
      i += 1
    r["call"] = CALLS[i] if 0 <= i < len(CALLS) else f"call {i}"
  return rows


def worker(batch: int, dim: int, d_out: int) -> None:
  """The child that ncu profiles: each call of `CALLS` once, in order."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, os.path.dirname(__file__))
  from kernels import inputs

  from moment_jax.kernels import FusedAdamW, triu_project, triu_project_adamw

  s, w, bias = inputs(batch, dim, d_out, jnp.bfloat16)
  dy = jax.random.normal(jax.random.key(3), (batch, d_out), jnp.float32)
  f = lambda s, w, bias: triu_project(s, w, bias, dtype=jnp.bfloat16)
  jax.block_until_ready(jax.jit(lambda s, w, bias: jax.vjp(f, s, w, bias)[0])(s, w, bias))
  vjp = jax.jit(lambda s, w, bias, dy: jax.vjp(f, s, w, bias)[1](dy))
  jax.block_until_ready(vjp(s, w, bias, dy))
  for moments in (jnp.bfloat16, jnp.float32):
    opt = FusedAdamW(learning_rate=1e-4, moment_dtype=moments)
    mu, nu, count = jnp.zeros_like(w, moments), jnp.zeros_like(w, moments), jnp.zeros(())

    def update(w, mu, nu, opt=opt):
      g = lambda w, mu, nu: triu_project_adamw(s, w, bias, mu, nu, count, opt, dtype=jnp.bfloat16)
      return jax.vjp(g, w, mu, nu)[1](dy)

    jax.block_until_ready(jax.jit(update)(w, mu, nu))


def profile(batch: int, dim: int, d_out: int, ncu: str) -> tuple[list[dict], str]:
  cmd = [ncu, "--target-processes", "all", "-k", "regex:triu_project", "--csv"]
  cmd += ["--page", "details"] + [a for s in SECTIONS for a in ("--section", s)]
  cmd += [sys.executable, os.path.abspath(__file__), "--worker", "--batch", str(batch)]
  cmd += ["--dim", str(dim), "--d-out", str(d_out)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
  if proc.returncode != 0:
    raise RuntimeError(f"ncu exited {proc.returncode}: {proc.stderr[-2000:]}")
  rows = parse(proc.stdout)
  if not rows:
    raise RuntimeError(f"ncu profiled no kernel; its output ends: {proc.stdout[-2000:]}")
  return rows, proc.stdout


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batch", type=int, nargs="+", default=[64], help="default: 64")
  ap.add_argument("--ncu", default=None, help="path of ncu (default: found on PATH)")
  ap.add_argument("--json", default=None, help="write the rows here")
  ap.add_argument(
    "--reparse", default=None, help="re-read the raw CSV of an earlier --json (no GPU needed)"
  )
  ap.add_argument("--dim", type=int, default=768, help="D (default: 768, ViT-B)")
  ap.add_argument("--d-out", type=int, default=512, help="d_out (default: 512)")
  ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.worker:
    worker(a.batch[0], a.dim, a.d_out)
    return 0
  if a.reparse:
    with open(a.reparse) as f:
      raw = json.load(f)["raw_csv"]
    a.batch = [int(b) for b in raw]
  else:
    raw = {}
    ncu = a.ncu or shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(ncu):
      ap.error(f"--ncu: Nsight Compute not found (looked for {ncu!r})")
  out = []
  cols = ("duration_us", "dram_pct", "memory_TBps", "registers", "smem_KB")
  cols += ("occupancy_theoretical_pct", "occupancy_achieved_pct", "spill_requests")
  print(f"{'B':>4} {'call':34s} {'kernel':24s} " + " ".join(f"{c[:12]:>12s}" for c in cols))
  for b in a.batch:
    if a.reparse:
      rows = parse(raw[str(b)])
    else:
      rows, raw[str(b)] = profile(b, a.dim, a.d_out, ncu)
    for r in label(rows):
      r["batch"] = b
      out.append(r)
      vals = " ".join(
        f"{r[c]:12.1f}" if isinstance(r.get(c), float) else f"{'-':>12s}" for c in cols
      )
      print(f"{b:4d} {r['call'][:34]:34s} {r['kernel'][:24]:24s} {vals}", flush=True)
  if a.json:
    tmp = a.json + ".tmp"
    with open(tmp, "w") as f:
      json.dump(dict(sections=list(SECTIONS), rows=out, raw_csv=raw), f, indent=1)
    os.replace(tmp, a.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
