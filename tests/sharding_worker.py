"""Run by tests/test_sharding.py in a fresh process with 8 simulated CPU devices;
prints one JSON report.

`sharding_worker.py` (digits): training steps of examples/digits.py on one
device and on ("data", "model") meshes with the "columns" rules (losses,
per-leaf differences, shard shapes).

`sharding_worker.py layouts`: AdamW steps of a tiny head (the optimized
preset's structure, d_in 16, d_out 8; Linen and NNX, float32 and bfloat16,
whole batch and `isqrt_chunk`) under `head_rules(layout)` on meshes of 1 to 8
devices against the same step with no mesh; and the compiled HLO of the
optimized preset's step at D=768, 64 samples per device on 8 devices
(`benchmarks/comm.py`, compile only).
"""

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import comm  # noqa: E402
import digits  # noqa: E402
import optax  # noqa: E402

from moment_jax import grid_graph  # noqa: E402
from moment_jax import sharding as shd  # noqa: E402

# Two steps: the schedule's first learning rate is 0 (warm-up from 0), and the
# second step starts from the sharded optimizer state.
STEPS = 2
MESHES = ((2, 4), (1, 8))


def leaf_diffs(got, want):
  """`{path: [max |got - want|, max |want|]}` over the leaves of two trees."""
  flat = lambda t: {
    shd.path_str(p): np.asarray(v, np.float64)
    for p, v in jax.tree_util.tree_flatten_with_path(t)[0]
  }
  g, w = flat(got), flat(want)
  assert g.keys() == w.keys()
  return {
    k: [float(np.max(np.abs(g[k] - w[k]), initial=0.0)), float(np.max(np.abs(w[k]), initial=0.0))]
    for k in w
  }


def shard_shapes(x):
  return [list(s.data.shape) for s in x.addressable_shards]


def digits_report():
  cfg = dataclasses.replace(
    digits.Config(), width=16, depth=1, d_out=16, batch_size=32, steps=10, warmup=1
  )
  x_tr, y_tr, _, _ = digits.load_digits()
  model, tx = digits.DigitsViT("moment", cfg), digits.make_optimizer(cfg)
  state0 = digits.init_state(model, tx, 0)

  step = jax.jit(digits.make_train_step(model, tx, cfg, len(x_tr)))
  ref, ref_losses = state0, []
  for _ in range(STEPS):
    ref, m = step(ref, x_tr, y_tr)
    ref_losses.append(float(m["loss"]))

  report = {"devices": jax.device_count(), "lr": cfg.lr, "ref_losses": ref_losses, "meshes": {}}
  for data, model_axis in MESHES:
    mesh = shd.make_mesh(data, model_axis)
    sh = shd.tree_shardings(state0, mesh, shd.HEAD_RULES)
    repl = shd.replicated(mesh)
    sstep = jax.jit(
      digits.make_train_step(model, tx, cfg, len(x_tr), shd.batch_sharding(mesh)),
      in_shardings=(sh, repl, repl),
      out_shardings=(sh, repl),
    )
    state, losses = jax.device_put(state0, sh), []
    for _ in range(STEPS):
      state, m = sstep(state, x_tr, y_tr)
      losses.append(float(m["loss"]))
    kernel = state["params"]["moment"]["proj"]["kernel"]
    try:  # d_out = 6 does not split over a "model" axis of 4 or 8
      shd.tree_shardings({"proj": {"kernel": np.zeros((4, 6))}}, mesh)
      indivisible = "no error"
    except ValueError as e:
      indivisible = str(e)
    adam, ref_adam = state["opt_state"][1][0], ref["opt_state"][1][0]  # chain(clip, adamw)
    report["meshes"][f"{data}x{model_axis}"] = {
      "losses": losses,
      "params": leaf_diffs(state["params"], ref["params"]),
      "batch_stats": leaf_diffs(state["batch_stats"], ref["batch_stats"]),
      "mu": leaf_diffs(adam.mu, ref_adam.mu),
      "nu": leaf_diffs(adam.nu, ref_adam.nu),
      "kernel_shape": list(kernel.shape),
      "indivisible": indivisible,
      "shards": {
        "kernel": shard_shapes(kernel),
        "mu": shard_shapes(adam.mu["moment"]["proj"]["kernel"]),
        "nu": shard_shapes(adam.nu["moment"]["proj"]["kernel"]),
        "embed": shard_shapes(state["params"]["embed"]["kernel"]),
        "batch": shard_shapes(jax.device_put(x_tr[: cfg.batch_size], shd.batch_sharding(mesh))),
      },
    }
  return report


# -- layouts -------------------------------------------------------------------

CHUNK = {"isqrt_chunk": 1, "remat_policy": "features"}
# (name, api, layout, data, model, overrides): every case runs STEPS AdamW steps
# from the same state and data as its reference, the same api and overrides on
# no mesh.
CASES = (
  ("linen rows 1x1", "linen", "rows", 1, 1, {}),
  ("linen rows 2x1", "linen", "rows", 2, 1, {}),
  ("linen rows 4x1", "linen", "rows", 4, 1, {}),
  ("linen rows 8x1", "linen", "rows", 8, 1, {}),
  ("linen rows 4x2", "linen", "rows", 4, 2, {}),
  ("nnx rows 2x1", "nnx", "rows", 2, 1, {}),
  ("nnx rows 4x1", "nnx", "rows", 4, 1, {}),
  ("nnx rows 8x1", "nnx", "rows", 8, 1, {}),
  ("linen rows 8x1 chunk", "linen", "rows", 8, 1, CHUNK),
  ("linen rows 2x4 chunk", "linen", "rows", 2, 4, CHUNK),
  ("linen replicated 8x1 chunk", "linen", "replicated", 8, 1, CHUNK),
  ("linen rows 8x1 bf16", "linen", "rows", 8, 1, {"policy": "bfloat16"}),
  ("nnx rows 4x1 bf16 chunk", "nnx", "rows", 4, 1, {"policy": "bfloat16", "isqrt_chunk": 1}),
)
LAYOUT_STEPS = 3
BATCH, TOKENS, D_IN = 16, 16, 16


