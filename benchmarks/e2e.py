"""End-to-end ViT-B/16 training step, mean pooling against the moment head, JAX against PyTorch.

Run on a GPU machine from the repository root (one call, a few minutes):

  PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/e2e.py \
      --batch 64 128 --json out/e2e.json

CPU smoke run (toy sizes, seconds):

  PYTHONPATH=. python benchmarks/e2e.py --tiny --frameworks jax --batch 2 --steps 2

Models, 224x224 images, 1000 classes, random initialisation, synthetic data:

* JAX: `benchmarks/vit.py`'s ViT-B/16 (bf16 compute, float32 parameters,
  `jax.nn.dot_product_attention`), mean pooling or `MomentHead` (optimized
  preset, bfloat16 policy, 14x14 grid graph), Dense(1000); cross-entropy,
  `optax.adamw`, one `jax.jit` step with the state donated.
* PyTorch: timm's `vit_base_patch16_224` (`class_token=False`, no download),
  `global_pool="avg"` or tokens into `moment_jax.torch_reference.MomentHead`
  (optimized preset) and Linear(512, 1000); bf16 autocast, `AdamW(fused=True)`,
  `torch.compile` of the model.

Per framework, pooling and batch: the median of device-synchronised steps
after warm-up ("ms/step"), the same steps issued back to back with one sync
("pipelined"), the head's overhead over mean pooling (ms and %), and the peak
device memory of the process: JAX `peak_bytes_in_use`, PyTorch
`max_memory_allocated`, each row in a fresh process (`--isolate`, on by
default except with `--tiny`), so each peak is one model's whole step:
parameters, optimizer state, data and activations. JAX rows also give the
compiled step's `memory_analysis()` (temp, and arguments + outputs + temp -
aliased). For mean pooling, "parts" time the training-mode forward alone and
the 12 layers' attention (forward + backward) alone, in both frameworks, to
say where the backbones differ. Rows are written to the JSON as they finish.
Prints one table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Sequence

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT as OWG  # noqa: E402

from benchmarks.vit import (  # noqa: E402
  ATTENTIONS,
  EXTRA_POOLINGS,
  POOLINGS,
  TINY,
  VIT_B16,
  ViT,
  ViTConfig,
)
from moment_jax.kernels import FusedAdamW  # noqa: E402

FRAMEWORKS = ("jax", "torch")
TORCH_COMPILE = ("model", "none")
LR, WEIGHT_DECAY = 1e-4, 0.05  # the same AdamW in both frameworks; speed does not depend on them
ROW_TAG = "E2E_ROW "


# -- shared ---------------------------------------------------------------------


def synthetic_batch(cfg: ViTConfig, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Random images `[batch, image, image, 3]` float32 and labels `[batch]` int32."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, cfg.image, cfg.image, 3), dtype=np.float32)
  return images, rng.integers(0, cfg.classes, size=batch).astype(np.int32)


def time_steps(
  step: Callable[[], Any], sync: Callable[[Any], Any], warmup: int, steps: int
) -> tuple[float, float, list[Any]]:
  """(median ms of synchronised steps, ms per step issued back to back, losses)."""
  outs = [step() for _ in range(warmup)]
  sync(outs[-1])
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    outs.append(step())
    sync(outs[-1])
    times.append(time.perf_counter() - t)
  t = time.perf_counter()
  for _ in range(steps):
    outs.append(step())
  sync(outs[-1])
  pipelined = (time.perf_counter() - t) / steps
  return 1e3 * statistics.median(times), 1e3 * pipelined, outs


def time_fn(
  fn: Callable[[], Any], sync: Callable[[Any], Any], warmup: int = 2, iters: int = 10
) -> float:
  """Median ms of `iters` synchronised calls after `warmup`; keeps no output alive."""
  for _ in range(warmup):
    out = fn()
  sync(out)
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    out = fn()
    sync(out)
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


# -- JAX ------------------------------------------------------------------------


class TrainState(NamedTuple):
  """What one training step reads and replaces (donated)."""

  params: Any
  opt_state: Any
  batch_stats: Any
  step: jax.Array
  owg: Any  # the fused head's kernel, moments and count (overwritten by their "gradients")


def init_state(
  model: ViT, tx: optax.GradientTransformation, images: jax.Array, key: jax.Array
) -> TrainState:
  """Fresh parameters, AdamW moments and BatchNorm statistics."""
  variables = model.init(key, images, train=False)
  params = variables["params"]
  return TrainState(
    params,
    tx.init(params),
    variables.get("batch_stats", {}),
    jnp.zeros((), jnp.int32),
    variables.get(OWG, {}),
  )


def loss_and_stats(
  model: ViT,
  params: Any,
  batch_stats: Any,
  images: jax.Array,
  labels: jax.Array,
  rng: jax.Array,
  owg: Any = None,
) -> tuple[jax.Array, Any]:
  """Training-mode cross-entropy and the updated BatchNorm statistics."""
  variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
  if owg:
    variables[OWG] = owg
  logits, updates = model.apply(
    variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
  )
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, updates.get("batch_stats", {})


def train_step(
  model: ViT,
  tx: optax.GradientTransformation,
  state: TrainState,
  images: jax.Array,
  labels: jax.Array,
  key: jax.Array,
) -> tuple[TrainState, jax.Array]:
  """One AdamW step; dropout draws from `key` folded with the step count."""
  rng = jax.random.fold_in(key, state.step)
  grad_fn = jax.value_and_grad(
    lambda p, o: loss_and_stats(model, p, state.batch_stats, images, labels, rng, o),
    argnums=(0, 1),
    has_aux=True,
  )
  (loss, stats), (grads, owg) = grad_fn(state.params, state.owg)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The fused head's "gradients" of its OVERWRITE_WITH_GRADIENT variables are their new values.
  return TrainState(params, opt_state, stats, state.step + 1, owg), loss


def jax_attention_ms(cfg: ViTConfig, batch: int, implementation: str | None) -> float:
  """`depth` x forward + backward of `jax.nn.dot_product_attention` alone, bf16."""
  shape = (batch, cfg.tokens, cfg.heads, cfg.width // cfg.heads)
  q, k, v, ct = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(4))
  attn = functools.partial(jax.nn.dot_product_attention, implementation=implementation)
  fwd_bwd = jax.jit(lambda q, k, v: jax.vjp(attn, q, k, v)[1](ct))
  return cfg.depth * time_fn(lambda: fwd_bwd(q, k, v), jax.block_until_ready)


def compile_jax_step(
  cfg: ViTConfig, pooling: str, attention: str, images: jax.Array, labels: jax.Array, key: jax.Array
) -> tuple[ViT, TrainState, Any, float]:
  """(model, fresh state, compiled donated step, compile seconds)."""
  moments = jnp.bfloat16 if pooling == "fused16" else jnp.float32
  fused = FusedAdamW(LR, weight_decay=WEIGHT_DECAY, moment_dtype=moments)
  fused = fused if pooling.startswith("fused") else None
  model = ViT(config=cfg, pooling=pooling, attention=attention, head_adamw=fused)  # type: ignore[arg-type]
  tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
  state = jax.jit(functools.partial(init_state, model, tx))(images, key)
  t0 = time.perf_counter()
  compiled = (
    jax.jit(functools.partial(train_step, model, tx), donate_argnums=0)
    .lower(state, images, labels, key)
    .compile()
  )
  return model, state, compiled, time.perf_counter() - t0


def jax_row(
  cfg: ViTConfig,
  pooling: str,
  batch: int,
  *,
  steps: int,
  warmup: int,
  attention: str = "auto",
  parts: bool = True,
) -> dict[str, Any]:
  """Times the JAX training step of one model at one batch size."""
  dev = jax.devices()[0]
  images_np, labels_np = synthetic_batch(cfg, batch)
  images, labels = jnp.asarray(images_np), jnp.asarray(labels_np)
  key = jax.random.key(0)
  row: dict[str, Any] = dict(framework="jax", pooling=pooling, batch=batch)
  try:
    model, state, compiled, compile_s = compile_jax_step(
      cfg, pooling, attention, images, labels, key
    )
  except Exception as e:  # "auto" asks for cuDNN on a GPU; XLA's attention always compiles
    if attention != "auto" or dev.platform != "gpu":
      raise
    row["attention_fallback"] = f"{type(e).__name__}: {str(e)[:300]}"
    attention = "xla"
    model, state, compiled, compile_s = compile_jax_step(
      cfg, pooling, attention, images, labels, key
    )
  # The fused head's kernel is a parameter too (its moments and count are not).
  kernels = [x for p, x in jax.tree_util.tree_leaves_with_path(state.owg) if "kernel" in str(p)]
  n_params = sum(int(np.prod(x.shape)) for x in [*jax.tree.leaves(state.params), *kernels])
  mem = compiled.memory_analysis()
  hlo = compiled.as_text() or ""

  box = [state]

  def step():
    box[0], loss = compiled(box[0], images, labels, key)
    return box[0], loss

  ms, pipelined, outs = time_steps(step, jax.block_until_ready, warmup, steps)
  stats = dev.memory_stats() or {}
  row.update(
    ms_per_step=ms,
    ms_per_step_pipelined=pipelined,
    params=n_params,
    peak_mb=stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None,
    compiled_temp_mb=mem.temp_size_in_bytes / 2**20 if mem else None,
    compiled_total_mb=(
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
    / 2**20
    if mem
    else None,
    compile_s=compile_s,
    losses=[float(loss) for _, loss in outs],
    attention=attention,
    attention_kernel="cudnn" if "cudnn$fmha" in hlo else "xla",
    device=dev.device_kind,
    versions={"jax": jax.__version__},
  )
  if parts and pooling == "mean":
    try:
      fwd = jax.jit(
        lambda s: loss_and_stats(model, s.params, s.batch_stats, images, labels, key)[0]
      )
      row["parts"] = {"forward_ms": time_fn(lambda: fwd(box[0]), jax.block_until_ready)}
    except Exception as e:  # the step's numbers stand without the parts
      row["parts_error"] = f"{type(e).__name__}: {str(e)[:300]}"
      return row
    for impl in ("xla", "cudnn") if dev.platform == "gpu" else ("xla",):
      try:
        row["parts"][f"attention_{impl}_ms"] = jax_attention_ms(cfg, batch, impl)
      except Exception as e:  # cuDNN refuses some shapes: record why, keep the row
        row["parts"][f"attention_{impl}_ms"] = None
        row["parts"][f"attention_{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
  return row


# -- PyTorch ----------------------------------------------------------------------


def torch_model(cfg: ViTConfig, pooling: str) -> Any:
  """timm's ViT with `class_token=False`: mean pooling, or tokens -> MomentHead -> Linear."""
  import timm
  import torch
  from torch import nn

  from moment_jax import grid_graph
  from moment_jax.torch_reference import MomentHead

  sizes = dict(
    pretrained=False,
    class_token=False,
    img_size=cfg.image,
    patch_size=cfg.patch,
    embed_dim=cfg.width,
    depth=cfg.depth,
    num_heads=cfg.heads,
    mlp_ratio=cfg.mlp_dim / cfg.width,
  )
  if pooling == "mean":
    return timm.create_model(
      "vit_base_patch16_224", global_pool="avg", num_classes=cfg.classes, **sizes
    )

  class HeadViT(nn.Module):
    """Tokens `[batch, tokens, dim]` of timm's ViT into the moment head, then Linear."""

    def __init__(self):
      super().__init__()
      self.backbone = timm.create_model(
        "vit_base_patch16_224", global_pool="", num_classes=0, **sizes
      )
      self.head = MomentHead.from_preset("optimized", cfg.width)
      self.classifier = nn.Linear(self.head.d_out, cfg.classes)
      self.register_buffer("graph", torch.as_tensor(np.asarray(grid_graph(cfg.side, cfg.side))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
      return self.classifier(self.head(self.backbone(images), self.graph))

  return HeadViT()


def torch_row(
  cfg: ViTConfig,
  pooling: str,
  batch: int,
  *,
  steps: int,
  warmup: int,
  compile_mode: str = "model",
  parts: bool = True,
) -> dict[str, Any]:
  """Times the PyTorch training step of one model at one batch size."""
  import timm
  import torch
  import torch.nn.functional as F

  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cuda = dev.type == "cuda"
  torch.manual_seed(0)
  torch._dynamo.reset()
  # float32 matmuls (few under autocast) as JAX's GPU default, TF32.
  torch.set_float32_matmul_precision("high")
  if cuda:  # a row's peak is its own, also after other rows in this process
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  allocated_before = torch.cuda.memory_allocated() if cuda else 0
  model = torch_model(cfg, pooling).to(dev).train()
  n_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
  run = torch.compile(model) if compile_mode == "model" else model
  images_np, labels_np = synthetic_batch(cfg, batch)
  images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous().to(dev)
  labels = torch.from_numpy(labels_np).long().to(dev)

  def step():
    with torch.autocast(dev.type, dtype=torch.bfloat16):
      logits = run(images)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  t0 = time.perf_counter()
  first = step()
  sync(first)
  first_step_s = time.perf_counter() - t0
  ms, pipelined, outs = time_steps(step, sync, max(warmup - 1, 1), steps)
  row = dict(
    framework="torch",
    pooling=pooling,
    batch=batch,
    ms_per_step=ms,
    ms_per_step_pipelined=pipelined,
    params=n_params,
    peak_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    allocated_before_mb=allocated_before / 2**20,
    compile_s=first_step_s,
    losses=[float(x) for x in [first, *outs]],
    torch_compile=compile_mode,
    device=torch.cuda.get_device_name() if cuda else "cpu",
    versions={"torch": torch.__version__, "timm": timm.__version__},
  )
  if parts and pooling == "mean":
    try:
      row["parts"] = torch_parts(cfg, batch, run, images, sync)
    except Exception as e:  # the step's numbers stand without the parts
      row["parts_error"] = f"{type(e).__name__}: {str(e)[:300]}"
  return row


def torch_parts(
  cfg: ViTConfig, batch: int, run: Any, images: Any, sync: Callable[[Any], Any]
) -> dict[str, float]:
  """The training-mode forward alone, and `depth` x SDPA forward + backward alone."""
  import torch
  import torch.nn.functional as F

  dev = images.device

  def fwd():  # builds the autograd graph as the step does, and drops it on return
    with torch.autocast(dev.type, dtype=torch.bfloat16):
      run(images)

  out = {"forward_ms": time_fn(fwd, sync)}
  shape = (batch, cfg.heads, cfg.tokens, cfg.width // cfg.heads)
  q, k, v = (
    torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
  )
  ct = torch.randn(shape, device=dev, dtype=torch.bfloat16)

  def attn():
    return torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), ct)

  out["attention_sdpa_ms"] = cfg.depth * time_fn(attn, sync)
  return out


# -- driver -----------------------------------------------------------------------


def run_row(
  framework: str, cfg: ViTConfig, pooling: str, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
  """One row in this process."""
  if framework == "jax":
    return jax_row(
      cfg,
      pooling,
      batch,
      steps=args.steps,
      warmup=args.warmup,
      attention=args.attention,
      parts=args.parts,
    )
  return torch_row(
    cfg,
    pooling,
    batch,
    steps=args.steps,
    warmup=args.warmup,
    compile_mode=args.torch_compile,
    parts=args.parts,
  )


def run_row_isolated(
  framework: str, pooling: str, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
  """One row in a fresh Python process, so the device peak is this model's alone."""
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    "--worker",
    f"{framework}:{pooling}:{batch}",
    "--steps",
    str(args.steps),
    "--warmup",
    str(args.warmup),
    "--attention",
    args.attention,
    "--torch-compile",
    args.torch_compile,
  ]
  cmd += ["--tiny"] if args.tiny else []
  cmd += [] if args.parts else ["--no-parts"]
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
  )
  if framework == "jax" and args.autotune_cache:
    # One XLA autotuning cache for the call: each fresh process would otherwise
    # re-tune the backbone's GEMMs and may pick other configurations.
    flag = f"--xla_gpu_per_fusion_autotune_cache_dir={args.autotune_cache}"
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), flag]))
  base = dict(framework=framework, pooling=pooling, batch=batch)
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.row_timeout)
  except subprocess.TimeoutExpired:
    return dict(base, error=f"timed out after {args.row_timeout} s")
  for line in proc.stdout.splitlines():
    if line.startswith(ROW_TAG):
      return json.loads(line[len(ROW_TAG) :])
  return dict(base, error=f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}")


