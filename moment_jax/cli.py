"""The `moment-jax` command.

  moment-jax report [--preset NAME ...] [--batch 4] [--tokens 196] [--dim 768] [--json PATH]
  moment-jax memory [--preset NAME ...] [--remat ...] [--policy ...] [--chunk ...] [...]
  moment-jax convert SRC DST [--preset NAME] [--d-in D] [--set key=value ...] [--prefix P]
                     [--overwrite]

`report` builds each preset at the seed's size (B=4, N=196, D=768, a 14x14
grid graph), jit-compiles a training step (gradients with respect to
parameters and tokens), runs it once and prints parameters, feature length,
the compiled step's temp memory and the seed's figure. `memory` measures the
seed's memory table. `convert` turns a PyTorch checkpoint of the head into an
orbax checkpoint directory with the head's configuration beside it, or back
(`moment_jax.convert`). `moment-jax COMMAND --help` lists every option.

Errors a user can fix (a bad file, a mismatched checkpoint) print
`moment-jax COMMAND: error: ...` to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from moment_jax import convert, presets
from moment_jax.config import FIELDS, HeadConfig
from moment_jax.linen import MomentHead
from moment_jax.ops import feature_size, grid_graph
from moment_jax.precision import NAMED_POLICIES, get_policy
from moment_jax.remat import PIPELINE_POLICIES, resolve_remat
from moment_jax.steps import count_params, make_grad_step, variable_shapes

__all__ = ["build_parser", "main"]

MB = 1e6

# Training-mode memory of the PyTorch design at B=4, N=196, D=768, from the
# seed's write-up (MB). "optimized" and "balanced" are the same configuration.
_SEED_MEMORY_MB = types.MappingProxyType(
  {
    "original": "~150",
    "optimized": "91.18 / 56.84",
    "balanced": "91.18 / 56.84",
  }
)


def _default_graph(tokens: int) -> Any:
  """A 4-neighbour grid graph with self loops when `tokens` is a square, else None."""
  side = math.isqrt(tokens)
  return grid_graph(side, side) if side * side == tokens else None


def _report_row(name: str, batch: int, tokens: int, dim: int, run: bool = True) -> dict[str, Any]:
  """Builds preset `name`, compiles (and runs) one training step; returns the row."""
  head = MomentHead.from_preset(name)
  graph = _default_graph(tokens)
  shape = (batch, tokens, dim)
  shapes = variable_shapes(head, shape, graph)
  step: Any = make_grad_step(head, graph, token_grad=True)  # a jitted function
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  t0 = time.perf_counter()
  compiled = step.lower(
    shapes["params"], shapes["batch_stats"], jax.ShapeDtypeStruct(shape, jnp.float32), key
  ).compile()
  mem = compiled.memory_analysis()
  row = {
    "preset": name,
    "params": count_params(shapes["params"]),
    "features": feature_size(dim, head.use_third_order, head.sketch_dim),
    "step_temp_mb": mem.temp_size_in_bytes / MB,
    "compile_s": time.perf_counter() - t0,
    "seed_mb": _SEED_MEMORY_MB.get(name, ""),
    "graph": graph is not None,
  }
  if run:
    variables = jax.jit(lambda k: head.init(k, jnp.zeros(shape), graph, train=False))(
      jax.random.key(0)
    )
    tok = jax.random.normal(jax.random.key(1), shape)
    (loss, _), _ = compiled(variables["params"], variables["batch_stats"], tok, jax.random.key(2))
    row["loss"] = float(loss)
    if not math.isfinite(row["loss"]):
      raise RuntimeError(f"preset {name}: the training step gave a non-finite loss")
  return row


def _format_table(rows: list[dict[str, Any]], header: str) -> str:
  lines = [
    header,
    f"{'preset':<12} {'params':>13} {'F':>9} {'step temp MB':>13} "
    f"{'loss':>9} {'seed MB (PyTorch)':>18}",
  ]
  for r in rows:
    loss = f"{r['loss']:.4f}" if "loss" in r else "-"
    lines.append(
      f"{r['preset']:<12} {r['params']:>13,} {r['features']:>9,} "
      f"{r['step_temp_mb']:>13.2f} {loss:>9} {r['seed_mb']:>18}"
    )
  return "\n".join(lines)


def _cmd_report(args: argparse.Namespace) -> int:
  names = args.preset or list(presets.PRESET_NAMES)
  for n in names:
    presets.preset(n)  # unknown names fail before any work
  done: dict[tuple, dict[str, Any]] = {}
  rows = []
  for n in names:
    cfg = tuple(sorted(presets.preset(n).items()))
    row = (
      dict(done[cfg])
      if cfg in done
      else _report_row(n, args.batch, args.tokens, args.dim, run=not args.no_run)
    )
    row["preset"] = n
    done[cfg] = row
    rows.append(row)
  g = "14x14 grid graph" if _default_graph(args.tokens) is not None else "no graph"
  header = (
    f"moment-jax report: B={args.batch}, N={args.tokens}, D={args.dim}, {g}, "
    f"float32, training step with parameter and token gradients, "
    f"{jax.devices()[0].platform.upper()} ({jax.devices()[0].device_kind})"
  )
  print(_format_table(rows, header))
  print(
    "step temp: temp_size_in_bytes of the compiled step's memory_analysis(); "
    "seed MB: the PyTorch design's training-mode memory from the seed write-up "
    "(optimized / simplified), not comparable one to one."
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "batch": args.batch,
          "tokens": args.tokens,
          "dim": args.dim,
          "backend": jax.default_backend(),
          "rows": rows,
        },
        f,
        indent=2,
      )
    print(f"wrote {args.json}")
  return 0


def _memory_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
  """One row per preset x remat x policy x chunk x scenario."""
  import optax

  from moment_jax import memory

  shape = (args.batch, args.tokens, args.dim)
  graph = _default_graph(args.tokens)
  names = args.preset or ["original", "optimized", "memory", "performance"]
  gpu = jax.default_backend() == "gpu" and not args.no_device_peak
  rows, tasks = [], []
  for name in names:
    for remat in args.remat:
      for policy in args.policy:
        for chunk in args.chunk:
          head = MomentHead.from_preset(
            name, remat_policy=remat, policy=policy, isqrt_chunk=chunk, d_reduce=args.d_reduce
          )
          head.validate()
          shapes = variable_shapes(head, shape, graph)
          params_mb = memory.nbytes(shapes["params"]) / MB
          key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
          tokens = jax.ShapeDtypeStruct(shape, jnp.float32)
          for token_grad in (False, True):
            row = {
              "preset": name,
              "remat": remat or "none",
              "policy": policy,
              "chunk": chunk or "-",
              "token_grad": token_grad,
              "params_mb": params_mb,
            }
            row["residuals_mb"] = memory.head_residual_bytes(head, shape, graph, token_grad) / MB
            row["step_temp_mb"] = (
              memory.compiled_memory(
                make_grad_step(head, graph, token_grad),
                shapes["params"],
                shapes["batch_stats"],
                tokens,
                key,
                jitted=True,
              ).temp
              / MB
            )
            bill = memory.step_bill(head, shape, optax.adamw(1e-3), graph, token_grad)
            row["bill_mb"] = bill.total / MB
            row["bill"] = bill.as_mb()
            if gpu:
              tasks.append((row, head, token_grad))
            row["seed_mb"] = _SEED_MEMORY_MB.get(name, "") if not token_grad else ""
            rows.append(row)
  if tasks:  # each figure is a fresh process with its own allocator: run a few at once
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
      peaks = pool.map(lambda t: memory.head_device_peaks(t[1], shape, graph, t[2]), tasks)
      for (row, _, _), p in zip(tasks, peaks):
        row.update(forward_act_mb=p["forward"] / MB, step_act_mb=p["step"] / MB, device=p["device"])
  return rows


def _format_memory(rows: list[dict[str, Any]], header: str) -> str:
  cols = [
    ("preset", "<11", "preset"),
    ("remat", "<9", "remat"),
    ("policy", "<15", "policy"),
    ("chunk", ">5", "chunk"),
    ("params_mb", ">9.1f", "params"),
    ("residuals_mb", ">9.2f", "resid."),
    ("step_temp_mb", ">10.2f", "step temp"),
    ("forward_act_mb", ">9.2f", "fwd act"),
    ("step_act_mb", ">9.2f", "step act"),
    ("bill_mb", ">9.1f", "bill"),
    ("seed_mb", ">14", "seed (PyTorch)"),
  ]
  out = [header]
  for scenario in (False, True):
    out.append("")
    out.append(
      "tokens WITH gradient (a backbone below: the real training case)"
      if scenario
      else "tokens WITHOUT gradient (the seed's own scenario: the head alone)"
    )
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


def _cmd_memory(args: argparse.Namespace) -> int:
  rows = _memory_rows(args)
  dev = jax.devices()[0]
  header = (
    f"moment-jax memory: B={args.batch}, N={args.tokens}, D={args.dim}, "
    f"{'14x14 grid graph' if _default_graph(args.tokens) is not None else 'no graph'}, "
    f"{dev.platform.upper()} ({dev.device_kind}); MB = 1e6 bytes"
  )
  print(_format_memory(rows, header))
  print(
    "params: parameter bytes; resid.: bytes the forward saves for the backward "
    "(parameters and inputs excluded); step temp: compiled temp of the gradient step; "
    "fwd act / step act: device peaks (GPU only) of the training forward and of "
    "forward+backward less the returned gradients; bill: parameters + gradients + "
    "AdamW state + inputs + activations of one optax step; seed: the PyTorch "
    "design's figures (optimized / simplified)."
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "batch": args.batch,
          "tokens": args.tokens,
          "dim": args.dim,
          "backend": jax.default_backend(),
          "device": dev.device_kind,
          "rows": rows,
        },
        f,
        indent=2,
      )
    print(f"wrote {args.json}")
  return 0


# -- convert ----------------------------------------------------------------------------


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
  """`--set key=value` pairs as `HeadConfig` overrides; values read as JSON when they
  parse (`3`, `0.5`, `true`, `null`), else kept as strings (`bfloat16`, `features`)."""
  out: dict[str, Any] = {}
  for item in items:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"--set: expected key=value, got {item!r}")
    if key not in FIELDS:
      raise ValueError(f"--set: unknown field {key!r}; valid fields are {', '.join(FIELDS)}")
    if key in out:
      raise ValueError(f"--set: {key} given twice")
    try:
      out[key] = json.loads(text)
    except ValueError:
      out[key] = None if text in ("None", "none") else text
  return out


def _head_config(args: argparse.Namespace) -> HeadConfig | None:
  """The configuration `--preset` and `--set` give, or None without `--preset`."""
  overrides = _parse_set(args.set)
  if args.preset is None:
    if overrides:
      raise ValueError("--set changes a preset's configuration: give --preset too")
    return None
  cfg = HeadConfig.from_preset(args.preset, **overrides)
  cfg.validate()
  return cfg


def _refuse_existing(dst: str, overwrite: bool) -> None:
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst}: exists; pass --overwrite to replace it")


def _file_to_orbax(args: argparse.Namespace, cfg: HeadConfig | None) -> str:
  """SRC a PyTorch weights file, DST an orbax directory; returns the report line."""
  if os.path.splitext(args.dst)[1].lower() in convert.FILE_SUFFIXES:
    raise ValueError(
      f"{args.dst}: a PyTorch checkpoint converts to an orbax checkpoint "
      f"directory; give DST without a file suffix"
    )
  if cfg is None:
    raise ValueError(
      f"--preset is required for a PyTorch checkpoint: the configuration it "
      f"was trained with ({', '.join(presets.PRESET_NAMES)})"
    )
  _refuse_existing(args.dst, args.overwrite)
  state = convert.read_state_dict(args.src, args.prefix)
  variables = convert.torch_to_flax(state, cfg, d_in=args.d_in)
  counter = state.get("mlp.1.num_batches_tracked")
  convert.save(
    args.dst,
    variables,
    cfg,
    preset=args.preset,
    overwrite=args.overwrite,
    num_batches_tracked=None if counter is None else int(counter),
  )
  meta = convert.metadata(args.dst) or {}
  changed = ", ".join(f"{k}={v}" for k, v in meta.get("overrides", {}).items())
  return (
    f"wrote {args.dst}: orbax checkpoint (params, batch_stats) and "
    f"{convert.CONFIG_FILE}; preset {args.preset}{f' ({changed})' if changed else ''}, "
    f"d_in={meta.get('d_in')}, {count_params(variables['params']):,} parameters"
  )


def _orbax_to_file(args: argparse.Namespace, cfg: HeadConfig | None) -> str:
  """SRC an orbax directory, DST a `.pt`/`.safetensors`/`.npz` file; returns the report line."""
  if os.path.splitext(args.dst)[1].lower() not in convert.FILE_SUFFIXES:
    raise ValueError(
      f"{args.dst}: SRC is an orbax checkpoint, so DST is a PyTorch weights "
      f"file: end it in {', '.join(convert.FILE_SUFFIXES)}"
    )
  _refuse_existing(args.dst, args.overwrite)
  meta = convert.metadata(args.src) or {}
  cfg, variables = convert.load(args.src, cfg, prefix=args.prefix)
  d_in = convert.token_width(variables, cfg)
  if args.d_in is not None and args.d_in != d_in:
    raise ValueError(f"--d-in: {args.d_in}, but the weights in {args.src} are for d_in={d_in}")
  convert.save_torch_checkpoint(
    args.dst,
    variables,
    cfg,
    overwrite=args.overwrite,
    num_batches_tracked=meta.get("num_batches_tracked") or 0,
  )
  return (
    f"wrote {args.dst}: a state_dict for moment_jax.torch_reference.MomentHead(d_in="
    f"{d_in}, ...) and load_state_dict(strict=True), "
    f"{count_params(variables['params']):,} parameters"
  )


def _cmd_convert(args: argparse.Namespace) -> int:
  if not os.path.exists(args.src):
    raise FileNotFoundError(f"{args.src}: no such file or directory")
  if os.path.exists(args.dst) and os.path.samefile(args.src, args.dst):
    raise ValueError(f"{args.dst}: DST is SRC")
  cfg = _head_config(args)
  if os.path.isdir(args.src):
    print(_orbax_to_file(args, cfg))
  else:
    print(_file_to_orbax(args, cfg))
  return 0


# -- parser -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < 1:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
  return value


def _remat_arg(text: str) -> str | None:
  value = None if text.lower() == "none" else text
  try:
    resolve_remat(value)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  return value


def _policy_arg(text: str) -> str:
  try:
    get_policy(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e
  return text


def _chunk_arg(text: str) -> int | None:
  return None if text.lower() == "none" else _positive_int(text)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Appends "(default: ...)" to each option's help unless the help states its default."""

  def _get_help_string(self, action: argparse.Action) -> str | None:
    text = action.help or ""
    return text if "(default:" in text else super()._get_help_string(action)


