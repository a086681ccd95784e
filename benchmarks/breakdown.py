"""Where the optimized head's training step spends its time on the GPU.

  PYTHONPATH=. python benchmarks/breakdown.py --out out/

For B in --batch and the tf32 and bfloat16 policies (N=196, D=768, 14x14
grid graph), it times with gpu.py's method (medians of synchronised runs):
the whole forward+backward with token gradients; the features alone
(propagation, moment, square root, triangle) forward+backward against a
fixed cotangent; the projection, BatchNorm and GELU alone with gradients for
the kernel and the features; and the same for both isqrt spaces. The parts
do not add up exactly: XLA fuses across them in the whole step. Writes
breakdown.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from moment_jax import MomentHead, grid_graph, steps
from moment_jax.ops import split_matmul

sys.path.insert(0, os.path.dirname(__file__))
from gpu import SIDE, D, N, jax_sync, timeit  # noqa: E402


def parts(b, policy, space):
  head = MomentHead.from_preset("optimized", policy=policy, dropout_rate=0.0, isqrt_space=space)
  graph = grid_graph(SIDE, SIDE)
  pol = head.resolved_policy(jnp.float32)
  tokens = jax.random.normal(jax.random.key(1), (b, N, D)).astype(pol.compute_dtype)
  v = jax.jit(lambda k: head.init(k, tokens, graph, train=False))(jax.random.key(0))
  feats = jax.jit(head.feature_fn(pol))
  f0 = feats(tokens, graph, None)
  ct = jax.random.normal(jax.random.key(3), f0.shape).astype(f0.dtype)
  feat_step = jax.jit(lambda t: jax.vjp(lambda t: head.feature_fn(pol)(t, graph, None), t)[1](ct))

  def tail(p, f):
    kernel, bias = p["proj"]["kernel"], p["proj"]["bias"]
    y = split_matmul(f.astype(kernel.dtype), kernel, pol.matmul) + bias
    y = (y - y.mean(0)) * jax.lax.rsqrt(y.var(0) + 1e-5)
    return jnp.square(jax.nn.gelu(y)).mean()

  tail_step = jax.jit(jax.grad(tail, argnums=(0, 1)))
  step = steps.make_grad_step(head, graph, token_grad=True)
  key = jax.random.key(2)
  box = [None]
  out = {}
  # Single ops at this batch, in the policy's compute dtype.
  from moment_jax.ops import features as fe
  from moment_jax.ops import triu

  hc = tokens - tokens.mean(1, keepdims=True)
  n = jnp.full((b,), N)
  prec = pol.matmul
  root = lambda h: fe._token_root(h, n, 1e-5, 3, "trace", pol.compute_dtype, prec, False, None)
  s0 = jax.jit(root)(hc)
  sct = jax.random.normal(key := jax.random.key(4), s0.shape).astype(s0.dtype)
  root_step = jax.jit(lambda h: jax.vjp(root, h)[1](sct))
  idx = triu.triu_flat_indices(D)
  plain = lambda s: s.reshape(b, D * D)[:, idx]
  flagged = lambda s: (
    s.reshape(b, D * D).at[:, idx].get(unique_indices=True, indices_are_sorted=True)
  )
  vct = ct.astype(s0.dtype)
  tri = jax.jit(lambda s: jax.vjp(plain, s)[1](vct))
  tri_u = jax.jit(lambda s: jax.vjp(flagged, s)[1](vct))
  extra = (
    ("token root f+b", lambda: root_step(hc)),
    ("triu f+b", lambda: tri(s0)),
    ("triu f+b unique", lambda: tri_u(s0)),
  )
  for name, fn in extra + (
    ("step", lambda: step(v["params"], v["batch_stats"], tokens, key)),
    ("features f+b", lambda: feat_step(tokens)),
    ("features fwd", lambda: feats(tokens, graph, None)),
    ("proj+bn+gelu f+b", lambda: tail_step(v["params"], f0)),
  ):

    def run(fn=fn):
      box[0] = fn()

    out[name] = 1e3 * timeit(run, jax_sync(box), iters=20)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--batch", nargs="+", type=int, default=[64])
  ap.add_argument("--precision", nargs="+", default=["tf32", "bfloat16"])
  ap.add_argument("--space", nargs="+", default=["token", "channel"])
  args = ap.parse_args()
  dev = jax.devices()[0]
  t0 = time.time()
  rows = []
  for b in args.batch:
    for prec in args.precision:
      for space in args.space:
        r = dict(batch=b, precision=prec, space=space, **parts(b, prec, space))
        rows.append(r)
        print(
          " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
          flush=True,
        )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "breakdown.json"), "w") as f:
    json.dump(
      dict(
        device=dev.device_kind,
        jax=jax.__version__,
        rows=rows,
        command=" ".join(sys.argv),
        seconds=time.time() - t0,
      ),
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
