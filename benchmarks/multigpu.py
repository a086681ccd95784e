"""Multi-GPU scaling of the sharded training step: data axis x model axis.

Run on a GPU machine from the repository root (one call, a few minutes):

  PYTHONPATH=. python benchmarks/multigpu.py --out out/    # 1, 2, 4, 8 GPUs as available
  PYTHONPATH=. python benchmarks/multigpu.py --devices 1 8 --presets optimized
  PYTHONPATH=. python benchmarks/multigpu.py --layout rows columns replicated --meshes data

On a CPU, with simulated devices and small dimensions (a minute or two):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu PYTHONPATH=. \\
      python benchmarks/multigpu.py --dim 32 --tokens 16 --batch-per-device 4 \\
      --presets optimized original --devices 1 2 4 8 --steps 3

The step: `MomentHead.from_preset(preset, policy=--policy)` on tokens
[B, N, D] with a fixed grid graph (`grid_graph`, N = h x w), mean-square loss
to random targets, optax AdamW on the parameters, one `jax.jit` with in/out
shardings from `moment_jax.sharding.tree_shardings(state, mesh, rules)`, traced
inside `use_layout(mesh, rules)` with `rules = head_rules(--layout)`: the
layout of the projection kernel `proj/kernel` and its Adam moments ("columns",
the default: split by column over "model"; "rows": by row over "data" and by
column over "model", the features move instead of the gradient; "replicated":
whole everywhere), the rest replicated, the batch split over "data"
(`batch_sharding`), the state donated. Several --layout values run each mesh
once per layout.

For each preset and device count n it runs the mesh shapes (--meshes):

  data   n x 1      per-device batch --batch-per-device, global batch = that x n;
  model  1 x n      global batch = --batch-per-device (every device sees it all);
  mixed  n/2 x 2    global batch = --batch-per-device x n/2 (for n >= 4).

So the global batch is always --batch-per-device x (size of "data").

Columns: step time (median of --steps device-synchronised steps after
--check-steps + --warmup untimed ones), throughput (global batch / step time),
weak-scaling efficiency of the data-parallel rows (throughput / (n x the
1 x 1 throughput of the same layout)), per-device memory: parameters + optimizer state (bytes of
the shards device by device, the largest), temp (`temp_size_in_bytes` of the
compiled step's `memory_analysis()`, which for SPMD is per device) and, on
GPU, `peak_bytes_in_use` (the largest over the mesh's devices; a process-wide
high-water mark that cannot be reset, so an upper bound for rows after the
first on a device), and the loss check: the largest relative difference of
the first --check-steps losses against the same step on a 1 x 1 mesh with the
same global batch, initial state, data and dropout keys (run after all timed
rows, so its larger batches do not raise the peaks of the rows).
Exit status 1 when a loss check fails.

With 1 in --devices, the first 1 x 1 row ("rows" if listed) is followed by the
same step with no mesh at all (plain `jax.jit` on one device, no layout): one
line compares their step times and losses (the issue: the same speed within
3%, the same numbers).

Targets (the issue): efficiency >= 90% at 8 GPUs for data parallelism; with
the kernel sharded over "model", parameter+optimizer memory per device falls
as 1/model (up to the replicated remainder: biases, BatchNorm, the double
MLP's second Dense); with "rows" it falls as 1/devices. NCCL_NVLS_ENABLE is
read, never set (the environment sets 0: NVLink multicast off). Writes
multigpu.json under --out (default $OUT, else "."). MB = 1e6 bytes.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import flax
import jax
import jax.numpy as jnp
import optax

from moment_jax import NAMED_POLICIES, MomentHead, grid_graph, steps
from moment_jax import sharding as shd

MB = 1e6
MESHES = ("data", "model", "mixed")


# -- configuration --------------------------------------------------------------


def grid_shape(n_tokens):
  """`(h, w)` with `h * w == n_tokens`, as square as possible (196 -> 14 x 14)."""
  h = max(d for d in range(1, math.isqrt(n_tokens) + 1) if n_tokens % d == 0)
  return h, n_tokens // h


def mesh_shapes(n, meshes):
  """`[(shape name, data, model)]` for `n` devices, without duplicates."""
  shapes = {"data": (n, 1), "model": (1, n), "mixed": (n // 2, 2) if n >= 4 else None}
  out, seen = [], set()
  for name in meshes:
    shape = shapes[name]
    if shape is not None and shape not in seen:
      seen.add(shape)
      out.append((name, *shape))
  return out


def device_counts(wanted, available):
  counts = []
  for n in wanted:
    if n > available:
      print(f"skipping {n} devices: only {available} available")
    else:
      counts.append(n)
  return counts


# -- the step -------------------------------------------------------------------


def make_init(head, tx, tokens_shape, graph):
  """`key -> state`: parameters, BatchNorm statistics and AdamW state."""

  def init(key):
    v = head.init(key, jnp.zeros((1,) + tokens_shape[1:]), graph, train=False)
    return dict(params=v["params"], batch_stats=v["batch_stats"], opt_state=tx.init(v["params"]))

  return init


def make_batch(global_batch, n_tokens, dim, d_out, sharding, seed):
  """Tokens `[B, N, D]` and targets `[B, d_out]`, split over "data". Partitionable
  threefry draws the same numbers for any sharding."""

  def gen(key):
    k1, k2 = jax.random.split(key)
    return (
      jax.random.normal(k1, (global_batch, n_tokens, dim)),
      jax.random.normal(k2, (global_batch, d_out)),
    )

  return jax.jit(gen, out_shardings=(sharding, sharding))(jax.random.key(seed))


# -- memory ---------------------------------------------------------------------


def per_device_bytes(tree):
  """Largest over devices of the bytes of `tree`'s shards on that device."""
  per = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for s in leaf.addressable_shards:
      per[s.device.id] += s.data.nbytes
  return max(per.values(), default=0)


