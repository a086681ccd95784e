"""Run by tests/test_sharding.py in a fresh process with 8 simulated CPU devices:
training steps of examples/digits.py on one device and on ("data", "model")
meshes; prints one JSON report (losses, per-leaf differences, shard shapes)."""

import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import digits  # noqa: E402
from moment_jax import sharding as shd  # noqa: E402

# Two steps: the schedule's first learning rate is 0 (warm-up from 0), and the
# second step starts from the sharded optimizer state.
STEPS = 2
MESHES = ((2, 4), (1, 8))


def leaf_diffs(got, want):
  """`{path: [max |got - want|, max |want|]}` over the leaves of two trees."""
  flat = lambda t: {shd.path_str(p): np.asarray(v, np.float64)
                    for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  g, w = flat(got), flat(want)
  assert g.keys() == w.keys()
  return {k: [float(np.max(np.abs(g[k] - w[k]), initial=0.0)),
              float(np.max(np.abs(w[k]), initial=0.0))] for k in w}


def shard_shapes(x):
  return [list(s.data.shape) for s in x.addressable_shards]


def main():
  cfg = dataclasses.replace(digits.Config(), width=16, depth=1, d_out=16, batch_size=32,
                            steps=10, warmup=1)
  x_tr, y_tr, _, _ = digits.load_digits()
  model, tx = digits.DigitsViT("moment", cfg), digits.make_optimizer(cfg)
  state0 = digits.init_state(model, tx, 0)

  step = jax.jit(digits.make_train_step(model, tx, cfg, len(x_tr)))
  ref, ref_losses = state0, []
  for _ in range(STEPS):
    ref, m = step(ref, x_tr, y_tr)
    ref_losses.append(float(m["loss"]))

  report = {"devices": jax.device_count(), "lr": cfg.lr, "ref_losses": ref_losses,
            "meshes": {}}
  for data, model_axis in MESHES:
    mesh = shd.make_mesh(data, model_axis)
    sh = shd.tree_shardings(state0, mesh, shd.HEAD_RULES)
    repl = shd.replicated(mesh)
    sstep = jax.jit(digits.make_train_step(model, tx, cfg, len(x_tr), shd.batch_sharding(mesh)),
                    in_shardings=(sh, repl, repl), out_shardings=(sh, repl))
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
            "batch": shard_shapes(jax.device_put(x_tr[:cfg.batch_size],
                                                 shd.batch_sharding(mesh))),
        },
    }
  print(json.dumps(report))


if __name__ == "__main__":
  main()
