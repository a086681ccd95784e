"""benchmarks/e2e.py and benchmarks/vit.py at toy sizes on CPU (the timings come from GPU
runs; here only that the steps train, the JSON holds what the docs read, and
that the JAX ViT is timm's architecture)."""

import json
import math
import os
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import e2e, vit  # noqa: E402


def _param_count(cfg, pooling):
  model = vit.ViT(config=cfg, pooling=pooling)
  images = jnp.zeros((2, cfg.image, cfg.image, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, images, train=False), jax.random.key(0))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def _vit_params(cfg):
  """ViT parameters counted from the architecture, layer by layer (timm's layout)."""
  w, m = cfg.width, cfg.mlp_dim
  block = 2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
  embed = cfg.patch * cfg.patch * 3 * w + w + cfg.tokens * w
  return embed + cfg.depth * block


def test_vit_b16_is_the_counted_architecture():
  cfg = vit.VIT_B16
  expected = _vit_params(cfg) + 2 * cfg.width + cfg.width * cfg.classes + cfg.classes
  assert _param_count(cfg, "mean") == expected


def test_vit_rejects_bad_input():
  with pytest.raises(ValueError, match="image: expected a multiple of patch"):
    vit.ViTConfig(image=30, patch=8)
  with pytest.raises(ValueError, match="attention: expected one of"):
    vit.attention_implementation("flash", "gpu")
  model = vit.ViT(config=vit.TINY)
  with pytest.raises(ValueError, match=r"images: expected shape \[batch, 32, 32, 3\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)


def test_xla_pooling_is_the_head_without_kernels(monkeypatch):
  seen = []
  original = vit.MomentHead.from_preset

  def from_preset(*args, **kwargs):
    seen.append(kwargs.get("use_kernels"))
    return original(*args, **kwargs)

  monkeypatch.setattr(vit.MomentHead, "from_preset", from_preset)
  images = jnp.zeros((2, 32, 32, 3))
  out = {}
  for pooling in ("head", "xla"):
    model = vit.ViT(config=vit.TINY, pooling=pooling)
    variables = model.init(jax.random.key(0), images, train=False)
    out[pooling] = model.apply(variables, images, train=False)
  assert seen[0] is None and seen[-1] is False  # auto for "head", off for "xla"
  # on the CPU both run the XLA path: the same logits
  np.testing.assert_array_equal(out["head"], out["xla"])
  with pytest.raises(SystemExit):  # a JAX-only pooling, but a valid choice
    e2e.parse_args(["--poolings", "pallas"])
  assert e2e.parse_args(["--poolings", "mean", "xla"]).poolings == ["mean", "xla"]


def test_time_fn_keeps_no_output_alive():
  # A kept training-mode forward holds its activations: on the GPU that ran out of memory.
  class Out:
    pass

  made, alive = [], []

  def fn():
    alive.append(sum(r() is not None for r in made))
    out = Out()
    made.append(weakref.ref(out))
    return out

  assert e2e.time_fn(fn, lambda _: None, warmup=2, iters=3) >= 0
  assert len(made) == 5 and max(alive) <= 1  # at most the previous call's, until replaced


def test_repeats_merge_to_medians():
  def row(fw, pooling, ms, **kw):
    return dict(
      framework=fw,
      pooling=pooling,
      batch=64,
      ms_per_step=ms,
      ms_per_step_pipelined=ms,
      params=1,
      **kw,
    )

  rows = [
    row("jax", "mean", 20.0),
    row("jax", "head", 24.0),
    row("jax", "mean", 21.0),
    row("jax", "head", 22.0),
    row("jax", "mean", 19.5),
    row("jax", "head", 30.0),
    row("torch", "mean", 20.0),
    row("torch", "head", 26.0),
    row("torch", "head", 0.0, error="boom"),  # failed repeats are left out
  ]
  merged = {(r["framework"], r["pooling"]): r for r in e2e.merge_repeats(rows)}
  assert merged["jax", "head"]["ms_per_step"] == 24.0
  assert merged["jax", "head"]["ms_per_step_all"] == [24.0, 22.0, 30.0]
  assert merged["torch", "head"]["ms_per_step"] == 26.0 and merged["torch", "head"]["repeats"] == 1
  over = {(s["framework"], s["pooling"]): s for s in e2e.summarize(rows) if s["kind"] == "overhead"}
  assert over["jax", "head"]["overhead_ms"] == 24.0 - 20.0
  assert over["jax", "head"]["over_torch_overhead"] == 4.0 / 6.0
  assert "(median of 3: 24.00 22.00 30.00)" in e2e.format_table(rows, e2e.summarize(rows))


def test_isolated_jax_rows_share_one_autotuning_cache(monkeypatch, tmp_path):
  seen = []

  def fake_run(cmd, env, **kw):
    seen.append(env.get("XLA_FLAGS", ""))
    return type("Proc", (), dict(stdout="", stderr="", returncode=1))()

  monkeypatch.setattr(e2e.subprocess, "run", fake_run)
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  args = e2e.parse_args(["--autotune-cache", str(tmp_path)])
  for fw in ("jax", "jax", "torch"):
    assert "error" in e2e.run_row_isolated(fw, "mean", 2, args)
  flag = f"--xla_gpu_per_fusion_autotune_cache_dir={tmp_path}"
  assert seen == [f"--xla_foo=1 {flag}"] * 2 + ["--xla_foo=1"]


@pytest.mark.slow
def test_e2e_tiny_jax(tmp_path):
  path = tmp_path / "e2e.json"
  steps, warmup = 2, 1
  e2e.main(
    [
      "--tiny",
      "--frameworks",
      "jax",
      "--batch",
      "2",
      "--steps",
      str(steps),
      "--warmup",
      str(warmup),
      "--json",
      str(path),
    ]
  )
  data = json.loads(path.read_text())
  assert set(data) == {"meta", "rows", "summary"}
  rows = {r["pooling"]: r for r in data["rows"]}
  assert set(rows) == {"mean", "head", "fused", "fused16"}
  for r in rows.values():
    assert "error" not in r, r.get("error")
    assert {
      "framework",
      "batch",
      "ms_per_step",
      "ms_per_step_pipelined",
      "params",
      "peak_mb",
      "compiled_temp_mb",
      "compile_s",
      "losses",
      "attention_kernel",
    } <= set(r)
    assert r["batch"] == 2 and r["ms_per_step"] > 0 and r["compiled_temp_mb"] > 0
    assert len(r["losses"]) == warmup + 2 * steps
    assert np.all(np.isfinite(r["losses"]))
    assert r["attention_kernel"] == "xla"  # no cuDNN on CPU
  # The fused AdamW head trains as the head under optax.adamw: the same first loss
  # (same parameters; on CPU the head runs the XLA path, the fused one the
  # kernels' bf16 products), then they drift apart: the projection bias's exact
  # gradient is 0 (BatchNorm over 2 samples follows), and Adam turns the two
  # paths' different round-off into different steps of up to lr. (The update
  # itself is checked against optax in test_fused_adamw.py.) The first losses agree
  # within one bf16 unit (2^-8), the two paths' different bf16 rounding (1.8e-3
  # apart since the centred graph, 37a282c).
  fused, head = rows["fused"]["losses"], rows["head"]["losses"]
  np.testing.assert_allclose(fused[0], head[0], rtol=2**-8)
  np.testing.assert_allclose(fused, head, rtol=1e-1)
  assert rows["fused"]["params"] == rows["head"]["params"] == rows["fused16"]["params"]
  fused16 = rows["fused16"]["losses"]  # bf16 moments
  np.testing.assert_allclose(fused16[0], head[0], rtol=2**-8)
  np.testing.assert_allclose(fused16, head, rtol=1e-1)
  over = {s["pooling"] for s in data["summary"] if s["kind"] == "overhead"}
  assert over == {"head", "fused", "fused16"}
  assert rows["head"]["params"] > rows["mean"]["params"]
  assert rows["mean"]["params"] == _param_count(vit.TINY, "mean")
  assert rows["mean"]["parts"]["forward_ms"] > 0
  (over,) = [s for s in data["summary"] if s["kind"] == "overhead" and s["pooling"] == "head"]
  assert over["framework"] == "jax" and over["batch"] == 2
  assert over["overhead_ms"] == pytest.approx(
    rows["head"]["ms_per_step"] - rows["mean"]["ms_per_step"]
  )


# The PyTorch side (timm) is not installable on CI's CPU machine (timm needs
# torchvision, which has no CPU build there); benchmarks/e2e.py records both
# parameter counts on the GPU (86,566,120 each for the mean-pooling ViT-B/16).