def merge_repeats(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (framework, pooling, batch): the first repeat's, with the median
  ms/step (and pipelined) over the repeats that ran and every repeat's figure."""
  groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault((r["framework"], r["pooling"], r["batch"]), []).append(r)
  out = []
  for group in groups.values():
    ok = [r for r in group if "error" not in r]
    if len(group) == 1 or not ok:
      out.append(group[0])
      continue
    row = dict(ok[0], repeats=len(ok))
    for k in ("ms_per_step", "ms_per_step_pipelined"):
      row[f"{k}_all"] = [r[k] for r in ok]
      row[k] = statistics.median(row[f"{k}_all"])
    out.append(row)
  return out


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per framework and batch: the head's overhead over mean pooling; per batch, JAX / torch."""
  rows = merge_repeats(rows)
  ok = {(r["framework"], r["pooling"], r["batch"]): r for r in rows if "error" not in r}
  out = []
  for (fw, pooling, b), r in ok.items():
    if pooling == "mean" or (fw, "mean", b) not in ok:
      continue
    mean = ok[(fw, "mean", b)]["ms_per_step"]
    out.append(
      dict(
        kind="overhead",
        framework=fw,
        pooling=pooling,
        batch=b,
        overhead_ms=r["ms_per_step"] - mean,
        overhead_pct=100 * (r["ms_per_step"] - mean) / mean,
      )
    )
  torch_over = {s["batch"]: s["overhead_ms"] for s in out if s["framework"] == "torch"}
  for s in out:
    if s["framework"] == "jax" and torch_over.get(s["batch"]):
      s["over_torch_overhead"] = s["overhead_ms"] / torch_over[s["batch"]]
  for b in sorted({b for _, _, b in ok}):
    if ("jax", "mean", b) in ok and ("torch", "mean", b) in ok:
      j, t = ok[("jax", "mean", b)], ok[("torch", "mean", b)]
      s = dict(
        kind="backbone",
        batch=b,
        jax_over_torch=j["ms_per_step"] / t["ms_per_step"],
        jax_ms=j["ms_per_step"],
        torch_ms=t["ms_per_step"],
      )
      jp, tp = j.get("parts", {}), t.get("parts", {})
      if "forward_ms" in jp and "forward_ms" in tp:
        s["forward_jax_ms"], s["forward_torch_ms"] = jp["forward_ms"], tp["forward_ms"]
      s["attention_jax_kernel"] = j.get("attention_kernel")
      for name in ("xla", "cudnn"):
        if jp.get(f"attention_{name}_ms") is not None:
          s[f"attention_jax_{name}_ms"] = jp[f"attention_{name}_ms"]
      if tp.get("attention_sdpa_ms") is not None:
        s["attention_torch_sdpa_ms"] = tp["attention_sdpa_ms"]
      out.append(s)
  return out


def _fmt(x: float | None, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def format_table(rows: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]]) -> str:
  """The closing table: one line per row, overheads beside the head rows, then the backbones."""
  over = {(s["framework"], s["batch"], s["pooling"]): s for s in summary if s["kind"] == "overhead"}
  lines = [
    f"{'framework':<9} {'pooling':<7} {'B':>4} {'ms/step':>9} {'pipelined':>9} "
    f"{'overhead ms':>11} {'overhead %':>10} {'peak MB':>9} {'params':>12}"
  ]
  order = {k: i for i, k in enumerate(FRAMEWORKS + POOLINGS + EXTRA_POOLINGS)}
  rows = merge_repeats(rows)
  for r in sorted(rows, key=lambda r: (r["batch"], order[r["framework"]], order[r["pooling"]])):
    head = f"{r['framework']:<9} {r['pooling']:<7} {r['batch']:>4}"
    if "error" in r:
      lines.append(f"{head} error: {r['error'].splitlines()[-1][:80] if r['error'] else ''}")
      continue
    o = over.get((r["framework"], r["batch"], r["pooling"]))
    lines.append(
      f"{head} {r['ms_per_step']:>9.2f} {r['ms_per_step_pipelined']:>9.2f} "
      f"{_fmt(o['overhead_ms'] if o else None, '+.2f'):>11} "
      f"{_fmt(o['overhead_pct'] if o else None, '+.1f'):>10} "
      f"{_fmt(r.get('peak_mb'), ',.0f'):>9} {r['params']:>12,}"
    )
    if r.get("repeats", 1) > 1:
      each = " ".join(f"{x:.2f}" for x in r["ms_per_step_all"])
      lines.append(f"{'':<9} {'':<7} {'':>4} (median of {r['repeats']}: {each})")
  for s in summary:
    if s["kind"] == "overhead" and "over_torch_overhead" in s:
      lines.append(
        f"overhead B={s['batch']} {s['pooling']}: JAX / torch.compile head overhead "
        f"{s['over_torch_overhead']:.2f}"
      )
  for s in summary:
    if s["kind"] != "backbone":
      continue
    verdict = "slower" if s["jax_over_torch"] > 1 else "not slower"
    lines.append(
      f"backbone B={s['batch']}: JAX / timm step {s['jax_over_torch']:.3f} "
      f"({s['jax_ms']:.2f} vs {s['torch_ms']:.2f} ms, JAX {verdict})"
    )
    if "forward_jax_ms" in s:
      lines.append(
        f"  forward (train mode): JAX {s['forward_jax_ms']:.2f} ms, "
        f"timm {s['forward_torch_ms']:.2f} ms"
      )
    att = ", ".join(
      f"JAX {n} {s[f'attention_jax_{n}_ms']:.2f}"
      for n in ("xla", "cudnn")
      if f"attention_jax_{n}_ms" in s
    )
    if att:
      lines.append(
        f"  attention alone, all layers, fwd+bwd (ms): {att}; torch "
        f"SDPA {_fmt(s.get('attention_torch_sdpa_ms'), '.2f')}; the JAX step "
        f"uses {s['attention_jax_kernel']}"
      )
  return "\n".join(lines)


