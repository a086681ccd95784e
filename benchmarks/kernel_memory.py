"""Where the kernel path's extra step memory sits: compiled buffers of both paths.

Run on a GPU from the repository root:

  PYTHONPATH=. python benchmarks/kernel_memory.py --batch 64

(On a CPU the kernel is interpreted, and the interpreter pads its operands.)

Compiles (never runs) the optimized head's gradient step (parameters and
tokens, bfloat16 policy, 14x14 grid graph, N=196, D=768) with
`use_kernels=False` and `use_kernels=True`, prints each step's compiled temp
bytes and the largest allocations of XLA's buffer assignment with the values
they hold, so the two can be compared line by line.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import tempfile

DUMP = tempfile.mkdtemp(prefix="kernel_memory_")
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moment_jax import MomentHead, grid_graph  # noqa: E402

MB = 1e6


def step_fn(head, graph):
  def loss(params, tokens, batch_stats):
    out = head.apply(
      {"params": params, "batch_stats": batch_stats},
      tokens,
      graph,
      train=True,
      rngs={"dropout": jax.random.key(0)},
      mutable=["batch_stats"],
    )[0]
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return jax.grad(loss, argnums=(0, 1))


def largest(path: str, top: int) -> list[str]:
  """The `top` largest values of a buffer-assignment dump (the temp allocation
  holds most of them at offsets; values that share bytes are not both live)."""
  values = re.findall(
    r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", open(path).read()
  )
  seen, out = set(), []
  for name, size, offset, shape in sorted(values, key=lambda v: -int(v[1])):
    if (name, offset) in seen:
      continue
    seen.add((name, offset))
    out.append(f"  {int(size) / MB:8.1f} MB @{int(offset) / MB:8.1f}  {name:<48} {shape[:60]}")
    if len(out) == top:
      break
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--top", type=int, default=16)
  args = ap.parse_args()
  graph = grid_graph(14, 14)
  tokens = jax.ShapeDtypeStruct((args.batch, 196, 768), jnp.float32)
  for kernels in (False, True):
    head = MomentHead.from_preset("optimized", policy="bfloat16", use_kernels=kernels)
    v = jax.eval_shape(lambda t, h=head: h.init(jax.random.key(0), t, graph, train=False), tokens)
    fn = step_fn(head, graph)
    fn.__name__ = f"step_kernels_{kernels}"
    before = set(glob.glob(f"{DUMP}/*buffer-assignment.txt"))
    c = jax.jit(fn).lower(v["params"], tokens, v["batch_stats"]).compile()
    m = c.memory_analysis()
    print(
      f"== use_kernels={kernels}: temp {m.temp_size_in_bytes / MB:.1f} MB, "
      f"args {m.argument_size_in_bytes / MB:.1f} MB, out {m.output_size_in_bytes / MB:.1f} MB"
    )
    new = sorted(set(glob.glob(f"{DUMP}/*buffer-assignment.txt")) - before, key=os.path.getsize)
    if new:
      print("\n".join(largest(new[-1], args.top)))


if __name__ == "__main__":
  main()