def full_bytes(tree):
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def device_peak(devices):
  """Largest `peak_bytes_in_use` over `devices`, or None where not reported."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


# -- one run --------------------------------------------------------------------


def run(head, tx, graph, args, data, model, total_steps, timed, layout="columns"):
  """Initialises, compiles and runs the step on a `data x model` mesh with the
  head's `layout`; `layout=None`: on one device with no mesh (`data` = 1).

  Returns a dict of losses (every step), step times (the last `args.steps`
  when `timed`) and memory figures.
  """
  mesh = shd.make_mesh(data, model)
  global_batch = args.batch_per_device * data
  tokens_shape = (global_batch, args.tokens, args.dim)
  init = make_init(head, tx, tokens_shape, graph)
  key = jax.random.key(args.seed)
  rules = shd.head_rules(layout or "replicated")
  state_sh = shd.tree_shardings(jax.eval_shape(init, key), mesh, rules)
  batch_sh, repl = shd.batch_sharding(mesh), shd.replicated(mesh)
  if layout is None:  # placed on the mesh's one device, compiled without shardings
    state_sh = jax.tree.map(lambda _: repl, state_sh)
  state = jax.jit(init, out_shardings=state_sh)(key)
  tokens, targets = make_batch(
    global_batch, args.tokens, args.dim, head.d_out, batch_sh, args.seed + 1
  )
  keys = [
    jax.device_put(jax.random.fold_in(jax.random.key(args.seed + 2), i), repl)
    for i in range(total_steps)
  ]
  r = dict(
    mesh=f"{data}x{model}",
    data=data,
    model=model,
    devices=data * model,
    global_batch=global_batch,
    params_bytes=per_device_bytes(state["params"]),
    opt_bytes=per_device_bytes(state["opt_state"]),
    batch_stats_bytes=per_device_bytes(state["batch_stats"]),
    params_opt_full_bytes=full_bytes((state["params"], state["opt_state"])),
  )
  r["params_opt_bytes"] = r["params_bytes"] + r["opt_bytes"]
  kernels = [
    leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path((state["params"], state["opt_state"]))[0]
    if shd.path_str(path).endswith("proj/kernel")
  ]
  r["kernel_share"] = per_device_bytes(kernels) / full_bytes(kernels)  # kernel, mu, nu

  t0 = time.perf_counter()
  if layout is None:
    step = jax.jit(steps.make_fit_step(head, tx, graph), donate_argnums=0)
    compiled = step.lower(state, tokens, targets, keys[0]).compile()
  else:
    with shd.use_layout(mesh, rules):
      step = jax.jit(
        steps.make_fit_step(head, tx, graph, batch_sh),
        in_shardings=(state_sh, batch_sh, batch_sh, repl),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
      )
      compiled = step.lower(state, tokens, targets, keys[0]).compile()
  r["compile_s"] = time.perf_counter() - t0
  m = compiled.memory_analysis()
  if m is not None:
    r.update(
      temp_bytes=int(m.temp_size_in_bytes),
      argument_bytes=int(m.argument_size_in_bytes),
      output_bytes=int(m.output_size_in_bytes),
      alias_bytes=int(m.alias_size_in_bytes),
    )

  losses, times = [], []
  for i in range(total_steps):
    t = time.perf_counter()
    state, loss = compiled(state, tokens, targets, keys[i])
    jax.block_until_ready((state, loss))
    times.append(time.perf_counter() - t)
    losses.append(float(loss))
  r["losses"] = losses
  if timed:
    r["step_times_s"] = times[-args.steps :]
    r["step_ms"] = 1e3 * statistics.median(r["step_times_s"])
    r["samples_per_s"] = global_batch / (r["step_ms"] / 1e3)
  r["peak_bytes"] = device_peak(mesh.devices.flat)
  del state, tokens, targets, compiled
  return r


def rel_diff(got, want):
  return max(abs(g - w) / max(abs(w), 1e-30) for g, w in zip(got, want))


# -- reporting ------------------------------------------------------------------


def environment():
  dev = jax.devices()[0]
  return dict(
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    platform=dev.platform,
    device_kind=dev.device_kind,
    device_count=jax.device_count(),
    jax=jax.__version__,
    jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
    flax=flax.__version__,
    optax=optax.__version__,
    python=platform.python_version(),
    XLA_FLAGS=os.environ.get("XLA_FLAGS"),
    NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE"),
    command=" ".join(sys.argv),
  )


def fmt(v, spec, missing="-"):
  return missing if v is None else format(v, spec)


def print_table(rows):
  hdr = (
    f"{'preset':<10} {'layout':<10} {'mesh':>5} {'dev':>3} {'batch':>6} {'step ms':>9} "
    f"{'samples/s':>10} {'eff':>6} {'p+opt MB/dev':>12} {'temp MB/dev':>11} "
    f"{'peak MB/dev':>11} {'loss rel diff':>13}"
  )
  print(hdr)
  for r in rows:
    if "error" in r:
      what = "skipped" if r.get("skipped") else "error"
      print(
        f"{r['preset']:<10} {r['layout']:<10} {r['mesh']:>5} {r['devices']:>3}  "
        f"{what}: {r['error']}"
      )
      continue
    mb = lambda k: r[k] / MB if r.get(k) is not None else None
    diff = "ref" if r.get("loss_is_ref") else fmt(r.get("loss_rel_diff"), "13.1e", "n/a")
    print(
      f"{r['preset']:<10} {r['layout']:<10} {r['mesh']:>5} {r['devices']:>3} "
      f"{r['global_batch']:>6} "
      f"{r['step_ms']:9.2f} {r['samples_per_s']:10.1f} {fmt(r.get('efficiency'), '6.1%'):>6} "
      f"{r['params_opt_bytes'] / MB:12.2f} {fmt(mb('temp_bytes'), '11.2f'):>11} "
      f"{fmt(mb('peak_bytes'), '11.2f'):>11} {diff:>13}"
    )


def targets(rows, args):
  """The issue's two targets, row by row; returns a list of dicts (also printed)."""
  out, gpu = [], jax.devices()[0].platform == "gpu"
  ok_rows = [r for r in rows if "error" not in r]
  for preset in args.presets:
    pr = [r for r in ok_rows if r["preset"] == preset]
    dp = [r for r in pr if r["model"] == 1 and r.get("efficiency") is not None]
    if dp:
      r = max(dp, key=lambda r: r["devices"])
      t = dict(
        preset=preset,
        target="weak-scaling efficiency >= 90% (data parallel, 8 GPUs)",
        devices=r["devices"],
        value=r["efficiency"],
        met=r["efficiency"] >= 0.9 if r["devices"] == 8 and gpu else None,
      )
      out.append(t)
      if not gpu:
        note = " (not judged: not GPUs)"
      elif t["met"] is None:
        note = " (the target is at 8 devices: not judged)"
      else:
        note = " (target >= 90%: " + ("met)" if t["met"] else "MISSED)")
      print(
        f"{preset}: data-parallel efficiency at {r['devices']} devices: {r['efficiency']:.1%}{note}"
      )
    for r in pr:
      one = next((o for o in pr if o["devices"] == 1 and o["layout"] == r["layout"]), None)
      ideal = kernel_share(r["layout"], r["data"], r["model"])
      if ideal == 1 or one is None:
        continue
      share = r["params_opt_bytes"] / one["params_opt_bytes"]
      out.append(
        dict(
          preset=preset,
          target=f"params+opt per device ~ {ideal:.4f}",
          layout=r["layout"],
          mesh=r["mesh"],
          value=share,
          ideal=ideal,
          kernel_share=r["kernel_share"],
          met=r["kernel_share"] == ideal,
        )
      )
      print(
        f"{preset}: {r['layout']} {r['mesh']}: params+opt per device {share:.4f} of one "
        f"device's (ideal {ideal:.4f}; the kernel and its moments: "
        f"{r['kernel_share']:.4f})"
      )
  return out


