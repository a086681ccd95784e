"""The NNX head with `fused_adamw`: `FusedState` variables whose gradients are
their new values, trained as the non-fused NNX head with `optax.adamw` and
converted to and from the Linen fused head (Pallas interpreter on CPU)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT as OWG

from moment_jax import grid_graph
from moment_jax.kernels import FusedAdamW
from moment_jax.linen import MomentHead as LinenHead
from moment_jax.nnx import FusedState, MomentHead, Projection, linen_to_nnx, nnx_to_linen

D_IN, LR, WD = 8, 1e-2, 1e-2
KW = dict(d_out=16, dropout_rate=0.0, sketch_dim=8, use_kernels=True)
OPT = FusedAdamW(learning_rate=LR, weight_decay=WD)
PRESETS = ["optimized", "performance"]  # performance: with the sketch block


def _tokens(seed=1, batch=6):
  return jax.random.normal(jax.random.key(seed), (batch, 16, D_IN))


def _loss(model, tokens, graph):
  return jnp.mean(jnp.square(model(tokens, graph) - 0.3))


@nnx.jit
def _fused_step(model, optimizer, tokens, graph):
  """The recipe of `FusedState`'s docstring."""
  diff = nnx.DiffState(0, nnx.Any(nnx.Param, FusedState))
  loss, grads = nnx.value_and_grad(_loss, argnums=diff)(model, tokens, graph)
  fused, params = nnx.split_state(grads, FusedState, ...)
  optimizer.update(model, params)
  nnx.update(model, fused)
  return loss


@nnx.jit
def _plain_step(model, optimizer, tokens, graph):
  loss, grads = nnx.value_and_grad(_loss)(model, tokens, graph)
  optimizer.update(model, grads)
  return loss


def _heads(preset):
  fused = MomentHead.from_preset(preset, D_IN, fused_adamw=OPT, rngs=nnx.Rngs(0), **KW)
  plain = MomentHead.from_preset(preset, D_IN, rngs=nnx.Rngs(0), **KW)
  return fused, plain


def test_fused_state_layout():
  fused, plain = _heads("optimized")
  proj = fused.proj
  assert isinstance(proj.kernel, FusedState) and not isinstance(proj.kernel, nnx.Param)
  assert isinstance(proj.bias, nnx.Param)
  for name in ("mu", "nu"):
    m = getattr(proj, name)
    assert isinstance(m, FusedState)
    assert m.shape == proj.kernel.shape == (36, 16) and m.dtype == jnp.float32
    np.testing.assert_array_equal(m[...], 0.0)
  assert isinstance(proj.count, FusedState)
  assert proj.count.shape == () and proj.count.dtype == jnp.float32 and proj.count[...] == 0
  # Same draw as the nnx.Param kernel of the non-fused head; the rest alike.
  np.testing.assert_array_equal(proj.kernel[...], plain.proj.kernel[...])
  np.testing.assert_array_equal(proj.bias[...], plain.proj.bias[...])
  chex.assert_trees_all_equal(nnx.state(fused.norm), nnx.state(plain.norm))
  assert set(nnx.to_pure_dict(nnx.state(fused, FusedState))["proj"]) == {
    "kernel",
    "mu",
    "nu",
    "count",
  }
  assert nnx.state(plain, FusedState) == nnx.State({})
  bf16 = FusedAdamW(moment_dtype=jnp.bfloat16)
  head = MomentHead(D_IN, fused_adamw=bf16, rngs=nnx.Rngs(0), **KW)
  assert head.proj.mu.dtype == head.proj.nu.dtype == jnp.bfloat16
  assert head.proj.kernel.dtype == jnp.float32


@pytest.mark.parametrize("preset", PRESETS)
def test_head_trains_as_optax_adamw(preset):
  fused, plain = _heads(preset)
  tx = optax.adamw(LR, weight_decay=WD)
  opt_f = nnx.Optimizer(fused, tx, wrt=nnx.Param)
  opt_p = nnx.Optimizer(plain, tx, wrt=nnx.Param)
  # The optimizer keeps no state for the fused kernel.
  assert set(opt_f.opt_state[0].mu["proj"]) == {"bias"}
  tokens, graph = _tokens(), grid_graph(4, 4)
  lf = [float(_fused_step(fused, opt_f, tokens, graph)) for _ in range(3)]
  lp = [float(_plain_step(plain, opt_p, tokens, graph)) for _ in range(3)]
  np.testing.assert_allclose(lf, lp, rtol=1e-5)
  assert lf[-1] < lf[0]
  # float32; the kernel's gradient is summed in another order (absolute ~1e-7).
  np.testing.assert_allclose(fused.proj.kernel[...], plain.proj.kernel[...], atol=2e-6)
  chex.assert_trees_all_close(
    nnx.state(fused.norm, nnx.Param), nnx.state(plain.norm, nnx.Param), atol=2e-6
  )
  np.testing.assert_allclose(fused.norm.var[...], plain.norm.var[...], rtol=1e-5, atol=2e-6)
  # The bias's exact gradient is 0 (BatchNorm follows), so Adam turns round-off
  # into steps of up to ~lr: bounded, not compared. The running mean carries the
  # bias (momentum 0.9, the biases of steps 1 and 2): off by at most 0.19 * 2 * 3 lr.
  assert float(jnp.max(jnp.abs(fused.proj.bias[...]))) <= 3 * LR * 1.01
  np.testing.assert_allclose(fused.norm.mean[...], plain.norm.mean[...], atol=0.19 * 6 * LR)
  assert float(fused.proj.count[...]) == 3.0
  # Adam's moments are optax's for the kernel.
  adam = opt_p.opt_state[0]
  np.testing.assert_allclose(fused.proj.mu[...], adam.mu["proj"]["kernel"][...], atol=1e-6)
  np.testing.assert_allclose(fused.proj.nu[...], adam.nu["proj"]["kernel"][...], atol=1e-8)


