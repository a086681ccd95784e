"""Why a GPU training step of the head held a second buffer the size of its weight.

Run on a GPU:  PYTHONPATH=. python benchmarks/dense_layout.py

Compiles y = f @ W for the head's projection (F = 295,296, d_out = 512, batch
4 and 64) with the kernel stored (F, d_out) (Flax's Dense layout) and
(d_out, F) (PyTorch's Linear layout), the forward alone and with dW, and
prints the compiled temp bytes and every optimized-HLO instruction whose
result has the weight's size. Findings are recorded in docs/memory.md.
"""

import os
import re

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

F, O = 295296, 512
MB = 1e6


def report(tag, fn, *args):
  c = jax.jit(fn).lower(*args).compile()
  m = c.memory_analysis()
  big = [
    l.strip()[:160]
    for l in c.as_text().splitlines()
    if re.search(rf"\[({F},{O}|{O},{F})\]", l) and "=" in l
  ]
  print(
    f"{tag:<44} temp {m.temp_size_in_bytes / MB:9.1f} MB  out {m.output_size_in_bytes / MB:8.1f} MB"
  )
  for l in big[:6]:
    print("    ", l)


for b in (4, 64):
  f = jax.ShapeDtypeStruct((b, F), jnp.float32)
  w_in_out = jax.ShapeDtypeStruct((F, O), jnp.float32)
  w_out_in = jax.ShapeDtypeStruct((O, F), jnp.float32)
  for prec in (jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT):
    fwd_a = lambda f, w: jnp.sum(jnp.matmul(f, w, precision=prec) ** 2)
    fwd_b = lambda f, w: jnp.sum(jnp.matmul(f, w.T, precision=prec) ** 2)
    print(f"-- B={b}, precision={prec.name}")
    report("(F,d_out) forward", fwd_a, f, w_in_out)
    report("(F,d_out) grad W", jax.grad(fwd_a, argnums=1), f, w_in_out)
    report("(F,d_out) grad W and f", jax.grad(fwd_a, argnums=(0, 1)), f, w_in_out)
    report("(d_out,F) forward", fwd_b, f, w_out_in)
    report("(d_out,F) grad W", jax.grad(fwd_b, argnums=1), f, w_out_in)
    report("(d_out,F) grad W and f", jax.grad(fwd_b, argnums=(0, 1)), f, w_out_in)
