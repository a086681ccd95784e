"""MomentHead (flax.nnx) against the Linen head: same weights, same numbers."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_tokens

from moment_jax import PRESET_NAMES, grid_graph
from moment_jax.linen import MomentHead as LinenHead
from moment_jax.nnx import MomentHead, linen_to_nnx, nnx_to_linen

B, N, D = 4, 9, 8
SMALL = dict(sketch_dim=16, d_out=8)  # small sketches keep the sweep fast

# Tolerances. Both heads trace the same ops on the same weights (eagerly they
# agree bit for bit); float32 1e-6 leaves room only for XLA fusing a few
# elementwise ops differently under jit. bfloat16: Dense and BatchNorm outputs
# are rounded to bf16, whose spacing is 2^-8..2^-7 relative, so a last-bit
# difference in an f32 intermediate can move an output by one bf16 ulp; rtol
# 2^-7 allows that and no more (rounding BatchNorm's f32 statistics to bf16,
# as NNX's default promotion would, gives 2-6% and fails).
TOL = {"float32": dict(rtol=1e-6, atol=1e-6), "bfloat16": dict(rtol=2**-7, atol=1e-3)}
# Running statistics are float32 in both policies (BatchNorm reduces in f32).
STATS_TOL = {"float32": dict(rtol=1e-6, atol=1e-6), "bfloat16": dict(rtol=1e-5, atol=1e-6)}


tokens = functools.partial(random_tokens, shape=(B, N, D))


def pair(name, policy, **kw):
  """An NNX head and the Linen variables it was loaded from."""
  cfg = dict(SMALL, policy=policy, **kw)
  model = MomentHead.from_preset(name, D, rngs=nnx.Rngs(0), **cfg)
  linen = LinenHead.from_config(model.config)
  variables = linen.init(jax.random.key(1), tokens(), train=False)
  # Non-trivial running statistics, so eval mode tests them too.
  rng = np.random.default_rng(2)
  variables = {
    "params": variables["params"],
    "batch_stats": {
      "norm": {
        "mean": jnp.asarray(rng.normal(size=8), jnp.float32),
        "var": jnp.asarray(rng.uniform(0.5, 2, size=8), jnp.float32),
      }
    },
  }
  return linen_to_nnx(variables, model), linen, variables


@pytest.mark.parametrize("policy", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_same_numbers_as_linen(name, policy):
  model, linen, variables = pair(name, policy, dropout_rate=0.0)
  x, g = tokens(3), grid_graph(3, 3)
  mask = np.ones((B, N), bool)
  mask[1, -4:] = False

  model.eval()
  want = linen.apply(variables, x, g, mask, train=False)
  got = model(x, g, mask)
  assert got.dtype == want.dtype == jnp.float32
  chex.assert_trees_all_close(got, want, **TOL[policy])

  model.train()
  want, upd = linen.apply(variables, x, g, mask, train=True, mutable=["batch_stats"])
  got = model(x, g, mask)
  chex.assert_trees_all_close(got, want, **TOL[policy])
  chex.assert_trees_all_close(
    nnx_to_linen(model)["batch_stats"], upd["batch_stats"], **STATS_TOL[policy]
  )
  # The running statistics moved: the comparison above is not of two copies
  # of the starting values.
  assert not np.allclose(
    upd["batch_stats"]["norm"]["mean"], variables["batch_stats"]["norm"]["mean"]
  )


@pytest.mark.parametrize(
  "extra",
  [
    dict(d_reduce=5),
    dict(isqrt_chunk=3, remat_policy="features"),
    dict(remat_policy="isqrt", mlp="double"),
  ],
)
def test_same_numbers_variants_under_jit(extra):
  """The reduce layer, the fused chunked projection and remat, jitted both sides."""
  model, linen, variables = pair("optimized", "float32", dropout_rate=0.0, **extra)
  x = tokens(4)
  want, upd = jax.jit(lambda v, x: linen.apply(v, x, train=True, mutable=["batch_stats"]))(
    variables, x
  )
  got = nnx.jit(lambda m, x: m(x))(model, x)
  chex.assert_trees_all_close(got, want, **TOL["float32"])
  chex.assert_trees_all_close(
    nnx_to_linen(model)["batch_stats"], upd["batch_stats"], **STATS_TOL["float32"]
  )


def test_same_gradients_as_linen():
  model, linen, variables = pair("performance", "float32", dropout_rate=0.0)
  x, g = tokens(5), grid_graph(3, 3)

  def linen_loss(params):
    out, _ = linen.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      g,
      train=True,
      mutable=["batch_stats"],
    )
    return jnp.mean(out**2)

  want = jax.grad(linen_loss)(variables["params"])
  got = nnx.grad(lambda m: jnp.mean(m(x, g) ** 2))(model)
  got = nnx.to_pure_dict(got)
  # Gradients pass through BatchNorm's 1/std on 4 samples: allow a few ulps more.
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_round_trip_and_submodule_names():
  model = MomentHead.from_preset("original", D, rngs=nnx.Rngs(3), d_reduce=6, **SMALL)
  variables = nnx_to_linen(model)
  assert set(variables["params"]) == {"reduce", "proj", "norm", "out"}
  assert set(variables["batch_stats"]) == {"norm"}
  chex.assert_shape(variables["params"]["proj"]["kernel"], (6 * 7 // 2 + 16, 8))
  model.eval()
  x = tokens(6)
  chex.assert_trees_all_close(
    model(x), LinenHead.from_config(model.config).apply(variables, x, train=False), **TOL["float32"]
  )
  other = MomentHead.from_preset("original", D, rngs=nnx.Rngs(4), d_reduce=6, **SMALL)
  linen_to_nnx(variables, other)
  chex.assert_trees_all_equal(nnx_to_linen(other), variables)


def test_dropout_on_in_train_off_in_eval():
  model = MomentHead(D, d_out=64, dropout_rate=0.5, rngs=nnx.Rngs(params=0, dropout=1))
  x = tokens(7)
  a, b = model(x), model(x)  # train mode by default; the stream advances
  assert not np.allclose(a, b)
  zeros = np.mean(np.asarray(a) == 0)
  assert 0.2 < zeros < 0.8, zeros  # ~half the (non-zero, after GELU) entries dropped
  model.eval()
  c, d = model(x), model(x)
  chex.assert_trees_all_equal(c, d)
  assert np.mean(np.asarray(c) == 0) < 0.05
  model.train()
  assert not model.dropout.deterministic and not model.norm.use_running_average


def test_eval_mode_uses_running_statistics():
  model = MomentHead(D, d_out=8, dropout_rate=0.0, rngs=nnx.Rngs(0))
  model.eval()
  before = nnx_to_linen(model)["batch_stats"]
  model(tokens(8))
  chex.assert_trees_all_equal(nnx_to_linen(model)["batch_stats"], before)
  model.train()
  model(tokens(8))
  assert not np.allclose(nnx_to_linen(model)["batch_stats"]["norm"]["var"], before["norm"]["var"])


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(d_out=0), "d_out"),
    (dict(mlp="triple"), "mlp"),
    (dict(isqrt_iterations=0), "isqrt_iterations"),
    (dict(use_third_order=True, sketch_dim=0), "sketch_dim"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(policy="float8"), "policy"),
    (dict(remat_policy="nope"), "remat_policy"),
    (dict(isqrt_chunk=0), "isqrt_chunk"),
    (dict(d_reduce=0), "d_reduce"),
  ],
)
def test_bad_config_raises(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MomentHead(D, rngs=nnx.Rngs(0), **kwargs)


def test_bad_input_and_conversion_raise():
  with pytest.raises(ValueError, match="d_in"):
    MomentHead(0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="preset"):
    MomentHead.from_preset("huge", D, rngs=nnx.Rngs(0))
  model = MomentHead(D, d_out=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="width"):
    model(tokens(shape=(B, N, D + 1)))
  with pytest.raises(ValueError, match="graph"):
    model(tokens(), jnp.ones((N + 1, N + 1)))
  other = LinenHead(d_out=8).init(jax.random.key(0), tokens(shape=(B, N, D + 1)), train=False)
  before = nnx_to_linen(model)
  with pytest.raises(ValueError, match="proj/kernel"):
    linen_to_nnx(other, model)
  chex.assert_trees_all_equal(nnx_to_linen(model), before)  # left untouched
