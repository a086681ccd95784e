"""Run by tests/test_multiprocess.py: one JAX process of a multi-process run
(`jax.distributed.initialize`, CPU collectives over localhost), or the whole
run in one process.

Every process sees the same 8 global devices as a 8 x 1 ("data", "model")
mesh and traces the same step: AdamW on a tiny head (the optimized preset's
structure, d_in 16, d_out 8) with the "rows" layout, STEPS steps, an orbax
save of the sharded state (each process writes its own shards), SAVED_STEPS
more steps, then a restore of the saved state and the same SAVED_STEPS steps
again. Process 0 writes the losses and the final parameters (gathered) to
--out as JSON.

  python tests/multiprocess_worker.py --out r.json --ckpt DIR            # one process
  python tests/multiprocess_worker.py --out r.json --ckpt DIR \\
      --processes 2 --process-id I --port P                             # one of two
"""

import argparse
import json
import os
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import comm  # noqa: E402
import optax  # noqa: E402

from moment_jax import grid_graph  # noqa: E402
from moment_jax import sharding as shd  # noqa: E402

STEPS, SAVED_STEPS = 3, 2
BATCH, TOKENS, D_IN, D_OUT = 16, 16, 16, 8


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--port", type=int)
  ap.add_argument("--out", required=True)
  ap.add_argument("--ckpt", required=True)
  a = ap.parse_args()
  if a.processes > 1:
    jax.distributed.initialize(
      f"localhost:{a.port}",
      a.processes,
      a.process_id,
      initialization_timeout=60,
      heartbeat_timeout_seconds=20,
      shutdown_timeout_seconds=20,
    )
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils

  mesh = shd.make_mesh(8, 1)
  rules = shd.head_rules("rows")
  batch_sh, repl = shd.batch_sharding(mesh), shd.replicated(mesh)
  tx = optax.adamw(1e-2)
  init, step_fn, _ = comm.setup(
    "linen",
    "optimized",
    tx,
    grid_graph(4, 4),
    batch_sh,
    d_in=D_IN,
    n_tokens=TOKENS,
    d_out=D_OUT,
    token_grads=False,
  )
  keys = jax.random.split(jax.random.key(0), 3)
  state_sh = shd.tree_shardings(jax.eval_shape(init, keys[1]), mesh, rules)
  # Every process runs the same programs on global arrays; each holds its shards.
  state = jax.jit(init, out_shardings=state_sh)(keys[1])
  tokens, targets = jax.jit(
    lambda k: (
      jax.random.normal(k[0], (BATCH, TOKENS, D_IN)),
      jax.random.normal(k[2], (BATCH, D_OUT)),
    ),
    out_shardings=(batch_sh, batch_sh),
  )(keys)
  step_keys = [
    jax.jit(lambda k, i=i: jax.random.fold_in(k, i), out_shardings=repl)(keys[2])
    for i in range(STEPS + SAVED_STEPS)
  ]
  with shd.use_layout(mesh, rules):
    step = jax.jit(
      step_fn, in_shardings=(state_sh, batch_sh, batch_sh, repl), out_shardings=(state_sh, repl)
    )

    def run(state, first, count):
      losses = []
      for i in range(first, first + count):
        state, loss = step(state, tokens, targets, step_keys[i])
        losses.append(float(loss))
      return state, losses

    state, losses = run(state, 0, STEPS)
    path = pathlib.Path(a.ckpt) / "state"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, state)
    checkpointer.wait_until_finished()
    final, continued = run(state, STEPS, SAVED_STEPS)
    abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh
    )
    restored = checkpointer.restore(path, abstract)
    shards_match = all(
      np.array_equal(np.asarray(x.data), np.asarray(y.data))
      for u, v in zip(jax.tree.leaves(restored), jax.tree.leaves(state))
      for x, y in zip(u.addressable_shards, v.addressable_shards)
    )
    _, resumed = run(restored, STEPS, SAVED_STEPS)
  checkpointer.close()

  params = multihost_utils.process_allgather(final["params"], tiled=True)
  kernel = final["params"]["proj"]["kernel"]
  report = dict(
    processes=jax.process_count(),
    devices=jax.device_count(),
    local_devices=jax.local_device_count(),
    losses=losses,
    continued=continued,
    resumed=resumed,
    restored_shards_match=shards_match,
    kernel_shards=[list(s.data.shape) for s in kernel.addressable_shards],
    params={
      shd.path_str(p): np.asarray(v).tolist()
      for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    },
    checkpoint_files=sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_dir()),
  )
  if jax.process_index() == 0:
    with open(a.out, "w") as f:
      json.dump(report, f)
  multihost_utils.sync_global_devices("done")
  if a.processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
