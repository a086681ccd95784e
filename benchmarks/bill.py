"""The whole bill of one AdamW step for the optimized head and its lean variants.

  PYTHONPATH=. python benchmarks/bill.py

Compiled analysis only (works on CPU; nothing is allocated). Prints a
markdown table: parameters, gradients, AdamW state, the step's temp and the
total, at B=4, N=196, D=768 with token gradients. The last row keeps AdamW's
first moment in bfloat16 (optax's `mu_dtype`), the optimizer-side option.
"""

import jax.numpy as jnp
import optax

from moment_jax import MomentHead, grid_graph, memory

BF16 = "params=bfloat16,compute=bfloat16,moment=bfloat16"
ADAMW = optax.adamw(1e-3)
VARIANTS = [
  (dict(), ADAMW),
  (dict(policy=BF16), ADAMW),
  (dict(d_reduce=384), ADAMW),
  (dict(d_reduce=256), ADAMW),
  (dict(d_reduce=256, policy=BF16), ADAMW),
  (dict(), optax.adamw(1e-3, mu_dtype=jnp.bfloat16)),
]

print("| head | params MB | grads MB | AdamW state MB | step temp MB | bill MB |")
print("|---|---:|---:|---:|---:|---:|")
for kw, tx in VARIANTS:
  head = MomentHead.from_preset("optimized", **kw)
  b = memory.step_bill(head, (4, 196, 768), tx, grid_graph(14, 14)).as_mb()
  name = ", ".join(f"{k}={v}" for k, v in kw.items()) or "optimized (default)"
  name += "" if tx is ADAMW else ", AdamW mu_dtype=bfloat16"
  print(
    f"| {name} | {b['params']:.1f} | {b['grads']:.1f} | {b['opt_state']:.1f} | "
    f"{b['activations']:.1f} | {b['total']:.1f} |"
  )
