"""GPU speed of MomentHead against the PyTorch reference, beside the roofline floor.

Run on a GPU machine from the repository root (one call, a few minutes):

  PYTHONPATH=. python benchmarks/gpu.py --out out/            # JAX + torch eager
  PYTHONPATH=. python benchmarks/gpu.py --compile --out out/  # + torch.compile

For the optimized and original presets at N=196, D=768 (14x14 grid graph),
B in {4, 64, 256} and the precisions float32 (highest), tf32 and bfloat16,
it times the training-mode forward and the forward+backward with gradients
for the parameters AND the tokens (the head sits on a backbone): medians of
device-synchronised runs after warm-up. The PyTorch reference
(moment_jax.torch_reference) runs at matched precision: allow_tf32 off/on,
bf16 autocast. Beside each row: the floor, max(FLOPs / matmul ceiling,
minimal bytes / copy ceiling), with ceilings measured in the same run (a
1 GiB device copy; a batch of 256 768^3 matmuls per precision), and measured/floor.
Prints one table and writes gpu.json under --out.

Two floors. "floor" is the issue's, for the channel algorithm that the
PyTorch reference runs: graph propagation 2 B N^2 D, moment 2 B N D^2,
Newton-Schulz (3K-3) 2 B D^3, projection 2 B F d_out (+ 2 B d_out^2 for the
double MLP). "tfloor" is the same for the algorithm JAX runs when
isqrt_space resolves to "token" (moment_jax.ops.gram): graph 2 B N^2 D, Gram
2 B N^2 D, (3K-3) products of two N^3 GEMMs 4 B N^3 each, the map back
2 B N^2 D + 2 B N D^2, projection. Forward+backward = 3x forward. Minimal
bytes: the projection weight read once (and its gradient written once in
the backward). --space auto channel times JAX in both spaces, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from moment_jax import MomentHead, feature_size, grid_graph, ops, steps
from moment_jax.ops import gram

N, D, SIDE = 196, 768, 14
PRECISIONS = ("float32", "tf32", "bfloat16")


def timeit(fn, sync, warmup=2, iters=15, budget_s=1.0):
  for _ in range(warmup):
    fn()
  sync()
  times = []
  t_end = time.perf_counter() + budget_s
  while len(times) < iters and (len(times) < 5 or time.perf_counter() < t_end):
    t = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def jax_sync(x):
  return lambda: jax.block_until_ready(x[0])


# -- ceilings -----------------------------------------------------------------


def ceilings():
  out = {}
  a = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
  copy = jax.jit(lambda x: x + 1.0)
  box = [None]

  def run():
    box[0] = copy(a)

  out["copy_GBps"] = 2 * a.nbytes / timeit(run, jax_sync(box)) / 1e9
  for prec, dtype, p in (
    ("float32", jnp.float32, "highest"),
    ("tf32", jnp.float32, "default"),
    ("bfloat16", jnp.bfloat16, "default"),
  ):
    x = jax.random.normal(jax.random.key(0), (256, D, D)).astype(dtype)
    mm = jax.jit(lambda x: jnp.matmul(x, x, precision=p))

    def run():
      box[0] = mm(x)

    out[f"{prec}_TFLOPs"] = (
      2 * 256 * D**3 / timeit(run, jax_sync(box), iters=30, budget_s=2.0) / 1e12
    )
  return out


def floor(preset, b, fwd_bwd, ceil, precision, token=False):
  h = MomentHead.from_preset(preset)
  f = feature_size(D, h.use_third_order, h.sketch_dim)
  products = 3 * h.isqrt_iterations - 3
  if token:
    flops = 6 * b * N * N * D + 2 * b * N * D * D + products * 4 * b * N**3
  else:
    flops = 2 * b * N * N * D + 2 * b * N * D * D + products * 2 * b * D**3
  flops += 2 * b * f * h.d_out + (2 * b * h.d_out**2 if h.mlp == "double" else 0)
  wbytes = f * h.d_out * 4
  if fwd_bwd:
    flops, wbytes = 3 * flops, 2 * wbytes
  return max(flops / (ceil[f"{precision}_TFLOPs"] * 1e12), wbytes / (ceil["copy_GBps"] * 1e9))


# -- JAX ----------------------------------------------------------------------


def jax_times(preset, b, precision, space, kernels="auto"):
  head = MomentHead.from_preset(
    preset,
    policy=precision,
    dropout_rate=0.0,
    isqrt_space=space,
    use_kernels=None if kernels == "auto" else kernels == "on",
  )
  graph = grid_graph(SIDE, SIDE)
  shape = (b, N, D)
  v = jax.jit(lambda k: head.init(k, jnp.zeros(shape), graph, train=False))(jax.random.key(0))
  tokens = jax.random.normal(jax.random.key(1), shape)
  key = jax.random.key(2)
  fwd = jax.jit(
    lambda p, s, t: head.apply(
      {"params": p, "batch_stats": s},
      t,
      graph,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
  )
  step = steps.make_grad_step(head, graph, token_grad=True)
  box = [None]

  def run_fwd():
    box[0] = fwd(v["params"], v["batch_stats"], tokens)

  def run_step():
    box[0] = step(v["params"], v["batch_stats"], tokens, key)

  return timeit(run_fwd, jax_sync(box)), timeit(run_step, jax_sync(box))


# -- PyTorch --------------------------------------------------------------------


def torch_times(preset, b, precision, compiled):
  import torch

  from moment_jax import torch_reference as tr

  dev = torch.device("cuda")
  # Each row is its own graph: without a reset dynamo hits its recompile
  # limit after a few rows and silently falls back to eager.
  torch._dynamo.reset()
  torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
  torch.backends.cudnn.allow_tf32 = precision == "tf32"
  torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
  model = tr.MomentHead.from_preset(preset, D, dropout_rate=0.0).to(dev).train()
  graph = torch.as_tensor(grid_graph(SIDE, SIDE), device=dev)
  tokens = torch.randn(b, N, D, device=dev, requires_grad=True)
  fn = torch.compile(model, dynamic=False) if compiled else model
  auto = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bfloat16")

  def run_fwd():
    with torch.no_grad(), auto:
      fn(tokens, graph)

  def run_step():
    model.zero_grad(set_to_none=True)
    tokens.grad = None
    with auto:
      out = fn(tokens, graph)
    out.float().pow(2).mean().backward()

  sync = torch.cuda.synchronize
  t_step = timeit(run_step, sync)
  t_fwd = timeit(run_fwd, sync)
  torch.cuda.empty_cache()
  return t_fwd, t_step


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--compile", action="store_true", help="also time torch.compile")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--preset", nargs="+", default=["optimized", "original"])
  ap.add_argument("--batch", nargs="+", type=int, default=[4, 64, 256])
  ap.add_argument("--precision", nargs="+", default=list(PRECISIONS))
  ap.add_argument(
    "--space",
    nargs="+",
    default=["auto"],
    choices=list(gram.SPACES),
    help="isqrt_space of the JAX rows; torch rows go with the first",
  )
  ap.add_argument(
    "--kernels",
    nargs="+",
    default=["auto"],
    choices=["auto", "on", "off"],
    help="use_kernels of the JAX rows (auto: the Pallas projection on one GPU); "
    "extra values add rows beside the first",
  )
  args = ap.parse_args()
  dev = jax.devices()[0]
  if dev.platform != "gpu":
    sys.exit("benchmarks/gpu.py times a GPU: run it on one")
  t0 = time.time()
  ceil = ceilings()
  versions = {"jax": jax.__version__}
  if not args.no_torch:
    import torch

    versions["torch"] = torch.__version__
  print(f"device: {dev.device_kind}; {versions}")
  print("ceilings: " + ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()))
  rows = []
  for preset in args.preset:
    for b in args.batch:
      for prec in args.precision:
        h = MomentHead.from_preset(preset)
        token = [ops.use_token_space(N, D, h.isqrt_iterations, sp) for sp in args.space]
        variants = [(sp, tk, kn) for sp, tk in zip(args.space, token) for kn in args.kernels]
        rs = []
        for sp, tk, kn in variants:
          rs.append(
            dict(
              preset=preset, batch=b, precision=prec, space="token" if tk else "channel", kernels=kn
            )
          )
          rs[-1]["jax_fwd_ms"], rs[-1]["jax_step_ms"] = (
            1e3 * t for t in jax_times(preset, b, prec, sp, kn)
          )
        r, extra = rs[0], rs[1:]
        if not args.no_torch:
          r["eager_fwd_ms"], r["eager_step_ms"] = (
            1e3 * t for t in torch_times(preset, b, prec, False)
          )
          if args.compile:
            r["compile_fwd_ms"], r["compile_step_ms"] = (
              1e3 * t for t in torch_times(preset, b, prec, True)
            )
        for row in [r] + extra:
          row["floor_fwd_ms"] = 1e3 * floor(preset, b, False, ceil, prec)
          row["floor_step_ms"] = 1e3 * floor(preset, b, True, ceil, prec)
          row["tfloor_step_ms"] = 1e3 * floor(preset, b, True, ceil, prec, token=True)
          for k in ("eager_fwd_ms", "eager_step_ms", "compile_fwd_ms", "compile_step_ms"):
            if k in r:
              row[k] = r[k]
          rows.append(row)
          print(
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
            flush=True,
          )
        save(args.out, dev, versions, ceil, rows, t0)  # a cut-off run keeps its rows
  hdr = (
    f"{'preset':<10} {'B':>4} {'prec':<9} {'space/kern':<12} | {'jax fwd':>8} {'eager':>8} "
    f"{'compile':>8} {'floor':>7} | {'jax f+b':>8} {'eager':>8} {'compile':>8} "
    f"{'floor':>7} {'tfloor':>7} | {'jax/eager':>9} {'jax/comp':>8} {'/floor':>7} "
    f"{'/tfloor':>7}"
  )
  print(
    "\nms, medians; forward = training-mode forward; f+b = forward+backward with "
    "parameter and token gradients"
  )
  print(hdr)
  g = lambda r, k: f"{r[k]:8.3f}" if k in r else f"{'-':>8}"
  for r in rows:
    ratio_e = r["jax_step_ms"] / r["eager_step_ms"] if "eager_step_ms" in r else float("nan")
    ratio_c = r["jax_step_ms"] / r["compile_step_ms"] if "compile_step_ms" in r else float("nan")
    print(
      f"{r['preset']:<10} {r['batch']:>4} {r['precision']:<9} "
      f"{r['space'] + '/' + r.get('kernels', 'auto'):<12} | "
      f"{g(r, 'jax_fwd_ms')} {g(r, 'eager_fwd_ms')} {g(r, 'compile_fwd_ms')} "
      f"{r['floor_fwd_ms']:7.3f} | {g(r, 'jax_step_ms')} {g(r, 'eager_step_ms')} "
      f"{g(r, 'compile_step_ms')} {r['floor_step_ms']:7.3f} {r['tfloor_step_ms']:7.3f} | "
      f"{ratio_e:9.2f} {ratio_c:8.2f} {r['jax_step_ms'] / r['floor_step_ms']:7.2f} "
      f"{r['jax_step_ms'] / r['tfloor_step_ms']:7.2f}"
    )
  print(f"wrote {save(args.out, dev, versions, ceil, rows, t0)} in {time.time() - t0:.0f} s")


def save(out, dev, versions, ceil, rows, t0):
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "gpu.json")
  with open(path, "w") as f:
    json.dump(
      dict(
        device=dev.device_kind,
        versions=versions,
        ceilings=ceil,
        rows=rows,
        command=" ".join(sys.argv),
        seconds=time.time() - t0,
      ),
      f,
      indent=1,
    )
  return path


if __name__ == "__main__":
  main()
