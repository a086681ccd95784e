"""Renders gpu.py's JSON rows as the markdown tables of docs/performance-history.md.

python benchmarks/gpu_table.py docs/results/gpu_h200_token.json [more.json ...]
"""

from __future__ import annotations

import json
import sys

COLS = (
  "jax_fwd_ms",
  "eager_fwd_ms",
  "compile_fwd_ms",
  "floor_fwd_ms",
  "jax_step_ms",
  "eager_step_ms",
  "compile_step_ms",
  "floor_step_ms",
  "tfloor_step_ms",
)


def main(paths):
  print(
    "| preset | B | precision | space | JAX fwd | eager fwd | compile fwd | floor fwd | "
    "JAX f+b | eager f+b | compile f+b | floor f+b | tfloor f+b | JAX/eager | "
    "JAX/compile | JAX/floor | JAX/tfloor |"
  )
  print("|---|---:|---|---|" + "---:|" * 13)
  for path in paths:
    for r in json.load(open(path))["rows"]:
      cells = [f"{r[k]:.3f}" if k in r else "-" for k in COLS]
      ratio = lambda k: f"{r['jax_step_ms'] / r[k]:.2f}" if k in r else "-"
      print(
        f"| {r['preset']} | {r['batch']} | {r['precision']} | {r['space']} | "
        + " | ".join(cells)
        + " | "
        + " | ".join(
          ratio(k) for k in ("eager_step_ms", "compile_step_ms", "floor_step_ms", "tfloor_step_ms")
        )
        + " |"
      )


if __name__ == "__main__":
  main(sys.argv[1:])