def write_json(path: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
  """Writes what is done so far (atomically, so a killed run leaves a readable file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(dict(meta=meta, rows=rows, summary=summarize(rows)), f, indent=1)
  os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", nargs="+", type=int, default=[64, 128])
  ap.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
  ap.add_argument(
    "--poolings",
    nargs="+",
    choices=POOLINGS + EXTRA_POOLINGS,
    default=list(POOLINGS),
    help="default: %(default)s; 'xla' is the head with use_kernels=False (JAX only)",
  )
  ap.add_argument("--steps", type=int, default=20, help="timed steps (each way)")
  ap.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--json", default=None, help="JSON path (default: OUT/e2e.json)")
  ap.add_argument(
    "--append",
    action="store_true",
    help="keep the JSON's rows that this run does not redo (a run split in calls)",
  )
  ap.add_argument("--tiny", action="store_true", help="toy sizes for a CPU smoke run")
  ap.add_argument(
    "--attention",
    choices=ATTENTIONS,
    default="auto",
    help="jax.nn.dot_product_attention implementation (auto: JAX picks)",
  )
  ap.add_argument("--torch-compile", choices=TORCH_COMPILE, default="model")
  ap.add_argument(
    "--parts",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="time the forward and the attention alone (mean pooling rows)",
  )
  ap.add_argument(
    "--isolate",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="each row in a fresh process (default: on, off with --tiny)",
  )
  ap.add_argument(
    "--repeats",
    type=int,
    default=1,
    help="run every row this many times, interleaved; tables use the median",
  )
  ap.add_argument(
    "--autotune-cache",
    default="auto",
    help="XLA autotuning cache shared by the JAX rows' processes (auto: a fresh "
    "directory per call; none: each process tunes its own)",
  )
  ap.add_argument("--row-timeout", type=float, default=400.0)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  for name in ("steps", "warmup", "repeats"):
    if getattr(args, name) < 1:
      ap.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
  if any(b < 1 for b in args.batch):
    ap.error(f"--batch: expected ints >= 1, got {args.batch}")
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark; returns what it writes to the JSON."""
  args = parse_args(argv)
  cfg = TINY if args.tiny else VIT_B16
  if args.worker:
    framework, pooling, batch = args.worker.split(":")
    row = run_row(framework, cfg, pooling, int(batch), args)
    print(ROW_TAG + json.dumps(row), flush=True)
    return dict(rows=[row])
  isolate = not args.tiny if args.isolate is None else args.isolate
  if not isolate or args.autotune_cache == "none":
    args.autotune_cache = None
  elif args.autotune_cache == "auto":
    args.autotune_cache = tempfile.mkdtemp(prefix="e2e_autotune_")
  path = args.json or os.path.join(args.out, "e2e.json")
  meta = dict(
    command=" ".join(["benchmarks/e2e.py", *(sys.argv[1:] if argv is None else argv)]),
    config=dataclasses.asdict(cfg),
    steps=args.steps,
    warmup=args.warmup,
    lr=LR,
    weight_decay=WEIGHT_DECAY,
    attention=args.attention,
    torch_compile=args.torch_compile,
    isolated=isolate,
    repeats=args.repeats,
    autotune_cache=args.autotune_cache is not None,
    peak="JAX peak_bytes_in_use / torch max_memory_allocated, "
    + (
      "a fresh process per row" if isolate else "one process: JAX cumulative, torch reset per row"
    ),
  )
  rows: list[dict[str, Any]] = []
  if args.append and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old["meta"]["config"] != meta["config"]:
      raise ValueError(
        f"--append: {path} holds config {old['meta']['config']}, this run has {meta['config']}"
      )
    planned = {(fw, p, b) for fw in args.frameworks for p in args.poolings for b in args.batch}
    rows = [r for r in old["rows"] if (r["framework"], r["pooling"], r["batch"]) not in planned]
    run = {k: meta[k] for k in ("command", "isolated", "peak")}
    meta = {**old["meta"], "appended": [*old["meta"].get("appended", []), run]}
  plan = [
    (b, rep, fw, pooling)
    for b in args.batch
    for rep in range(args.repeats)
    for fw in args.frameworks
    for pooling in args.poolings
    if not (fw == "torch" and pooling not in ("mean", "head"))  # JAX-only options
  ]
  for b, rep, fw, pooling in plan:
    t0 = time.perf_counter()
    row = run_row_isolated(fw, pooling, b, args) if isolate else run_row(fw, cfg, pooling, b, args)
    if args.repeats > 1:
      row["repeat"] = rep
    rows.append(row)
    meta.setdefault("device", row.get("device"))
    if row.get("device", meta["device"]) != meta["device"]:
      print(f"warning: this row ran on {row['device']}, the file's on {meta['device']}")
    status = (
      row.get("error", "").splitlines()[-1:]
      if "error" in row
      else (
        f"{row['ms_per_step']:.2f} ms/step, peak {_fmt(row.get('peak_mb'), ',.0f')} MB, "
        f"compile {row['compile_s']:.1f} s"
      )
    )
    print(f"[{time.perf_counter() - t0:6.1f} s] {fw} {pooling} B={b}: {status}", flush=True)
    write_json(path, meta, rows)
  print(f"device: {meta.get('device')}; config: {meta['config']}; wrote {path}")
  print(format_table(rows, summarize(rows)), flush=True)
  return dict(meta=meta, rows=rows, summary=summarize(rows))


if __name__ == "__main__":
  main()