def kernel_share(layout, data, model):
  """The fraction of the kernel (and of each Adam moment) one device holds."""
  return {"replicated": 1, "columns": 1 / model, "rows": 1 / (data * model)}[layout]


def no_mesh_line(r, ref):
  """The 1 x 1 mesh row `r` against the same step with no mesh `ref` (printed)."""
  ratio = r["step_ms"] / ref["step_ms"] - 1
  diff = rel_diff(r["losses"], ref["losses"])
  same = "identical" if r["losses"] == ref["losses"] else f"max rel diff {diff:.1e}"
  text = (
    f"{r['preset']}: {r['layout']} on a 1x1 mesh vs no mesh: {r['step_ms']:.2f} vs "
    f"{ref['step_ms']:.2f} ms/step ({ratio:+.1%}; the issue: within 3%), losses {same}"
  )
  print(text, flush=True)
  return dict(
    text=text,
    preset=r["preset"],
    layout=r["layout"],
    mesh_ms=r["step_ms"],
    no_mesh_ms=ref["step_ms"],
    ratio=ratio,
    loss_rel_diff=diff,
    identical=r["losses"] == ref["losses"],
    within_3pct=abs(ratio) <= 0.03,
  )


# -- main -----------------------------------------------------------------------


def plan(args, graph, tx):
  """Per-device parameters + AdamW state of `1 x model` meshes, from shapes
  alone (`jax.eval_shape` and the sharding rules): no devices needed."""
  print(
    f"plan (shapes only): parameters + AdamW state per device, N={args.tokens}, "
    f"D={args.dim}, model axis 1..8"
  )
  for preset in args.presets:
    head = MomentHead.from_preset(preset, policy=args.policy)
    state = jax.eval_shape(
      make_init(head, tx, (1, args.tokens, args.dim), graph), jax.random.key(0)
    )
    specs = shd.partition_specs(state, shd.head_rules(args.layout[0]))
    leaves = jax.tree.leaves(state)
    split = [
      ("model" in tuple(sp))
      for sp in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    ]
    full = sum(l.size * l.dtype.itemsize for l in leaves)
    cells = []
    for m in (1, 2, 4, 8):
      per = sum(l.size * l.dtype.itemsize / (m if sp else 1) for l, sp in zip(leaves, split))
      cells.append(f"1x{m} {per / 1e6:8.1f} MB ({per / full:.4f})")
    print(f"  {preset:10} " + " | ".join(cells))


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", nargs="+", default=["optimized", "original"])
  ap.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8])
  ap.add_argument(
    "--layout",
    nargs="+",
    choices=shd.LAYOUTS,
    default=["columns"],
    help="the head's layouts (sharding.head_rules), each mesh runs each",
  )
  ap.add_argument(
    "--meshes",
    "--layouts",
    nargs="+",
    choices=MESHES,
    default=list(MESHES),
    dest="meshes",
    help="mesh shapes (--layouts: the former name)",
  )
  ap.add_argument(
    "--no-mesh-check",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="after the first 1x1 row, the same step with no mesh (one line)",
  )
  ap.add_argument(
    "--batch-per-device", type=int, default=64, help="batch per shard of the data axis"
  )
  ap.add_argument("--tokens", type=int, default=196, help="N (a grid h x w, as square as possible)")
  ap.add_argument("--dim", type=int, default=768, help="D")
  ap.add_argument("--steps", type=int, default=10, help="timed steps (median)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the checked ones")
  ap.add_argument("--check-steps", type=int, default=3, help="losses compared with one device")
  ap.add_argument("--rtol", type=float, default=1e-4, help="loss check tolerance (relative)")
  ap.add_argument(
    "--policy",
    default="float32",
    choices=sorted(NAMED_POLICIES),
    help="precision policy of the head (float32: HIGHEST matmuls)",
  )
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument(
    "--time-limit",
    type=float,
    default=540.0,
    help="seconds: timed rows start only before 80%% of it, the "
    "single-device reference runs before all of it",
  )
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument(
    "--plan",
    action="store_true",
    help="only print per-device parameter + optimizer memory from shapes",
  )
  args = ap.parse_args()
  if min(args.steps, args.check_steps, args.batch_per_device) < 1 or args.warmup < 0:
    ap.error("--steps, --check-steps and --batch-per-device must be >= 1, --warmup >= 0")
  return args


