"""The `moment-jax` command.

  moment-jax report [--preset NAME ...] [--batch 4] [--tokens 196] [--dim 768] [--json PATH]

For each preset: builds the head at the seed's size (B=4, N=196, D=768, a
14x14 grid graph), jit-compiles a training step (gradients with respect to
parameters and tokens), runs it once and prints parameters, feature length,
the compiled step's temp memory and the seed's figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from moment_jax import presets
from moment_jax.linen import MomentHead
from moment_jax.ops import feature_size, grid_graph
from moment_jax.steps import count_params, make_grad_step, variable_shapes

MB = 1e6


def default_graph(tokens: int) -> Any:
  """A 4-neighbour grid graph with self loops when `tokens` is a square, else None."""
  side = math.isqrt(tokens)
  return grid_graph(side, side) if side * side == tokens else None


def report_row(name: str, batch: int, tokens: int, dim: int, run: bool = True) -> dict[str, Any]:
  """Builds preset `name`, compiles (and runs) one training step; returns the row."""
  head = MomentHead.from_preset(name)
  graph = default_graph(tokens)
  shape = (batch, tokens, dim)
  shapes = variable_shapes(head, shape, graph)
  step = make_grad_step(head, graph, token_grad=True)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  t0 = time.perf_counter()
  compiled = step.lower(shapes["params"], shapes["batch_stats"],
                        jax.ShapeDtypeStruct(shape, jnp.float32), key).compile()
  mem = compiled.memory_analysis()
  row = {
      "preset": name,
      "params": count_params(shapes["params"]),
      "features": feature_size(dim, head.use_third_order, head.sketch_dim),
      "step_temp_mb": mem.temp_size_in_bytes / MB,
      "compile_s": time.perf_counter() - t0,
      "seed_mb": presets.SEED_MEMORY_MB.get(name, ""),
      "graph": graph is not None,
  }
  if run:
    variables = jax.jit(lambda k: head.init(k, jnp.zeros(shape), graph, train=False))(
        jax.random.key(0))
    tok = jax.random.normal(jax.random.key(1), shape)
    (loss, _), _ = compiled(variables["params"], variables["batch_stats"], tok,
                            jax.random.key(2))
    row["loss"] = float(loss)
    if not math.isfinite(row["loss"]):
      raise RuntimeError(f"preset {name}: the training step gave a non-finite loss")
  return row


def format_table(rows: list[dict[str, Any]], header: str) -> str:
  lines = [header,
           f"{'preset':<12} {'params':>13} {'F':>9} {'step temp MB':>13} "
           f"{'loss':>9} {'seed MB (PyTorch)':>18}"]
  for r in rows:
    loss = f"{r['loss']:.4f}" if "loss" in r else "-"
    lines.append(f"{r['preset']:<12} {r['params']:>13,} {r['features']:>9,} "
                 f"{r['step_temp_mb']:>13.2f} {loss:>9} {r['seed_mb']:>18}")
  return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> int:
  names = args.preset or list(presets.PRESET_NAMES)
  for n in names:
    presets.preset(n)  # unknown names fail before any work
  done: dict[tuple, dict[str, Any]] = {}
  rows = []
  for n in names:
    cfg = tuple(sorted(presets.preset(n).items()))
    row = dict(done[cfg]) if cfg in done else report_row(
        n, args.batch, args.tokens, args.dim, run=not args.no_run)
    row["preset"] = n
    done[cfg] = row
    rows.append(row)
  g = "14x14 grid graph" if default_graph(args.tokens) is not None else "no graph"
  header = (f"moment-jax report: B={args.batch}, N={args.tokens}, D={args.dim}, {g}, "
            f"float32, training step with parameter and token gradients, "
            f"{jax.devices()[0].platform.upper()} ({jax.devices()[0].device_kind})")
  print(format_table(rows, header))
  print("step temp: temp_size_in_bytes of the compiled step's memory_analysis(); "
        "seed MB: the PyTorch design's training-mode memory from the seed write-up "
        "(optimized / simplified), not comparable one to one.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"batch": args.batch, "tokens": args.tokens, "dim": args.dim,
                 "backend": jax.default_backend(), "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
  return 0


def _remat_arg(v: str) -> str | None:
  return None if v.lower() == "none" else v


def _chunk_arg(v: str) -> int | None:
  return None if v.lower() == "none" else int(v)


def memory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One row per preset x remat x policy x chunk x scenario."""
  import optax

  from moment_jax import memory

  shape = (args.batch, args.tokens, args.dim)
  graph = default_graph(args.tokens)
  names = args.preset or ["original", "optimized", "memory", "performance"]
  gpu = jax.default_backend() == "gpu" and not args.no_device_peak
  rows, tasks = [], []
  for name in names:
    for remat in args.remat:
      for policy in args.policy:
        for chunk in args.chunk:
          head = MomentHead.from_preset(name, remat_policy=remat, policy=policy,
                                        isqrt_chunk=chunk, d_reduce=args.d_reduce)
          head.validate()
          shapes = variable_shapes(head, shape, graph)
          params_mb = memory.nbytes(shapes["params"]) / MB
          key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
          tokens = jax.ShapeDtypeStruct(shape, jnp.float32)
          for token_grad in (False, True):
            row = {"preset": name, "remat": remat or "none", "policy": policy,
                   "chunk": chunk or "-", "token_grad": token_grad, "params_mb": params_mb}
            row["residuals_mb"] = memory.head_residual_bytes(head, shape, graph,
                                                             token_grad) / MB
            row["step_temp_mb"] = memory.compiled_memory(
                make_grad_step(head, graph, token_grad), shapes["params"],
                shapes["batch_stats"], tokens, key, jitted=True).temp / MB
            bill = memory.step_bill(head, shape, optax.adamw(1e-3), graph, token_grad)
            row["bill_mb"] = bill.total / MB
            row["bill"] = bill.as_mb()
            if gpu:
              tasks.append((row, head, token_grad))
            row["seed_mb"] = presets.SEED_MEMORY_MB.get(name, "") if not token_grad else ""
            rows.append(row)
  if tasks:  # each figure is a fresh process with its own allocator: run a few at once
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(args.jobs) as pool:
      peaks = pool.map(lambda t: memory.head_device_peaks(t[1], shape, graph, t[2]), tasks)
      for (row, _, _), p in zip(tasks, peaks):
        row.update(forward_act_mb=p["forward"] / MB, step_act_mb=p["step"] / MB,
                   device=p["device"])
  return rows


