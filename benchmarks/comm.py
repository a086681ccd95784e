"""Communication and memory per device of the sharded AdamW step, read from compiled HLO.

For n devices of a pure data mesh (n x 1, or n x --model), samples per device
and each layout of the head's projection (`moment_jax.sharding.head_rules`:
"replicated", "columns", "rows"), it compiles the training step of a preset
(never runs it) and prints, per device and step:

* the bytes of each collective kind in the compiled HLO (`sharding.collectives`:
  the array each one is about, times the trip counts of the loops around it;
  those over a single device, which move nothing, left out);
* wire MB: what a device sends, with ring algorithms (all-reduce 2(n-1)/n of
  the array, all-gather and reduce-scatter (n-1)/n of the whole array,
  all-to-all (n-1)/n of the buffer);
* largest: the largest all-gather, all-reduce or reduce-scatter, and whether
  it is weight-sized (at least 10% of the `proj/kernel` bytes);
* p+opt MB: parameters + AdamW state held by the fullest device;
* temp MB: `temp_size_in_bytes` of the compiled step (per device for SPMD).

The step: `MomentHead.from_preset(preset, policy=--policy, isqrt_chunk=--chunk)`
on tokens [n x batch-per-device, N, D] with a grid graph, mean-square loss to
random targets, optax AdamW on the parameters; with --token-grads (default)
it also returns the tokens' gradient, as a step that trains a backbone under
the head must, so the features' cotangents travel too. Parameters and AdamW
state are placed by `tree_shardings(state, mesh, rules)`, the batch over
"data", the step traced inside `use_layout(mesh, rules)`.

Run on a CPU (simulated devices, compile only; about 2 minutes for the default grid):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. \\
      python benchmarks/comm.py --json comm.json
  ... python benchmarks/comm.py --layout rows --devices 8 --batch-per-device 64 \\
      --preset optimized --dump-hlo hlo/

On GPUs drop the XLA_FLAGS and JAX_PLATFORMS: the device counts above those
present are skipped. MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # Simulated CPU devices for the compile-only analysis; GPUs are unaffected.
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moment_jax import (
  NAMED_POLICIES,
  PRESET_NAMES,
  HeadConfig,
  MomentHead,
  NNXMomentHead,
  grid_graph,
  steps,
)
from moment_jax import sharding as shd

MB = 1e6
# An all-gather, all-reduce or reduce-scatter this large a fraction of the
# kernel is flagged, whatever it carries.
KERNEL_FRACTION = 0.1


def grid_shape(n_tokens: int) -> tuple[int, int]:
  """`(h, w)` with `h * w == n_tokens`, as square as possible (196 -> 14 x 14)."""
  h = max(d for d in range(1, math.isqrt(n_tokens) + 1) if n_tokens % d == 0)
  return h, n_tokens // h


def make_nnx_step(graphdef, tx, graph, batch_sh, token_grads):
  """NNX: the same step on state `{params, rest, opt_state}` (`nnx.split(model,
  nnx.Param, ...)`); the dropout draws from the model's own stream, `key` is unused."""

  def loss_fn(params, tokens, rest, targets):
    if batch_sh is not None:
      tokens = jax.lax.with_sharding_constraint(tokens, batch_sh)
    model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables of this trace
    loss = jnp.mean(jnp.square(model(tokens, graph).astype(jnp.float32) - targets))
    return loss, nnx.split(model, nnx.Param, ...)[2]

  def step(state, tokens, targets, key):
    del key
    (loss, rest), grads = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
      state["params"], tokens, state["rest"], targets
    )
    updates, opt_state = tx.update(grads[0], state["opt_state"], state["params"])
    new = dict(params=optax.apply_updates(state["params"], updates), rest=rest, opt_state=opt_state)
    return (new, loss, grads[1]) if token_grads else (new, loss)

  return step