def run_case(api, layout, data, model, overrides, steps=LAYOUT_STEPS):
  """Losses, final state and the last token gradient of `steps` steps;
  `data` = 0: the reference, no mesh and no layout."""
  tx = optax.adamw(1e-2)
  graph = grid_graph(4, 4)
  keys = jax.random.split(jax.random.key(0), 3)
  mesh = shd.make_mesh(data, model) if data else None
  batch_sh = shd.batch_sharding(mesh) if mesh else None
  init, step_fn, d_out = comm.setup(
    api, "optimized", tx, graph, batch_sh, d_in=D_IN, n_tokens=TOKENS, d_out=8, **overrides
  )
  state = init(keys[1])
  tokens = jax.random.normal(keys[0], (BATCH, TOKENS, D_IN))
  targets = jax.random.normal(keys[2], (BATCH, d_out))
  step_keys = [jax.random.fold_in(keys[2], i) for i in range(steps)]
  if mesh is None:
    return _steps(jax.jit(step_fn), state, tokens, targets, step_keys)
  rules = shd.head_rules(layout)
  sh, repl = shd.tree_shardings(state, mesh, rules), shd.replicated(mesh)
  state, tokens, targets = jax.device_put((state, tokens, targets), (sh, batch_sh, batch_sh))
  with shd.use_layout(mesh, rules):
    step = jax.jit(
      step_fn, in_shardings=(sh, batch_sh, batch_sh, repl), out_shardings=(sh, repl, batch_sh)
    )
    return _steps(step, state, tokens, targets, jax.device_put(step_keys, repl))


def _steps(step, state, tokens, targets, step_keys):
  losses = []
  for key in step_keys:
    state, loss, d_tokens = step(state, tokens, targets, key)
    losses.append(float(loss))
  return losses, state, d_tokens


def per_device_report():
  """The original preset's features (third-order sketch: FFTs) on 8 devices under
  the "rows" layout, through `ops.project.per_device` and without it."""
  from moment_jax import HeadConfig
  from moment_jax.ops.project import per_device

  cfg = HeadConfig.from_preset("original")
  # outer_remat=False: the bare pipeline, without the head's per-device wrapper
  fn = cfg.feature_fn(cfg.resolved_policy(), outer_remat=False)
  tokens = jax.random.normal(jax.random.key(3), (BATCH, TOKENS, D_IN))
  mesh = shd.make_mesh(8, 1)
  out = {}
  with shd.use_layout(mesh, "rows"):
    for name, f in (("plain", fn), ("per_device", per_device(fn))):
      jitted = jax.jit(
        lambda t, f=f: f(t, grid_graph(4, 4), None), in_shardings=shd.batch_sharding(mesh)
      )
      t = jax.device_put(tokens, shd.batch_sharding(mesh))
      ops = shd.collectives(jitted.lower(t).compile().as_text(), 8)
      out[name] = {
        "gathers": sum(op.count for op in ops if op.kind == "all-gather"),
        "features": np.asarray(jitted(t)).tolist(),
      }
  ref = np.asarray(jax.jit(lambda t: fn(t, grid_graph(4, 4), None))(tokens))
  plain = np.asarray(out["plain"].pop("features"))
  got = np.asarray(out["per_device"].pop("features"))
  tri = D_IN * (D_IN + 1) // 2  # the square root's triangle, then the sketch
  out["diff_plain"] = float(np.max(np.abs(got - plain)))
  out["diff_triangle"] = float(np.max(np.abs(got - ref)[:, :tri]))
  out["diff_sketch"] = float(np.max(np.abs(got - ref)[:, tri:]))
  out["scale"] = float(np.max(np.abs(ref)))
  return out


def layouts_report():
  report = {"devices": jax.device_count(), "cases": {}}
  refs = {}
  for name, api, layout, data, model, overrides in CASES:
    key = (api, json.dumps(overrides, sort_keys=True))
    if key not in refs:
      refs[key] = run_case(api, layout, 0, 0, overrides)
    ref_losses, ref_state, ref_dt = refs[key]
    losses, state, d_tokens = run_case(api, layout, data, model, overrides)
    kernel = next(
      v
      for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]
      if shd.path_str(p).startswith("proj/kernel")
    )
    report["cases"][name] = {
      "losses": losses,
      "ref_losses": ref_losses,
      "params": leaf_diffs(state["params"], ref_state["params"]),
      "d_tokens": leaf_diffs(d_tokens, ref_dt),
      "kernel_shards": shard_shapes(kernel),
      "kernel_shape": list(kernel.shape),
    }
  report["per_device"] = per_device_report()
  report["hlo"] = {
    f"{api} {layout}": comm.measure("optimized", layout, 8, 1, 64, comm.parse_args(["--api", api]))
    for api, layout in (("linen", "rows"), ("linen", "replicated"), ("nnx", "rows"))
  }
  return report


if __name__ == "__main__":
  mode = sys.argv[1] if len(sys.argv) > 1 else "digits"
  print(json.dumps(layouts_report() if mode == "layouts" else digits_report()))