def _subparser(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
  return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)


def _add_shape_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch", type=_positive_int, default=4, metavar="B", help="batch size B")
  p.add_argument(
    "--tokens",
    type=_positive_int,
    default=196,
    metavar="N",
    help="tokens per sample N (a square N gets a grid graph)",
  )
  p.add_argument("--dim", type=_positive_int, default=768, metavar="D", help="token width D")


def build_parser() -> argparse.ArgumentParser:
  """The `moment-jax` parser: subcommands `report`, `memory`, `convert`."""
  p = argparse.ArgumentParser(prog="moment-jax", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  names = ", ".join(presets.PRESET_NAMES)
  r = _subparser(
    sub, "report", "build each preset, run a jitted training step, print the memory table"
  )
  r.add_argument(
    "--preset",
    action="append",
    choices=presets.PRESET_NAMES,
    help=f"preset to report, repeatable; one of {names} (default: all of them)",
  )
  _add_shape_args(r)
  r.add_argument("--no-run", action="store_true", help="compile only, do not run the step")
  r.add_argument(
    "--json", metavar="PATH", help="also write the rows as JSON to PATH (default: none)"
  )
  r.set_defaults(func=_cmd_report)

  m = _subparser(
    sub,
    "memory",
    "the seed's memory table, measured: presets x remat x "
    "precision policies, with and without token gradients",
  )
  m.add_argument(
    "--preset",
    action="append",
    choices=presets.PRESET_NAMES,
    help=f"preset, repeatable; one of {names} (default: original, optimized, memory, performance)",
  )
  m.add_argument(
    "--remat",
    nargs="+",
    type=_remat_arg,
    default=[None, "isqrt", "features"],
    metavar="POLICY",
    help=f"remat policies: none, {', '.join(PIPELINE_POLICIES)} or a "
    f"jax.checkpoint_policies name (default: none isqrt features)",
  )
  m.add_argument(
    "--policy",
    nargs="+",
    type=_policy_arg,
    default=["float32", "bfloat16"],
    metavar="POLICY",
    help=f"precision policies: {', '.join(NAMED_POLICIES)}, or key=value strings "
    f"such as 'params=float32,compute=bfloat16,output=float32' (default: "
    f"float32 bfloat16)",
  )
  m.add_argument(
    "--chunk",
    nargs="+",
    type=_chunk_arg,
    default=[None],
    metavar="N",
    help="isqrt_chunk values: 'none' or ints >= 1 (default: none)",
  )
  m.add_argument(
    "--d-reduce",
    type=_positive_int,
    default=None,
    metavar="W",
    help="d_reduce of every head (default: none, no reduction)",
  )
  _add_shape_args(m)
  m.add_argument(
    "--no-device-peak",
    action="store_true",
    help="skip the GPU device peaks (one fresh process per figure)",
  )
  m.add_argument(
    "--jobs", type=_positive_int, default=4, metavar="J", help="device-peak processes at once"
  )
  m.add_argument(
    "--json", metavar="PATH", help="also write the rows as JSON to PATH (default: none)"
  )
  m.set_defaults(func=_cmd_memory)

  c = _subparser(
    sub,
    "convert",
    "convert a PyTorch checkpoint of the head (.pt, .pth, .bin, "
    ".safetensors, .npz) to an orbax checkpoint directory with the head's "
    "configuration, or an orbax checkpoint back to a PyTorch weights file",
  )
  c.add_argument(
    "src",
    metavar="SRC",
    help="a PyTorch weights file (.pt/.pth/.bin read with "
    "torch.load(weights_only=True) only, .safetensors, .npz), or an orbax "
    "checkpoint directory (written by this command or by training)",
  )
  c.add_argument(
    "dst",
    metavar="DST",
    help="an orbax checkpoint directory (SRC a file), or a "
    ".pt, .pth, .safetensors or .npz file (SRC a directory)",
  )
  c.add_argument(
    "--preset",
    choices=presets.PRESET_NAMES,
    help=f"the head's configuration, one of {names}; required for a PyTorch SRC "
    f"and for an orbax SRC without {convert.CONFIG_FILE} (default: the stored one)",
  )
  c.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="override a preset field, repeatable (e.g. d_out=256, sketch_dim=2048, "
    "mlp=double); values are JSON when they parse (3, 0.5, true, null), else "
    f"strings; fields: {', '.join(FIELDS)} (default: none)",
  )
  c.add_argument(
    "--d-in",
    type=_positive_int,
    default=None,
    metavar="D",
    help="token width D (default: read from the weights)",
  )
  c.add_argument(
    "--prefix",
    default="",
    metavar="P",
    help="where the head sits inside SRC: a key prefix such as 'head.' in a "
    "PyTorch state_dict, or a path such as 'moment' inside params and "
    "batch_stats of an orbax train state (default: '', the whole of SRC)",
  )
  c.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing DST (only once the new one is complete)",
  )
  c.set_defaults(func=_cmd_convert)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `moment-jax`; returns the exit status (2 for a usage or input error)."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # argparse has printed the usage error (or the help)
    return e.code if isinstance(e.code, int) else 2
  try:
    return args.func(args)
  except (ValueError, OSError, ImportError) as e:
    print(f"moment-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