def setup(
  api: str,
  preset: str,
  tx,
  graph,
  batch_sh,
  *,
  d_in: int,
  n_tokens: int,
  token_grads: bool = True,
  **overrides,
):
  """`(init, step, d_out)` of `api` ("linen" or "nnx") for the head of `preset`
  with `overrides`: `init(key) -> state`, `step` as `steps.make_fit_step`."""
  if api == "linen":
    head = MomentHead.from_preset(preset, **overrides)

    def init(key):
      v = head.init(key, jnp.zeros((1, n_tokens, d_in)), graph, train=False)
      return dict(params=v["params"], batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))

    return init, steps.make_fit_step(head, tx, graph, batch_sh, token_grads), head.d_out
  config = HeadConfig.from_preset(preset, **overrides)
  graphdefs = []

  def init_nnx(key):
    model = NNXMomentHead(
      d_in, config, rngs=nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1))
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    graphdefs.append(graphdef)
    return dict(params=params, rest=rest, opt_state=tx.init(params))

  jax.eval_shape(init_nnx, jax.random.key(0))
  return init_nnx, make_nnx_step(graphdefs[0], tx, graph, batch_sh, token_grads), config.d_out


def measure(
  preset: str, layout: str, data: int, model: int, batch_per_device: int, args: argparse.Namespace
) -> dict:
  """Compiles one step and reads its collectives and memory; returns a row."""
  graph = grid_graph(*grid_shape(args.tokens))
  tx = optax.adamw(1e-4)
  mesh = shd.make_mesh(data, model)
  rules = shd.head_rules(layout)
  batch = batch_per_device * data
  batch_sh, repl = shd.batch_sharding(mesh), shd.replicated(mesh)
  init, step_fn, d_out = setup(
    args.api,
    preset,
    tx,
    graph,
    batch_sh,
    d_in=args.dim,
    n_tokens=args.tokens,
    token_grads=args.token_grads,
    policy=args.policy,
    isqrt_chunk=args.chunk,
  )
  state = jax.eval_shape(init, jax.random.key(0))
  state_sh = shd.tree_shardings(state, mesh, rules)
  tokens = jax.ShapeDtypeStruct((batch, args.tokens, args.dim), jnp.float32)
  targets = jax.ShapeDtypeStruct((batch, d_out), jnp.float32)
  key = jax.eval_shape(lambda: jax.random.key(0))
  outs = (state_sh, repl, batch_sh) if args.token_grads else (state_sh, repl)
  t0 = time.perf_counter()
  with shd.use_layout(mesh, rules):
    step = jax.jit(
      step_fn,
      in_shardings=(state_sh, batch_sh, batch_sh, repl),
      out_shardings=outs,
      donate_argnums=0,
    )
    compiled = step.lower(state, tokens, targets, key).compile()
  seconds = time.perf_counter() - t0
  text = compiled.as_text()
  name = f"{args.api}_{preset}_{data}x{model}_b{batch_per_device}_{layout}"
  if args.dump_hlo:
    os.makedirs(args.dump_hlo, exist_ok=True)
    with open(os.path.join(args.dump_hlo, name + ".hlo.txt"), "w") as f:
      f.write(text)

  # Collectives over one device move nothing (XLA:CPU keeps a few, as copies).
  ops = [op for op in shd.collectives(text, data * model) if op.group > 1]
  kinds = {k: dict(bytes=0, wire=0.0, count=0) for k in shd.KINDS}
  for op in ops:
    kinds[op.kind]["bytes"] += op.bytes * op.count
    kinds[op.kind]["wire"] += op.wire
    kinds[op.kind]["count"] += op.count
  kernel_bytes = next(
    math.prod(leaf.shape) * leaf.dtype.itemsize
    for path, leaf in jax.tree_util.tree_flatten_with_path(state["params"])[0]
    if re.search(r"(^|/)proj/kernel(/value)?$", shd.path_str(path))
  )
  gathers = [op for op in ops if op.kind in ("all-gather", "all-reduce", "reduce-scatter")]
  largest = max(gathers, key=lambda op: op.bytes, default=None)
  memory = compiled.memory_analysis()
  return dict(
    name=name,
    api=args.api,
    preset=preset,
    layout=layout,
    mesh=f"{data}x{model}",
    data=data,
    model=model,
    batch_per_device=batch_per_device,
    global_batch=batch,
    policy=args.policy,
    chunk=args.chunk,
    token_grads=args.token_grads,
    dim=args.dim,
    tokens=args.tokens,
    collectives={k: v for k, v in kinds.items() if v["count"]},
    wire_bytes=shd.wire_bytes(ops),
    largest_gather_bytes=largest.bytes if largest else 0,
    largest_gather=largest.text if largest else None,
    kernel_sized=[op.text for op in gathers if op.bytes >= KERNEL_FRACTION * kernel_bytes],
    kernel_bytes=kernel_bytes,
    params_opt_bytes=shd.bytes_per_device(
      (state["params"], state["opt_state"]), (state_sh["params"], state_sh["opt_state"])
    ),
    temp_bytes=int(memory.temp_size_in_bytes) if memory is not None else None,
    compile_s=seconds,
  )


