"""`kernels.triu_project_adamw`: the projection whose backward takes the AdamW
step on its kernel (Pallas interpreter on CPU), against the XLA path's
gradient fed to `optax.adamw`."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT as OWG
from flax.training import train_state

from moment_jax import MomentHead, grid_graph
from moment_jax.kernels import FusedAdamW, Tiles, triu_project, triu_project_adamw
from moment_jax.ops import split_matmul, triu_vector

DIM, D_OUT = 12, 24  # F = 78: several row tiles of 16
TILES = Tiles(fwd_m=16, fwd_n=16, fwd_k=16, bwd_m=16, bwd_n=16, bwd_k=16)


def _inputs(batch, s_dtype=jnp.float32, extra=0):
  k = jax.random.split(jax.random.key(batch + extra), 4)
  f = DIM * (DIM + 1) // 2 + extra
  s = jax.random.normal(k[0], (batch, DIM, DIM)).astype(s_dtype)
  w = jax.random.normal(k[1], (f, D_OUT)) / np.sqrt(f)
  b = jax.random.normal(k[2], (D_OUT,))
  x = jax.random.normal(k[3], (batch, extra)).astype(s_dtype) if extra else None
  return s, w, b, x


def _loss_xla(s, w, b, x):
  f = triu_vector(s)
  if x is not None:
    f = jnp.concatenate([f, x.astype(f.dtype)], axis=-1)
  y = split_matmul(f.astype(w.dtype), w) + b
  return jnp.sum(jnp.sin(y))


def _run(opt, steps, batch, s_dtype=jnp.float32, extra=0, tiles=TILES, dtype=None):
  """`steps` updates both ways; returns (fused state, optax state, fused dS, XLA dS).
  With `dtype`, both run the products in it: the reference is `triu_project`'s
  gradient (the XLA path has no such products)."""
  s, w, b, x = _inputs(batch, s_dtype, extra)
  tx = optax.adamw(opt.learning_rate, opt.b1, opt.b2, opt.eps, weight_decay=opt.weight_decay)
  ref_w, ref_state = w, tx.init(w)
  md = jnp.dtype(opt.moment_dtype)
  fw, mu, nu, count = w, jnp.zeros(w.shape, md), jnp.zeros(w.shape, md), jnp.zeros(())

  def fused_loss(s, fw, mu, nu, count):
    y = triu_project_adamw(s, fw, b, mu, nu, count, opt, extra=x, tiles=tiles, dtype=dtype)
    return jnp.sum(jnp.sin(y))

  def kernel_loss(s, w, b, x):
    return jnp.sum(jnp.sin(triu_project(s, w, b, extra=x, tiles=tiles, dtype=dtype)))

  fused = jax.jit(jax.grad(fused_loss, argnums=(0, 1, 2, 3, 4)))
  ref = jax.jit(jax.grad(_loss_xla if dtype is None else kernel_loss, argnums=(0, 1)))
  for _ in range(steps):
    ds, fw, mu, nu, count = fused(s, fw, mu, nu, count)
    ds_ref, g = ref(s, ref_w, b, x)
    upd, ref_state = tx.update(g, ref_state, ref_w)
    ref_w = optax.apply_updates(ref_w, upd)
  return (fw, mu, nu, count, ds), (ref_w, ref_state, ds_ref)


@pytest.mark.parametrize("batch", [5, 16, 40])  # one batch block; 40: three (split kernels)
@pytest.mark.parametrize("extra", [0, 7])
def test_matches_optax_adamw(batch, extra):
  opt = FusedAdamW(learning_rate=1e-2, weight_decay=0.05)
  (fw, mu, nu, count, ds), (ref_w, ref_state, ds_ref) = _run(opt, 3, batch, extra=extra)
  adam = ref_state[0]
  # float32 everywhere; only the summation order of the gradient differs (terms of
  # O(1) over up to 40 rows: absolute errors of a few 1e-7 in the gradient).
  chex.assert_trees_all_close(fw, ref_w, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(mu, adam.mu, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(nu, adam.nu, rtol=1e-5, atol=1e-9)
  assert float(count) == 3.0 == float(adam.count)
  chex.assert_trees_all_close(ds, ds_ref, rtol=1e-5, atol=1e-6)
  assert not np.allclose(fw, _inputs(batch, extra=extra)[1])  # it moved


@pytest.mark.parametrize(
  "change", [{}, dict(dw_m=4, dw_n=32, dw_k=32, dw_warps=2)]
)  # the update kernel on the dS kernel's tiles, then on its own
def test_schedule_and_split_tiles(change):
  sched = optax.linear_schedule(1e-2, 1e-3, 4)
  opt = FusedAdamW(learning_rate=sched, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.0)
  tiles = dataclasses.replace(TILES, bwd_split=True, **change)
  (fw, mu, nu, _, _), (ref_w, ref_state, _) = _run(opt, 4, 8, tiles=tiles)
  chex.assert_trees_all_close(fw, ref_w, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(nu, ref_state[0].nu, rtol=1e-5, atol=1e-9)


def test_bfloat16_moments_and_s():
  opt = FusedAdamW(learning_rate=1e-2, moment_dtype=jnp.bfloat16)
  (fw, mu, nu, _, ds), (ref_w, ref_state, ds_ref) = _run(opt, 2, 8, s_dtype=jnp.bfloat16)
  assert mu.dtype == nu.dtype == jnp.bfloat16 and fw.dtype == jnp.float32
  assert ds.dtype == jnp.bfloat16
  # Moments stored in bf16: errors of one bf16 unit (2^-8) of the largest moment,
  # and each of the 2 steps (at most ~lr) off by twice that fraction.
  mu_ref = ref_state[0].mu
  bound = 2**-8 * float(jnp.max(jnp.abs(mu_ref)))
  chex.assert_trees_all_close(mu.astype(jnp.float32), mu_ref, rtol=0, atol=bound)
  chex.assert_trees_all_close(fw, ref_w, rtol=0, atol=2 * 1e-2 * 2 * 2**-8)
  np.testing.assert_array_equal(ds, ds_ref)  # dS does not depend on the moments


@pytest.mark.parametrize("batch", [16, 40])  # 40: the split kernels
def test_bfloat16_products(batch):
  """`dtype=bfloat16` (the bf16 policy's products): the update is optax's on
  `triu_project(dtype=bfloat16)`'s gradient, which the same tiles compute in
  the same order: float32 update round-off only."""
  opt = FusedAdamW(learning_rate=1e-2, weight_decay=0.05)
  (fw, mu, nu, _, ds), (ref_w, ref_state, ds_ref) = _run(
    opt, 3, batch, s_dtype=jnp.bfloat16, extra=5, dtype=jnp.bfloat16
  )
  chex.assert_trees_all_close(fw, ref_w, rtol=0, atol=1e-6)
  mu_ref = ref_state[0].mu
  chex.assert_trees_all_close(mu, mu_ref, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(mu_ref))))
  np.testing.assert_array_equal(ds, ds_ref)


def test_forward_equals_triu_project():
  s, w, b, _ = _inputs(6)
  z = jnp.zeros_like(w)
  y = triu_project_adamw(s, w, b, z, z, jnp.zeros(()), FusedAdamW(), tiles=TILES)
  np.testing.assert_array_equal(y, triu_project(s, w, b, tiles=TILES))


def test_bad_arguments():
  s, w, b, _ = _inputs(2)
  z = jnp.zeros_like(w)
  c = jnp.zeros(())
  with pytest.raises(ValueError, match=r"mu: expected \(78, 24\) float32"):
    triu_project_adamw(s, w, b, z[:3], z, c, FusedAdamW())
  with pytest.raises(ValueError, match=r"nu: expected .* bfloat16"):
    triu_project_adamw(s, w, b, z.astype(jnp.bfloat16), z, c, FusedAdamW(moment_dtype=jnp.bfloat16))
  with pytest.raises(ValueError, match="count: expected a float32 scalar"):
    triu_project_adamw(s, w, b, z, z, jnp.zeros((), jnp.int32), FusedAdamW())
  with pytest.raises(ValueError, match=r"fused_adamw.b1: expected a float in \[0, 1\)"):
    triu_project_adamw(s, w, b, z, z, c, FusedAdamW(b1=1.0))
  with pytest.raises(ValueError, match="fused_adamw.learning_rate"):
    triu_project_adamw(s, w, b, z, z, c, FusedAdamW(learning_rate="fast"))
  with pytest.raises(ValueError, match="adamw: expected a FusedAdamW"):
    triu_project_adamw(s, w, b, z, z, c, optax.adamw(1e-3))


def _train(head, variables, tokens, graph, steps, tx):
  """`steps` TrainState steps (flax honours the overwrite-with-gradient collection)."""
  state = train_state.TrainState.create(
    apply_fn=head.apply, params={k: v for k, v in variables.items() if k != "batch_stats"}, tx=tx
  )
  stats = variables["batch_stats"]

  def loss_fn(params, stats):
    out, upd = head.apply(
      {**params, "batch_stats": stats}, tokens, graph, train=True, mutable=["batch_stats"]
    )
    return jnp.mean(jnp.square(out - 0.3)), upd["batch_stats"]

  @jax.jit
  def step(state, stats):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, stats)
    return state.apply_gradients(grads=grads), stats, loss

  losses = []
  for _ in range(steps):
    state, stats, loss = step(state, stats)
    losses.append(float(loss))
  return state.params, losses


@pytest.mark.parametrize("preset", ["optimized", "performance"])  # with the sketch block
def test_head_trains_as_optax_adamw(preset):
  kw = dict(d_out=16, dropout_rate=0.0, sketch_dim=8, use_kernels=True)
  opt = FusedAdamW(learning_rate=1e-2, weight_decay=1e-2)
  fused = MomentHead.from_preset(preset, fused_adamw=opt, **kw)
  plain = MomentHead.from_preset(preset, **kw)
  tokens = jax.random.normal(jax.random.key(1), (6, 16, 8))
  graph = grid_graph(4, 4)
  vf = fused.init(jax.random.key(0), tokens, graph, train=False)
  vp = plain.init(jax.random.key(0), tokens, graph, train=False)
  np.testing.assert_array_equal(vf[OWG]["proj"]["kernel"], vp["params"]["proj"]["kernel"])
  tx = optax.adamw(1e-2, weight_decay=1e-2)
  pf, lf = _train(fused, vf, tokens, graph, 3, tx)
  pp, lp = _train(plain, vp, tokens, graph, 3, tx)
  np.testing.assert_allclose(lf, lp, rtol=1e-5)
  assert lf[-1] < lf[0]
  # float32; the kernel's gradient is summed in another order (absolute ~1e-7).
  np.testing.assert_allclose(pf[OWG]["proj"]["kernel"], pp["params"]["proj"]["kernel"], atol=2e-6)
  chex.assert_trees_all_close(pf["params"]["norm"], pp["params"]["norm"], atol=2e-6)
  # The bias's exact gradient is 0 (BatchNorm follows), so Adam turns round-off
  # into steps of up to ~lr: bounded, not compared.
  assert float(jnp.max(jnp.abs(pf["params"]["proj"]["bias"]))) <= 3 * 1e-2 * 1.01
  assert float(pf[OWG]["proj"]["count"]) == 3.0


def test_head_refuses_without_kernel_path():
  opt = FusedAdamW()
  with pytest.raises(ValueError, match="fused_adamw: the update runs in the Pallas projection"):
    MomentHead(use_kernels=False, fused_adamw=opt).validate()
  with pytest.raises(ValueError, match="fused_adamw: the update runs in the Pallas projection"):
    MomentHead(isqrt_chunk=2, fused_adamw=opt).validate()
  with pytest.raises(ValueError, match="fused_adamw: expected None or a moment_jax.kernels"):
    MomentHead(fused_adamw=optax.adamw(1e-3)).validate()
