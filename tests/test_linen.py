"""MomentHead (flax.linen): presets, the float64 reference, bad and degenerate input."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import head_grads, random_tokens

from moment_jax import PRESET_NAMES, MomentHead, feature_size, grid_graph, preset

B, N, D = 3, 9, 6
SMALL = dict(sketch_dim=16, d_out=8)  # small sketches keep the sweep fast


tokens = functools.partial(random_tokens, shape=(B, N, D))


def init(head, x, graph=None, mask=None):
  return head.init(jax.random.key(0), x, graph, mask, train=False)


def train_apply(head, variables, x, graph=None, mask=None):
  return head.apply(
    variables,
    x,
    graph,
    mask,
    train=True,
    rngs={"dropout": jax.random.key(1)},
    mutable=["batch_stats"],
  )


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_shapes(name):
  head = MomentHead.from_preset(name, **SMALL)
  cfg = preset(name)
  assert head.isqrt_iterations == cfg["isqrt_iterations"] and head.mlp == cfg["mlp"]
  x = tokens()
  v = init(head, x, grid_graph(3, 3))
  f = feature_size(D, cfg["use_third_order"], 16)
  chex.assert_shape(v["params"]["proj"]["kernel"], (f, 8))
  assert ("out" in v["params"]) == (cfg["mlp"] == "double")
  out, upd = train_apply(head, v, x, grid_graph(3, 3))
  chex.assert_shape(out, (B, 8))
  chex.assert_tree_all_finite((out, upd))
  assert set(upd) == {"batch_stats"}


def test_from_preset_overrides_and_full_size_shapes():
  head = MomentHead.from_preset("optimized", d_out=7)
  assert head.d_out == 7 and head.isqrt_iterations == 3
  shapes = jax.eval_shape(
    lambda t: init(MomentHead.from_preset("original"), t),
    jax.ShapeDtypeStruct((4, 196, 768), jnp.float32),
  )
  assert shapes["params"]["proj"]["kernel"].shape == (295296 + 4096, 1024)
  assert shapes["params"]["out"]["kernel"].shape == (1024, 1024)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_eval_matches_float64_head(name):
  """Eval mode (running statistics, no dropout) against the NumPy head."""
  head = MomentHead.from_preset(name, **SMALL, precision="highest")
  x, g = tokens(2), grid_graph(3, 3)
  mask = np.ones((B, N), bool)
  mask[0, -3:] = False
  v = init(head, x, g)
  rng = np.random.default_rng(3)
  v = jax.tree.map(lambda a: a, v)
  v["batch_stats"]["norm"]["mean"] = jnp.asarray(rng.normal(size=8), jnp.float32)
  v["batch_stats"]["norm"]["var"] = jnp.asarray(rng.uniform(0.5, 2, size=8), jnp.float32)
  out = head.apply(v, x, g, mask, train=False)
  cfg = {
    k: getattr(head, k)
    for k in ("isqrt_iterations", "use_third_order", "sketch_dim", "sketch_seed", "eps")
  }
  r = ref.head_eval(jax.tree.map(np.asarray, v), np.asarray(x), g, mask, mlp=head.mlp, **cfg)
  np.testing.assert_allclose(out, r, rtol=1e-4, atol=1e-5)


def test_dropout_and_batch_stats():
  head = MomentHead(d_out=16, dropout_rate=0.5)
  x = tokens()
  v = init(head, x)
  a, _ = train_apply(head, v, x)
  b, _ = head.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
  assert not np.allclose(a, b)  # different dropout keys
  np.testing.assert_array_equal(head.apply(v, x, train=False), head.apply(v, x, train=False))
  _, upd = train_apply(head, v, x)
  assert not np.allclose(upd["batch_stats"]["norm"]["mean"], 0)  # momentum 0.9 update
  with pytest.raises(Exception, match="dropout"):  # no rng: flax's own error
    head.apply(v, x, train=True, mutable=["batch_stats"])


def test_jit_grad_vmap_friendly():
  head = MomentHead(d_out=8, isqrt_iterations=2)
  x = tokens()
  v = init(head, x)

  @jax.jit
  def loss(params, t):
    out, _ = head.apply(
      {"params": params, "batch_stats": v["batch_stats"]},
      t,
      train=True,
      rngs={"dropout": jax.random.key(0)},
      mutable=["batch_stats"],
    )
    return jnp.sum(out**2)

  gp, gt = jax.grad(loss, argnums=(0, 1))(v["params"], x)
  chex.assert_tree_all_finite((gp, gt))
  chex.assert_trees_all_equal_shapes(gp, v["params"])
  ev = jax.vmap(lambda t: head.apply(v, t, train=False))(jnp.stack([x, x + 1]))
  chex.assert_shape(ev, (2, B, 8))


# -- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(isqrt_iterations=0), r"isqrt_iterations: expected an int >= 1, got 0"),
    (dict(use_third_order=True, sketch_dim=0), r"sketch_dim: expected an int >= 1, got 0"),
    (dict(d_out=0), r"d_out: expected an int >= 1, got 0"),
    (dict(mlp="triple"), r"mlp: expected one of single, double, got 'triple'"),
    (dict(dropout_rate=1.0), r"dropout_rate"),
    (dict(policy="float8"), r"policy: unknown name 'float8'; valid names are float32"),
    (dict(remat_policy="sometimes"), r"remat_policy: unknown policy 'sometimes'"),
    (dict(d_reduce=0), r"d_reduce"),
    (dict(isqrt_chunk=0), r"isqrt_chunk"),
  ],
)
def test_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    init(MomentHead(**kwargs), tokens())


def test_sketch_dim_only_checked_with_third_order():
  init(MomentHead(d_out=4, sketch_dim=0), tokens())


def test_unknown_preset():
  with pytest.raises(ValueError, match=r"preset: unknown name 'fast'; valid names are original"):
    MomentHead.from_preset("fast")


@pytest.mark.parametrize(
  "args,match",
  [
    (
      (tokens(shape=(N, D)),),
      r"tokens: expected rank 3 \[batch, tokens, dim\], got shape \(9, 6\)",
    ),
    (
      (tokens(), jnp.ones((N, N + 1))),
      r"graph: expected shape \(9, 9\) or \(3, 9, 9\) for tokens of shape "
      r"\(3, 9, \.\.\.\), got \(9, 10\)",
    ),
    ((tokens(), jnp.ones((2, N, N))), r"graph: .* got \(2, 9, 9\)"),
    ((tokens(), None, jnp.ones((B, N + 1), bool)), r"mask: expected shape \(3, 9\), got \(3, 10\)"),
    ((tokens(), -jnp.ones((N, N))), r"graph: expected non-negative edge weights"),
    ((jnp.ones((B, N, D), jnp.int32),), r"tokens: expected a floating dtype"),
  ],
)
def test_bad_inputs(args, match):
  head = MomentHead(d_out=4)
  with pytest.raises(ValueError, match=match):
    head.init(jax.random.key(0), *args, train=False)


def test_width_differs_from_parameters():
  head = MomentHead(d_out=4)
  v = init(head, tokens())
  with pytest.raises(ValueError, match=r"tokens: width \(last axis\) 7 differs from the width 6"):
    head.apply(v, tokens(shape=(B, N, 7)), train=False)
  reduced = MomentHead(d_out=4, d_reduce=3)
  v = init(reduced, tokens())
  with pytest.raises(ValueError, match=r"width \(last axis\) 5 differs from the width 6"):
    reduced.apply(v, tokens(shape=(B, N, 5)), train=False)


def test_value_checks_opt_in():
  head = MomentHead(d_out=4, check_values=True)
  x = tokens()
  v = init(head, x)
  bad = x.at[0, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"tokens: expected finite values, found 1 NaN/Inf"):
    head.apply(v, bad, train=False)
  mask = np.ones((B, N), bool)
  mask[1] = False
  with pytest.raises(
    ValueError, match=r"mask: every sample needs at least one valid .* rows \[1\]"
  ):
    head.apply(v, x, None, mask, train=False)
  # under jit the same check runs on the host and its message comes back
  with pytest.raises(Exception, match=r"tokens: expected finite values"):
    jax.jit(lambda t: head.apply(v, t, train=False))(bad).block_until_ready()
  with pytest.raises(Exception, match=r"graph: expected non-negative edge weights"):
    jax.jit(lambda g: head.apply(v, x, g, train=False))(-jnp.ones((N, N))).block_until_ready()


# -- degenerate but valid input --------------------------------------------------


def _finite_everywhere(head, x, graph=None, mask=None):
  out, grads = head_grads(head, init(head, x, graph, mask), x, graph, mask)
  chex.assert_tree_all_finite((jnp.sum(out**2), out, grads))


CASES = {
  "constant tokens": lambda: (jnp.full((B, N, D), 3.0), None, None),
  "isolated tokens": lambda: (tokens(), jnp.zeros((N, N)).at[:4, :4].set(1.0), None),
  "all-zero graph": lambda: (tokens(), jnp.zeros((B, N, N)), None),
  "scale 1e-6": lambda: (tokens(scale=1e-6), grid_graph(3, 3), None),
  "scale 1e6": lambda: (tokens(scale=1e6), grid_graph(3, 3), None),
  "single valid token": lambda: (
    tokens(),
    grid_graph(3, 3),
    jnp.zeros((B, N), bool).at[:, 0].set(True),
  ),
  "all-padding row": lambda: (tokens(), grid_graph(3, 3), jnp.ones((B, N), bool).at[1].set(False)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("third,k", [(False, 1), (True, 3)])
def test_degenerate_inputs_stay_finite(case, third, k):
  head = MomentHead(d_out=8, use_third_order=third, isqrt_iterations=k, sketch_dim=16)
  _finite_everywhere(head, *CASES[case]())