def format_memory(rows: list[dict[str, Any]], header: str) -> str:
  cols = [("preset", "<11", "preset"), ("remat", "<9", "remat"), ("policy", "<15", "policy"),
          ("chunk", ">5", "chunk"), ("params_mb", ">9.1f", "params"),
          ("residuals_mb", ">9.2f", "resid."), ("step_temp_mb", ">10.2f", "step temp"),
          ("forward_act_mb", ">9.2f", "fwd act"), ("step_act_mb", ">9.2f", "step act"),
          ("bill_mb", ">9.1f", "bill"), ("seed_mb", ">14", "seed (PyTorch)")]
  out = [header]
  for scenario in (False, True):
    out.append("")
    out.append("tokens WITH gradient (a backbone below: the real training case)" if scenario
               else "tokens WITHOUT gradient (the seed's own scenario: the head alone)")
    out.append(" ".join(format(t, f.split(".")[0].rstrip("f")) for _, f, t in cols))
    for r in rows:
      if r["token_grad"] != scenario:
        continue
      cells = []
      for k, f, _ in cols:
        v = r.get(k, "-")
        width = f.split(".")[0].rstrip("f")
        cells.append(format(v, f) if isinstance(v, float) else format(str(v), width))
      out.append(" ".join(cells))
  return "\n".join(out)


def cmd_memory(args: argparse.Namespace) -> int:
  rows = memory_rows(args)
  dev = jax.devices()[0]
  header = (f"moment-jax memory: B={args.batch}, N={args.tokens}, D={args.dim}, "
            f"{'14x14 grid graph' if default_graph(args.tokens) is not None else 'no graph'}, "
            f"{dev.platform.upper()} ({dev.device_kind}); MB = 1e6 bytes")
  print(format_memory(rows, header))
  print("params: parameter bytes; resid.: bytes the forward saves for the backward "
        "(parameters and inputs excluded); step temp: compiled temp of the gradient step; "
        "fwd act / step act: device peaks (GPU only) of the training forward and of "
        "forward+backward less the returned gradients; bill: parameters + gradients + "
        "AdamW state + inputs + activations of one optax step; seed: the PyTorch "
        "design's figures (optimized / simplified).")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"batch": args.batch, "tokens": args.tokens, "dim": args.dim,
                 "backend": jax.default_backend(), "device": dev.device_kind,
                 "rows": rows}, f, indent=2)
    print(f"wrote {args.json}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="moment-jax", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("report", help="build each preset, run a jitted training step, "
                     "print the memory table")
  r.add_argument("--preset", action="append", choices=presets.PRESET_NAMES,
                 help="preset to report (repeatable; default: all)")
  r.add_argument("--batch", type=int, default=4)
  r.add_argument("--tokens", type=int, default=196)
  r.add_argument("--dim", type=int, default=768)
  r.add_argument("--no-run", action="store_true", help="compile only, do not run the step")
  r.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
  r.set_defaults(func=cmd_report)

  m = sub.add_parser("memory", help="the seed's memory table, measured: presets x remat x "
                     "precision policies, with and without token gradients")
  m.add_argument("--preset", action="append", choices=presets.PRESET_NAMES,
                 help="preset (repeatable; default: the four distinct presets)")
  m.add_argument("--remat", nargs="+", type=_remat_arg, default=[None, "isqrt", "features"],
                 help="remat policies (default: none isqrt features)")
  m.add_argument("--policy", nargs="+", default=["float32", "bfloat16"],
                 help="precision policies (default: float32 bfloat16)")
  m.add_argument("--chunk", nargs="+", type=_chunk_arg, default=[None],
                 help="isqrt_chunk values ('none' or ints; default: none)")
  m.add_argument("--d-reduce", type=int, default=None, help="d_reduce of every head")
  m.add_argument("--batch", type=int, default=4)
  m.add_argument("--tokens", type=int, default=196)
  m.add_argument("--dim", type=int, default=768)
  m.add_argument("--no-device-peak", action="store_true",
                 help="skip the GPU device peaks (one fresh process per figure)")
  m.add_argument("--jobs", type=int, default=4, help="device-peak processes at once")
  m.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
  m.set_defaults(func=cmd_memory)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  for k in ("batch", "tokens", "dim"):
    if getattr(args, k, 1) < 1:
      print(f"moment-jax: --{k} must be >= 1", file=sys.stderr)
      return 2
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