def main():
  args = parse_args()
  t_start = time.time()
  env = environment()
  h, w = grid_shape(args.tokens)
  graph = grid_graph(h, w)
  tx = optax.adamw(args.lr)
  print(
    f"moment-jax multigpu: {env['device_count']} x {env['device_kind']} ({env['platform']}), "
    f"jax {env['jax']}, flax {env['flax']}, optax {env['optax']}, {env['date']}"
  )
  print(
    f"N={args.tokens} ({h}x{w} grid graph), D={args.dim}, policy {args.policy}, AdamW "
    f"lr {args.lr}, batch per data shard {args.batch_per_device}, {args.steps} timed steps "
    f"after {args.check_steps} checked + {args.warmup} warm-up; "
    f"NCCL_NVLS_ENABLE={env['NCCL_NVLS_ENABLE']}",
    flush=True,
  )
  if args.plan:
    plan(args, graph, tx)
    return
  counts = device_counts(args.devices, jax.device_count())

  rows, refs, heads, no_mesh = [], {}, {}, []
  total_steps = args.check_steps + args.warmup + args.steps
  check_layout = "rows" if "rows" in args.layout else args.layout[0]
  for preset in args.presets:
    head = heads[preset] = MomentHead.from_preset(preset, policy=args.policy)
    for n in counts:
      for shape, data, model in mesh_shapes(n, args.meshes):
        for layout in args.layout:
          base = dict(
            preset=preset,
            layout=layout,
            shape=shape,
            mesh=f"{data}x{model}",
            data=data,
            model=model,
            devices=n,
          )
          if time.time() - t_start > 0.8 * args.time_limit:
            print(
              f"skipping {preset} {layout} {data}x{model}: past 80% of --time-limit", flush=True
            )
            rows.append(dict(base, error="past 80% of --time-limit", skipped=True))
            continue
          try:
            r = dict(
              base,
              **run(head, tx, graph, args, data, model, total_steps, timed=True, layout=layout),
            )
          except Exception as e:  # an OOM or a bad layout costs one row, not the run
            traceback.print_exc()
            rows.append(dict(base, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            continue
          if n == 1 and (preset, r["global_batch"]) not in refs:
            refs[(preset, r["global_batch"])] = r["losses"][: args.check_steps]
            r["loss_is_ref"] = True
          rows.append(r)
          print(
            f"{preset} {layout} {data}x{model}: {r['step_ms']:.2f} ms/step, compiled in "
            f"{r['compile_s']:.1f} s",
            flush=True,
          )
          if n == 1 and layout == check_layout and args.no_mesh_check:
            ref = run(head, tx, graph, args, 1, 1, total_steps, timed=True, layout=None)
            no_mesh.append(no_mesh_line(r, ref))

  # single-device references for the larger global batches, after every timed row
  for r in rows:
    if "error" in r:
      continue
    k = (r["preset"], r["global_batch"])
    if k not in refs:
      if time.time() - t_start > args.time_limit:
        print(f"no reference for {k}: past --time-limit", flush=True)
        refs[k] = None
      else:
        print(f"reference: {k[0]} on 1 device, global batch {k[1]}", flush=True)
        try:
          ref_args = argparse.Namespace(**{**vars(args), "batch_per_device": k[1]})
          refs[k] = run(heads[k[0]], tx, graph, ref_args, 1, 1, args.check_steps, timed=False)[
            "losses"
          ]
        except Exception as e:
          traceback.print_exc()
          print(f"no reference for {k}: {type(e).__name__}", flush=True)
          refs[k] = None
    if refs[k] is not None:
      r["ref_losses"] = refs[k]
      r["loss_rel_diff"] = rel_diff(r["losses"][: args.check_steps], refs[k])
      r["loss_ok"] = r["loss_rel_diff"] <= args.rtol

  for r in rows:  # weak-scaling efficiency of the data-parallel rows
    one = next(
      (
        o
        for o in rows
        if o["preset"] == r["preset"]
        and o["mesh"] == "1x1"
        and o["layout"] == r["layout"]
        and "error" not in o
      ),
      None,
    )
    if "error" not in r and r["model"] == 1 and one is not None:
      r["efficiency"] = r["samples_per_s"] / (r["devices"] * one["samples_per_s"])

  print(
    f"\nstep ms: median; eff: samples/s / (devices x 1x1 samples/s), data-parallel rows; "
    f"p+opt: parameters + AdamW state on one device; temp: compiled step's temp bytes per "
    f"device; peak: GPU peak_bytes_in_use, process high-water mark; loss rel diff: first "
    f"{args.check_steps} losses vs the 1x1 mesh at the same global batch (tolerance "
    f"{args.rtol:g}); MB = 1e6 bytes"
  )
  print_table(rows)
  print()
  goals = targets(rows, args)
  for line in no_mesh:
    print(line["text"])
  failed = [r for r in rows if r.get("loss_ok") is False]
  unchecked = [r for r in rows if "error" not in r and "loss_ok" not in r]
  print(
    f"loss check: {'FAIL' if failed else 'pass'} ({len(failed)} failed, "
    f"{len(unchecked)} unchecked, tolerance {args.rtol:g})"
  )

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "multigpu.json")
  with open(path, "w") as f:
    json.dump(
      dict(
        environment=env,
        args=vars(args),
        grid=[h, w],
        rows=rows,
        targets=goals,
        no_mesh=no_mesh,
        seconds=time.time() - t_start,
      ),
      f,
      indent=1,
    )
  print(f"wrote {path} in {time.time() - t_start:.0f} s")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
