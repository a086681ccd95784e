"""The head's AdamW training step: optax on the gradient against the update fused
into the projection kernel's backward (`HeadConfig.fused_adamw`).

  PYTHONPATH=. python benchmarks/fused_adamw.py --batch 64 128 --json out/fused_adamw.json

For the optimized preset under the bfloat16 policy (N=196, D=768, 14x14 grid
graph, token gradients as under a backbone), one jitted step with the state
donated, per variant:

  xla:          use_kernels=False, optax.adamw on every parameter
  kernel:       the Pallas projection backward, optax.adamw on every parameter
  kernel-mu16:  the same with optax.adamw(mu_dtype=bfloat16)
  fused:        fused_adamw=FusedAdamW(...): the kernel's step in its backward,
                optax.adamw on the rest
  fused-16:     the same with both moments in bfloat16

It prints ms per step (median of synchronised steps after warm-up), the
device peak of a fresh process per variant, and checks that "fused" and
"kernel" give the same kernel after 3 steps from the same state (max |diff| /
max |kernel|). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT as OWG

from moment_jax import MomentHead, grid_graph
from moment_jax.kernels import FusedAdamW

sys.path.insert(0, os.path.dirname(__file__))
from e2e import LR, time_steps  # noqa: E402  (the same AdamW and timing as e2e.py)
from e2e import WEIGHT_DECAY as WD  # noqa: E402

N, D, SIDE = 196, 768, 14
VARIANTS = ("xla", "kernel", "kernel-mu16", "fused", "fused-16")
ROW = "ROW "


def build(variant: str, b: int):
  fused = None
  if variant.startswith("fused"):
    md = jnp.bfloat16 if variant == "fused-16" else jnp.float32
    fused = FusedAdamW(LR, weight_decay=WD, moment_dtype=md)
  head = MomentHead.from_preset(
    "optimized",
    policy="bfloat16",
    dropout_rate=0.0,
    use_kernels=variant != "xla",
    fused_adamw=fused,
  )
  mu = jnp.bfloat16 if variant == "kernel-mu16" else None
  tx = optax.adamw(LR, weight_decay=WD, mu_dtype=mu)
  graph = grid_graph(SIDE, SIDE)
  tokens = jax.random.normal(jax.random.key(1), (b, N, D), jnp.bfloat16)
  target = jax.random.normal(jax.random.key(2), (b, head.d_out), jnp.float32)
  v = jax.jit(lambda k: head.init(k, tokens, graph, train=False))(jax.random.key(0))
  params, owg = v["params"], v.get(OWG, {})
  state = dict(params=params, owg=owg, stats=v["batch_stats"], opt=tx.init(params))

  def loss_fn(params, owg, stats, tokens):
    out, upd = head.apply(
      {"params": params, OWG: owg, "batch_stats": stats} if owg else
      {"params": params, "batch_stats": stats},
      tokens, graph, train=True, mutable=["batch_stats"],
    )  # fmt: skip
    return jnp.mean(jnp.square(out.astype(jnp.float32) - target)), upd["batch_stats"]

  def step(state, tokens):
    (loss, stats), (g, owg, dt) = jax.value_and_grad(loss_fn, (0, 1, 3), has_aux=True)(
      state["params"], state["owg"], state["stats"], tokens
    )
    updates, opt = tx.update(g, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(params=params, owg=owg, stats=stats, opt=opt), loss, dt

  return jax.jit(step, donate_argnums=0), state, tokens


def kernel_of(state):
  return state["owg"]["proj"]["kernel"] if state["owg"] else state["params"]["proj"]["kernel"]


def run_variant(variant: str, b: int, steps: int, warmup: int) -> dict:
  step, state, tokens = build(variant, b)
  compiled = step.lower(state, tokens).compile()
  mem = compiled.memory_analysis()
  box = [state]

  def one():  # the token gradient is dropped at once: time_steps keeps what this returns
    box[0], loss, _ = compiled(box[0], tokens)
    return box[0], loss

  ms, pipelined, outs = time_steps(one, jax.block_until_ready, warmup, steps)
  loss = outs[-1][1]
  stats = jax.devices()[0].memory_stats() or {}
  return dict(
    variant=variant,
    batch=b,
    ms=ms,
    ms_pipelined=pipelined,
    peak_mb=stats.get("peak_bytes_in_use", 0) / 1e6 or None,
    temp_mb=mem.temp_size_in_bytes / 1e6 if mem else None,
    loss=float(loss),
  )


def parity(b: int, steps: int = 3) -> dict:
  """max |kernel_fused - kernel_optax| / max |kernel| after `steps` steps."""
  out = {}
  for variant in ("kernel", "fused"):
    step, state, tokens = build(variant, b)
    for _ in range(steps):
      state, loss, _ = step(state, tokens)
    out[variant] = np.asarray(kernel_of(state))
    out[variant + "_loss"] = float(loss)
  diff = np.max(np.abs(out["fused"] - out["kernel"])) / np.max(np.abs(out["kernel"]))
  return dict(batch=b, steps=steps, kernel_rel_diff=float(diff),
              losses=(out["kernel_loss"], out["fused_loss"]))  # fmt: skip


def op_parity(b: int, moment_dtype=jnp.float32) -> dict:
  """One update at full size from the same S, kernel, moments and cotangent:
  `triu_project_adamw` against `triu_project`'s gradient fed to optax.adamw
  (max |diff| / max |value| of the new kernel and moments, and of dS)."""
  from moment_jax.kernels import triu_project, triu_project_adamw

  k = jax.random.split(jax.random.key(5), 6)
  f = D * (D + 1) // 2
  s = jax.random.normal(k[0], (b, D, D), jnp.bfloat16)
  w = jax.random.normal(k[1], (f, 512), jnp.float32) / np.sqrt(f)
  mu = (1e-3 * jax.random.normal(k[2], w.shape)).astype(moment_dtype)
  nu = (1e-6 * jax.random.uniform(k[3], w.shape)).astype(moment_dtype)
  bias = jnp.zeros((512,), jnp.float32)
  dy = jax.random.normal(k[4], (b, 512), jnp.float32)
  count = jnp.asarray(7.0, jnp.float32)
  opt = FusedAdamW(LR, weight_decay=WD, moment_dtype=moment_dtype)
  fused = jax.jit(
    lambda s, w, mu, nu, c: jax.vjp(
      lambda s, w, mu, nu, c: triu_project_adamw(s, w, bias, mu, nu, c, opt), s, w, mu, nu, c
    )[1](dy)
  )
  ds_f, w_f, mu_f, nu_f, c_f = fused(s, w, mu, nu, count)
  ds_r, dw = jax.jit(lambda s, w: jax.vjp(lambda s, w: triu_project(s, w, bias), s, w)[1](dy))(s, w)
  tx = optax.adamw(LR, weight_decay=WD, mu_dtype=moment_dtype)
  st = tx.init(w)
  adam = st[0]._replace(count=jnp.asarray(7, jnp.int32), mu=mu, nu=nu.astype(jnp.float32))
  upd, st2 = jax.jit(tx.update)(dw, (adam, *st[1:]), w)
  w_r = optax.apply_updates(w, upd)
  rel = lambda a, r: float(
    jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)))
    / jnp.max(jnp.abs(r.astype(jnp.float32)))
  )
  return dict(
    batch=b,
    moment_dtype=str(jnp.dtype(moment_dtype)),
    kernel=rel(w_f, w_r),
    step=rel(w_f - w, w_r - w),
    mu=rel(mu_f, st2[0].mu),
    nu=rel(nu_f, st2[0].nu),
    dS=rel(ds_f, ds_r),
    count=float(c_f),
  )


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--batch", type=int, nargs="+", default=[64], help="batch sizes (default: 64)")
  ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
  ap.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
  ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (default: 3)")
  ap.add_argument("--json", default=None, help="write the rows here")
  ap.add_argument("--parity-only", action="store_true", help="only the full-size parity checks")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.worker:
    v, b = a.worker.split(":")
    print(ROW + json.dumps(run_variant(v, int(b), a.steps, a.warmup)), flush=True)
    return 0
  rows = []
  dev = jax.devices()[0].device_kind
  for b in a.batch:
    for md in (jnp.float32, jnp.bfloat16):
      rows.append(dict(kind="op_parity", **op_parity(b, md)))
      print(rows[-1], flush=True)
    if a.parity_only:
      continue
    rows.append(dict(kind="parity", **parity(b)))
    print(rows[-1], flush=True)
    for v in a.variants:  # a fresh process per variant: its own device peak
      cmd = [sys.executable, __file__, "--worker", f"{v}:{b}", "--steps", str(a.steps)]
      p = subprocess.run(cmd, capture_output=True, text=True)
      got = [ln for ln in p.stdout.splitlines() if ln.startswith(ROW)]
      r = json.loads(got[0][len(ROW) :]) if got else dict(variant=v, batch=b, error=p.stderr[-800:])
      rows.append(dict(kind="step", **r))
      print(
        f"B={b:4d} {v:12s} "
        + (
          f"{r['ms']:7.3f} ms  pipelined {r['ms_pipelined']:7.3f}  peak {r['peak_mb']:9.1f} MB"
          if "error" not in r
          else "error: " + r["error"][-300:]
        ),
        flush=True,
      )
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(device=dev, jax=jax.__version__, rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