def print_row(r: dict) -> None:
  c = r["collectives"]
  cell = lambda k: f"{c[k]['bytes'] / MB:9.1f}" if k in c else f"{'-':>9}"
  print(
    f"{r['preset']:<10} {r['mesh']:>5} {r['batch_per_device']:>5} {r['layout']:<10} "
    + " ".join(cell(k) for k in shd.KINDS)
    + f" {r['wire_bytes'] / MB:9.1f} {r['largest_gather_bytes'] / MB:9.1f}"
    + f"{'!' if r['kernel_sized'] else ' '}"
    + f" {r['params_opt_bytes'] / MB:9.1f} {fmt(r['temp_bytes'])} {r['compile_s']:6.1f}",
    flush=True,
  )


def fmt(v):
  return f"{'-':>9}" if v is None else f"{v / MB:9.1f}"


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--api", choices=("linen", "nnx"), default="linen", help="the head's front end")
  ap.add_argument("--layout", nargs="+", choices=shd.LAYOUTS, default=list(shd.LAYOUTS))
  ap.add_argument(
    "--devices", nargs="+", type=int, default=[2, 4, 8], help="sizes of the data axis"
  )
  ap.add_argument("--model", type=int, default=1, help="size of the model axis")
  ap.add_argument(
    "--batch-per-device",
    nargs="+",
    type=int,
    default=[8, 64],
    help="samples per shard of the data axis",
  )
  ap.add_argument("--preset", nargs="+", choices=PRESET_NAMES, default=["optimized", "original"])
  ap.add_argument("--policy", default="float32", choices=sorted(NAMED_POLICIES))
  ap.add_argument("--chunk", type=int, default=None, help="isqrt_chunk of the head")
  ap.add_argument("--tokens", type=int, default=196, help="N (a grid h x w, as square as possible)")
  ap.add_argument("--dim", type=int, default=768, help="D")
  ap.add_argument(
    "--token-grads",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="also differentiate the tokens (a backbone under the head)",
  )
  ap.add_argument("--json", help="write the rows to this JSON file")
  ap.add_argument("--dump-hlo", help="write each compiled step's HLO text to this directory")
  args = ap.parse_args(argv)
  if min(args.devices + args.batch_per_device + [args.model]) < 1 or (args.chunk or 1) < 1:
    ap.error("--devices, --model, --batch-per-device and --chunk must be >= 1")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  available = jax.device_count()
  print(
    f"moment-jax comm: {available} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
    f"{args.api} head; "
    f"N={args.tokens}, D={args.dim}, policy {args.policy}, isqrt_chunk {args.chunk}, "
    f"token gradients {'on' if args.token_grads else 'off'}; compiled HLO, per device "
    f"and step, MB = 1e6 bytes"
  )
  print(
    f"{'preset':<10} {'mesh':>5} {'b/dev':>5} {'layout':<10} "
    + " ".join(f"{k:>9}" for k in ("all-red", "all-gath", "red-scat", "all-to-all", "permute"))
    + f" {'wire':>9} {'largest':>9}  {'p+opt':>9} {'temp':>9} {'comp s':>6}"
  )
  rows = []
  for preset in args.preset:
    for n in args.devices:
      if n * args.model > available:
        print(f"skipping {n}x{args.model}: {available} devices")
        continue
      for bpd in args.batch_per_device:
        for layout in args.layout:
          r = measure(preset, layout, n, args.model, bpd, args)
          rows.append(r)
          print_row(r)
  print(
    "collectives over one device left out; largest: the largest all-gather / all-reduce / "
    f"reduce-scatter; '!': at least {KERNEL_FRACTION:.0%} of the proj/kernel bytes"
  )
  if args.json:
    env = dict(
      jax=jax.__version__,
      platform=jax.devices()[0].platform,
      device_kind=jax.devices()[0].device_kind,
      devices=available,
      command=" ".join(sys.argv),
    )
    with open(args.json, "w") as f:
      json.dump(dict(environment=env, args=vars(args), rows=rows), f, indent=1)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