@pytest.mark.parametrize("preset", PRESETS)
def test_linen_round_trip(preset):
  tokens, graph = _tokens(), grid_graph(4, 4)
  model, _ = _heads(preset)
  linen = LinenHead.from_config(model.config)
  variables = linen.init(jax.random.key(3), tokens, graph, train=False)
  assert set(variables) == {"params", "batch_stats", OWG}
  # Non-trivial moments and count, so the conversion is seen to move them.
  owg = jax.tree.map(lambda x: x + 0.5, variables[OWG])
  variables = {**variables, OWG: owg}
  linen_to_nnx(variables, model)
  np.testing.assert_array_equal(model.proj.kernel[...], owg["proj"]["kernel"])
  np.testing.assert_array_equal(model.proj.mu[...], owg["proj"]["mu"])
  assert float(model.proj.count[...]) == 0.5

  want, _ = linen.apply(variables, tokens, graph, train=True, mutable=["batch_stats"])
  chex.assert_trees_all_close(model(tokens, graph), want, rtol=1e-6, atol=1e-6)
  back = nnx_to_linen(model)
  assert set(back) == {"params", "batch_stats", OWG}
  chex.assert_trees_all_equal(back[OWG], owg)
  chex.assert_trees_all_equal(back["params"], variables["params"])


def _snapshot(model):
  """Copies of the weights and statistics (`nnx.state` aliases the model's variables)."""
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat, FusedState))
  return jax.tree.map(np.array, nnx.to_pure_dict(state))


def test_converters_name_fused_adamw():
  tokens, graph = _tokens(), grid_graph(4, 4)
  fused, plain = _heads("optimized")
  linen_plain = LinenHead.from_config(plain.config)
  linen_fused = LinenHead.from_config(fused.config)
  v_plain = linen_plain.init(jax.random.key(3), tokens, graph, train=False)
  v_fused = linen_fused.init(jax.random.key(3), tokens, graph, train=False)
  before = _snapshot(fused)
  with pytest.raises(ValueError, match=f"fused_adamw=FusedAdamW.*expected an '{OWG}'"):
    linen_to_nnx(v_plain, fused)
  chex.assert_trees_all_equal(_snapshot(fused), before)  # nothing was loaded
  with pytest.raises(ValueError, match=f"fused_adamw=None, so expected no '{OWG}'"):
    linen_to_nnx(v_fused, plain)
  # Mismatched shapes inside the collection: named, nothing loaded.
  bad = {**v_fused, OWG: {"proj": {**v_fused[OWG]["proj"], "mu": jnp.zeros((3, 16))}}}
  with pytest.raises(ValueError, match=r"_overwrite_with_gradient.*\n.*proj/mu: expected"):
    linen_to_nnx(bad, fused)
  chex.assert_trees_all_equal(_snapshot(fused), before)
  assert OWG not in nnx_to_linen(plain)
  # The snapshot sees a load.
  linen_to_nnx(v_fused, fused)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(_snapshot(fused), before)


def test_xla_paths_refused():
  proj = Projection(10, 3, adamw=OPT, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="fused_adamw: .*only Projection.triangle"):
    proj(jnp.ones((2, 10)))
  with pytest.raises(ValueError, match="fused_adamw: .*only Projection.triangle"):
    proj.chunked(lambda t, g, m: t, jnp.ones((2, 10)), None, None, chunk=1)
  y = proj.triangle(jnp.ones((2, 4, 4)))
  assert y.shape == (2, 3)
  with pytest.raises(ValueError, match="fused_adamw: the update runs in the Pallas"):
    MomentHead(D_IN, fused_adamw=OPT, use_kernels=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="fused_adamw: the update runs in the Pallas"):
    MomentHead(D_IN, fused_adamw=OPT, isqrt_chunk=2, rngs=nnx.Rngs(0))


def test_owg_name_is_flax_constant():
  from moment_jax import nnx as mnnx

  assert mnnx._OWG == OWG
