"""The head with the Pallas projection (`use_kernels=True`) against the XLA path at full size.

Run on a GPU from the repository root:

  PYTHONPATH=. python benchmarks/kernel_parity.py --batch 64

For the optimized and original presets at N=196, D=768 (14x14 grid graph)
and the float32, tf32 and bfloat16 policies, it computes the training-mode
output and the gradients of `sum(out^2)` for the parameters and the tokens
both ways and prints, per row, the largest difference over the largest
entry of the XLA path's value (output, d_tokens, d_proj/kernel), and whether
the kernel ran (a `pallas_call` in the program). Writes JSON with --json.

`--compare row-align` compares instead the default path with its token rows
aligned (`ops.gram.ROW_ALIGN_BYTES`, 196 -> 200 bf16 tokens) against the same
path unpadded (`ROW_ALIGN_BYTES = 1`).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from moment_jax import MomentHead, grid_graph
from moment_jax.ops import gram

N, D, SIDE = 196, 768, 14


def grads(head, variables, tokens, graph):
  def loss(params, t):
    out = head.apply(
      {**variables, "params": params},
      t,
      graph,
      train=True,
      rngs={"dropout": jax.random.key(0)},
      mutable=["batch_stats"],
    )[0]
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, out), (gp, gt) = fn(variables["params"], tokens)
  ran = "pallas_call" in str(jax.make_jaxpr(fn)(variables["params"], tokens))
  return out, gt, gp["proj"]["kernel"], ran


def rel(a, b):
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--preset", nargs="+", default=["optimized", "original"])
  ap.add_argument("--policy", nargs="+", default=["float32", "tf32", "bfloat16"])
  ap.add_argument("--json", default=None)
  ap.add_argument("--compare", choices=["kernels", "row-align"], default="kernels")
  ap.add_argument("--tiny", action="store_true", help="N=16, D=8: a CPU smoke run (interpreted)")
  args = ap.parse_args()
  n, d, side = (16, 8, 4) if args.tiny else (N, D, SIDE)
  graph = grid_graph(side, side)
  tokens = jax.random.normal(jax.random.key(1), (args.batch, n, d))
  rows = []
  for preset in args.preset:
    for policy in args.policy:
      aligned = gram.ROW_ALIGN_BYTES
      if args.compare == "kernels":
        ref = MomentHead.from_preset(preset, policy=policy, dropout_rate=0.0, use_kernels=False)
        fast = ref.clone(use_kernels=True)
      else:
        ref = fast = MomentHead.from_preset(preset, policy=policy, dropout_rate=0.0)
      v = jax.jit(lambda k, h=ref: h.init(k, tokens, graph, train=False))(jax.random.key(0))
      if args.compare == "row-align":
        gram.ROW_ALIGN_BYTES = 1
      want = grads(ref, v, tokens, graph)
      gram.ROW_ALIGN_BYTES = aligned
      got = grads(fast, v, tokens, graph)
      row = dict(
        compare=args.compare,
        preset=preset,
        policy=policy,
        batch=args.batch,
        kernel_ran=got[3],
        xla_ran_kernel=want[3],
        out=rel(got[0], want[0]),
        d_tokens=rel(got[1], want[1]),
        d_kernel=rel(got[2], want[2]),
      )
      rows.append(row)
      print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1
      )


if __name__ == "__main__":
  main()
