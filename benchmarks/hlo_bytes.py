"""Bytes each XLA fusion of a compiled step reads and writes, from its optimized HLO.

  python benchmarks/hlo_bytes.py docs/results/profile_b64_bfloat16_align16_7039814.hlo.txt

Reads the text that `compiled.as_text()` gives (kernel_profile.py writes one
per run) and, for every fusion in the entry computation that is not a GEMM
(`kind=kCustom` fusions are Triton GEMMs or Pallas calls), adds the bytes of
its output and of its operands: an upper bound on the device memory it moves
(an in-place update, such as a diagonal scatter into S, is counted whole).
Prints the largest fusions and the total; divide by the copy ceiling for a
floor on the fusions' time. `--json PATH` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import re

# The HLO shape reader of the collectives' accounting: one table of dtype sizes.
from moment_jax.sharding import _array_bytes

_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")


def array_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape, tuples included: `(bf16[2,3], f32[4])` -> 28."""
  return sum(_array_bytes(shape))


def fusion_bytes(hlo: str) -> list[dict]:
  """`{name, kind, out_bytes, in_bytes}` of the entry computation's non-GEMM fusions."""
  start = hlo.find("\nENTRY")
  if start < 0:
    raise ValueError("hlo: no ENTRY computation in the text")
  sizes: dict[str, int] = {}
  rows = []
  for line in hlo[start:].splitlines():
    m = _DEF.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    sizes[name] = array_bytes(shape)
    if op != "fusion" or "kind=kCustom" in rest:
      continue
    args = rest.split("), kind=", 1)[0]
    operands = [re.sub(r"/\*.*?\*/", "", a).strip().lstrip("%") for a in args.split(",")]
    kind = re.search(r"kind=(\w+)", rest)
    rows.append(
      dict(
        name=name,
        kind=kind.group(1) if kind else "",
        out_bytes=sizes[name],
        in_bytes=sum(sizes.get(a, 0) for a in operands if a),
      )
    )
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("hlo", help="optimized HLO text of one compiled step")
  ap.add_argument("--top", type=int, default=15, help="fusions printed (default: 15)")
  ap.add_argument("--json", default=None, help="write the rows here")
  a = ap.parse_args()
  with open(a.hlo) as f:
    rows = fusion_bytes(f.read())
  rows.sort(key=lambda r: -(r["out_bytes"] + r["in_bytes"]))
  print(f"{'fusion':45s} {'kind':8s} {'out MB':>8s} {'in MB':>8s}")
  for r in rows[: a.top]:
    print(f"{r['name']:45s} {r['kind']:8s} {r['out_bytes'] / 1e6:8.2f} {r['in_bytes'] / 1e6:8.2f}")
  total = sum(r["out_bytes"] + r["in_bytes"] for r in rows)
  print(f"{len(rows)} fusions, {total / 1e6:.1f} MB read and written")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(hlo=a.hlo, total_bytes=total, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
