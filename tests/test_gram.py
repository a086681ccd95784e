"""The square root on the Gram matrix (`ops.gram`, `isqrt_space="token"`): the
same numbers as the channel form and the float64 reference, the same
gradients, no D x D x D product anywhere."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import equations, head_grads, random_tokens
from jax.test_util import check_grads
from test_ops import random_graph, random_mask, rel_err

from moment_jax import MomentHead, grid_graph, ops
from moment_jax.ops import gram as gram_ops
from moment_jax.ops import sqrtm as sq
from moment_jax.ops.gram import aligned_tokens

B, N, D = 3, 9, 24  # fewer tokens than channels, as in ViT-B (196 < 768)
G = grid_graph(3, 3)


tokens = functools.partial(random_tokens, shape=(B, N, D))


def _token_root(x, mask, k, norm="trace", **kw):
  hc, n = ops.center(x, mask)
  return ops.gram_sqrtm(
    ops.token_gram(hc, n, precision=kw.get("precision")), hc, n, 1e-5, k, normalization=norm, **kw
  )


@pytest.mark.parametrize("norm", sq.NORMALIZATIONS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 10])
def test_matches_the_polynomial(norm, k):
  """Against the spec's iteration (docs/math.md section 3) on the D x D moment in
  float64. Float32 at the
  highest precision; 1e-5 for the Z-only loop (K <= 7): round-off of ~1e-7 per
  product grown over <= 27 products, the channel form's bound too. The coupled
  loop (K >= 8) carries two iterates whose round-off the Gram form amplifies
  by up to ||U||^2 / ||M||: 1.5e-5 (trace) and 5.1e-5 (frobenius) at K = 10
  against the channel form's 3e-6, hence 1e-4 there (docs/numerics.md)."""
  rng = np.random.default_rng(k)
  x = rng.normal(size=(B, N, D)) * np.array([1.0, 30.0, 0.03])[:, None, None]
  mask = random_mask(rng, B, N)
  want = ref.newton_schulz(ref.second_moment(x, mask), k, norm)
  got = _token_root(jnp.asarray(x, jnp.float32), jnp.asarray(mask), k, norm, precision="highest")
  assert got.shape == (B, D, D) and got.dtype == jnp.float32
  assert rel_err(got, want) < (1e-5 if k <= sq.Z_ONLY_MAX_ITERATIONS else 1e-4)


@pytest.mark.parametrize("third", [False, True])
@pytest.mark.parametrize("graph", [None, "shared", "batched"])
def test_features_match_channel_space_and_reference(graph, third):
  rng = np.random.default_rng(3)
  x = tokens(3)
  g = None if graph is None else jnp.asarray(random_graph(rng, B, N, graph == "shared"))
  mask = jnp.asarray(random_mask(rng, B, N))
  kw = dict(isqrt_iterations=5, use_third_order=third, sketch_dim=16, precision="highest")
  token = ops.moment_features(x, g, mask, isqrt_space="token", **kw)
  channel = ops.moment_features(x, g, mask, isqrt_space="channel", **kw)
  want = ref.moment_features(
    np.asarray(x, np.float64),
    None if g is None else np.asarray(g),
    np.asarray(mask),
    isqrt_iterations=5,
    use_third_order=third,
    sketch_dim=16,
  )
  assert rel_err(token, want) < 1e-5 and rel_err(channel, want) < 1e-5
  chex.assert_trees_all_equal(token, ops.moment_features(x, g, mask, **kw))  # auto: token


def test_auto_takes_the_cheaper_space():
  assert ops.use_token_space(196, 768, 3) and ops.use_token_space(196, 768, 5)
  assert ops.use_token_space(9, 24, 5)
  assert not ops.use_token_space(16, 12, 5)  # more tokens than channels
  assert not ops.use_token_space(64, 64, 3)
  assert ops.use_token_space(64, 64, 3, "token") and not ops.use_token_space(9, 24, 3, "channel")


def _dot_operands(jaxpr):
  """The operand avals of every `dot_general`, sub-jaxprs (pjit, custom rules, loops) included."""
  for eqn in equations(jaxpr):
    if eqn.primitive.name == "dot_general":
      yield tuple(v.aval for v in eqn.invars)


def _dots(jaxpr):
  return (tuple(a.shape for a in avals) for avals in _dot_operands(jaxpr))


@pytest.mark.parametrize("k, gemms", [(1, 0), (2, 3), (3, 7)])
def test_products_with_identity_iterates_are_skipped(k, gemms):
  """A = M / c and the first Z are `s I` in P: products with them take one
  token GEMM or none, so K=3 runs 7 [N, N] products instead of 3 (3K - 3) = 12
  (on tokens padded to aligned rows, `ops.gram.aligned_tokens`)."""
  x = tokens(0)
  hc, n = x - x.mean(1, keepdims=True), jnp.full((B,), N)
  fn = lambda h: ops.gram_sqrtm(ops.token_gram(h, n), h, n, 1e-5, k)
  jaxpr = jax.make_jaxpr(fn)(hc).jaxpr
  r = aligned_tokens(N, jnp.float32)
  assert sum(s == ((B, r, r), (B, r, r)) for s in _dots(jaxpr)) == gemms


@pytest.mark.parametrize("k", [3, 9])
def test_no_channel_cubed_product(k):
  """The whole training step, forward and backward: every product has a
  token-sized side, so none costs D^3 (and at K=9 the loop is the coupled one)."""
  head = MomentHead(d_out=4, isqrt_iterations=k)
  x = tokens()
  v = head.init(jax.random.key(0), x, G, train=False)
  jaxpr = jax.make_jaxpr(lambda p, t: head_grads(head, {**v, "params": p}, t, G, key=1))(
    v["params"], x
  ).jaxpr
  shapes = list(_dots(jaxpr))
  assert shapes
  assert not [s for s in shapes if all(dims[-2:] == (D, D) for dims in s)], shapes
  channel = dataclasses.replace(head, isqrt_space="channel")
  jaxpr = jax.make_jaxpr(lambda p, t: head_grads(channel, {**v, "params": p}, t, G, key=1))(
    v["params"], x
  ).jaxpr
  assert [s for s in _dots(jaxpr) if all(dims[-2:] == (D, D) for dims in s)]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.usefixtures("x64")
# Each K with one normalisation (both normalisations share every product;
# they differ only in the scale c): K=1 the closed form, K=2 no loop, K=5 the
# peeled iteration and the Z-only loop, K=9 the coupled loop.
@pytest.mark.parametrize("k,norm", [(1, "trace"), (2, "frobenius"), (5, "trace"), (9, "frobenius")])
def test_grads_second_order(k, norm):
  """Order 2, forward and reverse, with respect to the tokens; K=9 runs the
  coupled loop. A masked token is in the input (its gradient is zero)."""
  x = jnp.asarray(np.random.default_rng(k).normal(size=(2, 4, 7)))
  mask = jnp.asarray([[True, True, True, False], [True] * 4])
  check_grads(
    lambda t: _token_root(t, mask, k, norm, precision="highest"),
    (x,),
    order=2,
    modes=["fwd", "rev"],
    atol=1e-5,
    rtol=1e-5,
  )


@pytest.mark.usefixtures("x64")
def test_grads_head():
  """Parameters and tokens, training mode, graph, mask and third order."""
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(3, 5, 8)))
  g = jnp.asarray(random_graph(rng, 3, 5, False), jnp.float64)
  mask = jnp.asarray(random_mask(rng, 3, 5))
  head = MomentHead(
    d_out=3,
    isqrt_iterations=3,
    use_third_order=True,
    sketch_dim=8,
    dropout_rate=0.0,
    param_dtype=jnp.float64,
    dtype=jnp.float64,
    precision="highest",
    isqrt_space="token",
  )
  v = head.init(jax.random.key(0), x, g, mask, train=False)

  def f(params, t):
    return head.apply(
      {"params": params, "batch_stats": v["batch_stats"]},
      t,
      g,
      mask,
      train=True,
      mutable=["batch_stats"],
    )[0]

  check_grads(f, (v["params"], x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-6)


@pytest.mark.parametrize(
  "remat,chunk",
  [("isqrt", None), (None, 2), ("features", 2), ("save_only_these_names:moment,sqrtm", None)],
)
def test_remat_and_chunk(remat, chunk):
  base = MomentHead(d_out=8, isqrt_iterations=4, precision="highest")
  x = tokens(1)
  mask = jnp.ones((B, N), bool).at[0, -2:].set(False)
  v = base.init(jax.random.key(0), x, G, mask, train=False)
  ref_out, ref_g = head_grads(base, v, x, G, mask, key=1)
  out, g = head_grads(
    dataclasses.replace(base, remat_policy=remat, isqrt_chunk=chunk), v, x, G, mask, key=1
  )
  # float32 round-off of a recomputed or batched program: 1e-5 of each tree's scale
  scale = lambda t: max(float(jnp.max(jnp.abs(l))) for l in jax.tree.leaves(t))
  chex.assert_trees_all_close(out, ref_out, rtol=1e-5, atol=1e-5 * scale(ref_out))
  chex.assert_trees_all_close(g, ref_g, rtol=1e-5, atol=1e-5 * scale(ref_g))


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_bfloat16_policy_tracks_float32(scale):
  """bf16 operands (8-bit mantissa, 4e-3 per rounding) over ~15 products:
  within 3e-2 of the float32 features, as the channel form."""
  x = tokens(2, scale=scale)
  kw = dict(isqrt_iterations=3)
  f32 = ops.moment_features(x, G, isqrt_space="token", precision="highest", **kw)
  for space in ("token", "channel"):
    bf = ops.moment_features(
      x, G, isqrt_space=space, moment_dtype=jnp.bfloat16, sqrt_dtype=jnp.bfloat16, **kw
    )
    assert bf.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(bf)))
    assert rel_err(bf, f32) < 3e-2, space


def test_degenerate_tokens_stay_finite():
  """Constant tokens (a zero Gram matrix: the root is sqrt(eps) I), a single
  valid token and an all-padding row."""
  x = tokens(4).at[0].set(1.0)
  mask = jnp.ones((B, N), bool).at[1, 1:].set(False).at[2].set(False)
  f = ops.moment_features(x, G, mask, isqrt_space="token", precision="highest")
  assert bool(jnp.all(jnp.isfinite(f)))
  want = ops.moment_features(x, G, mask, isqrt_space="channel", precision="highest")
  assert rel_err(f, want) < 1e-5
  g = jax.grad(lambda t: ops.moment_features(t, G, mask, isqrt_space="token").sum())(x)
  assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (
      dict(isqrt_space="gram"),
      r"isqrt_space: expected one of auto, channel, token, "
      r"got 'gram'",
    ),
    (
      dict(isqrt_space="token", isqrt_method="eigh"),
      r"isqrt_space: 'token' runs the "
      r"Newton–Schulz iteration",
    ),
  ],
)
def test_bad_options(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ops.moment_features(tokens(), **kwargs)
  with pytest.raises(ValueError, match=match):
    MomentHead(d_out=4, **kwargs).init(jax.random.key(0), tokens(), train=False)


def _gram_loss(gram, w):
  """A scalar of the Gram matrix with a non-symmetric cotangent `w`."""
  return lambda h, n: jnp.sum(w * jnp.sin(gram(h, n)))


def _plain_gram(h, n):
  """`token_gram` without its derivative rule, differentiated by JAX."""
  g = jnp.einsum("bnd,bmd->bnm", h, h, precision="highest", preferred_element_type=jnp.float32)
  return g / n.astype(jnp.float32)[:, None, None]


def _gram_case(seed=4):
  """Masked centred tokens (zero padding rows), their counts and a cotangent weight."""
  rng = np.random.default_rng(seed)
  hc, n = ops.center(tokens(seed), jnp.asarray(random_mask(rng, B, N)))
  return hc, n, jnp.asarray(rng.normal(size=(B, N, N)), jnp.float32)


def test_token_gram_forward_is_the_einsum():
  hc, n, _ = _gram_case()
  got = jax.jit(lambda h, c: ops.token_gram(h, c, precision="highest"))(hc, n)
  chex.assert_trees_all_equal(got, jax.jit(_plain_gram)(hc, n))


@pytest.mark.parametrize("transform", ["grad", "jit", "vmap", "checkpoint"])
def test_token_gram_grads_match_autodiff(transform):
  """Its derivative rule against JAX's derivative of the plain einsum, with respect
  to the tokens and the counts, float32 at the highest precision: only the
  summation order differs (one product of the symmetrised cotangent instead of
  two), ~1e-7 of round-off. The checkpoint is `remat_isqrt`'s."""
  hc, n, w = _gram_case()
  gram = functools.partial(ops.token_gram, precision="highest")
  got, want = (jax.grad(_gram_loss(f, w), argnums=(0, 1)) for f in (gram, _plain_gram))
  if transform == "jit":
    got = jax.jit(got)
  elif transform == "checkpoint":
    policy = jax.checkpoint_policies.nothing_saveable
    got = jax.grad(jax.checkpoint(_gram_loss(gram, w), policy=policy), argnums=(0, 1))
  elif transform == "vmap":  # over two stacked batches: the tokens and twice them
    dh, dn = jax.vmap(got)(jnp.stack([hc, 2 * hc]), jnp.stack([n, n]))
    for i, scale in enumerate([1, 2]):
      want_h, want_n = want(scale * hc, n)
      assert rel_err(dh[i], want_h) < 1e-6 and rel_err(dn[i][:, None], want_n[:, None]) < 1e-6
    return
  dh, dn = got(hc, n)
  want_h, want_n = want(hc, n)
  assert dh.dtype == jnp.float32 and dn.dtype == jnp.float32
  assert rel_err(dh, want_h) < 1e-6 and rel_err(dn[:, None], want_n[:, None]) < 1e-6


def test_token_gram_integer_counts():
  """An integer `n` (no tangent: float0) still gives the token gradient."""
  hc, _, w = _gram_case()
  n = jnp.full((B,), N)
  loss = lambda h: _gram_loss(functools.partial(ops.token_gram, precision="highest"), w)(h, n)
  want = jax.grad(lambda h: _gram_loss(_plain_gram, w)(h, n))(hc)
  assert rel_err(jax.grad(loss)(hc), want) < 1e-6


def test_token_gram_bfloat16_grads():
  """bfloat16 tokens get a bfloat16 gradient. Against the float32 derivative of the
  same (bf16-exact) tokens: the backward rounds the symmetrised cotangent and
  the result to bf16, unit round-off 2^-8 = 3.9e-3 each, so 1e-2 norm-wise."""
  hc, n, w = _gram_case()
  h16, n16 = hc.astype(jnp.bfloat16), n.astype(jnp.bfloat16)
  got = jax.grad(_gram_loss(ops.token_gram, w))(h16, n16)
  want = jax.grad(_gram_loss(_plain_gram, w))(h16.astype(jnp.float32), n)
  assert got.dtype == jnp.bfloat16
  assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("remat", [False, True])
def test_token_gram_bfloat16_backward_has_no_float32_product(remat):
  """The point of the derivative rule: with bf16 tokens, JAX's own derivative of
  the float32-accumulated Gram product multiplies the float32 cotangent with
  upcast tokens (a float32 GEMM); the rule's backward is a bf16 GEMM. Under
  `remat_isqrt`'s checkpoint too."""
  hc, n, w = _gram_case()
  loss = _gram_loss(ops.token_gram, w)
  if remat:
    loss = jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable)
  h16, n16 = hc.astype(jnp.bfloat16), n.astype(jnp.bfloat16)
  dots = list(_dot_operands(jax.make_jaxpr(jax.grad(loss))(h16, n16).jaxpr))
  assert all(a.dtype == jnp.bfloat16 for avals in dots for a in avals), dots
  assert len(dots) == 2 + remat  # the forward (again under remat) and the backward


def test_bfloat16_head_step_has_no_float32_token_product():
  """The whole bfloat16-policy training step in token space: every batched
  (`[batch, ., .]`) product, forward and backward, takes bf16 operands (the
  float32 ones left are the `[batch, features]` output projection's)."""
  head = MomentHead(d_out=4, isqrt_iterations=3, policy="bfloat16", isqrt_space="token")
  x = tokens()
  v = head.init(jax.random.key(0), x, G, train=False)
  jaxpr = jax.make_jaxpr(lambda p, t: head_grads(head, {**v, "params": p}, t, G, key=1))(
    v["params"], x
  ).jaxpr
  batched = [avals for avals in _dot_operands(jaxpr) if all(a.ndim == 3 for a in avals)]
  assert batched
  assert not [s for s in batched if any(a.dtype == jnp.float32 for a in s)], batched


# -- token rows padded to 16 bytes (`ops.gram.aligned_tokens`) -------------------

NP, DP = 18, 64  # 18 tokens: 20 float32 rows (80 bytes), 24 bf16 rows (48 bytes)
GP = grid_graph(3, 6)


def _padded_head_grads(monkeypatch, align, head, x, graph, mask):
  monkeypatch.setattr(gram_ops, "ROW_ALIGN_BYTES", align)
  v = head.init(jax.random.key(0), x, graph, mask, train=False)
  # A fresh function per call: a cached trace would hide the setting.
  fn = jax.jit(lambda v, x: head_grads(head, v, x, graph, mask))
  jaxpr = jax.make_jaxpr(fn)(v, x).jaxpr
  return fn(v, x), {s[-2:] for avals in _dots(jaxpr) for s in avals}


@pytest.mark.parametrize(
  "policy, preset, kw, graph",
  [
    ("float32", "optimized", {}, "shared"),
    ("bfloat16", "optimized", {}, "shared"),
    ("bfloat16", "optimized", {}, "batched"),
    ("bfloat16", "optimized", {}, None),
    ("bfloat16", "optimized", dict(isqrt_chunk=2), "shared"),
    ("float32", "performance", dict(sketch_dim=64, isqrt_normalization="frobenius"), "batched"),
  ],
)
def test_aligned_token_rows_give_the_unpadded_numbers(monkeypatch, policy, preset, kw, graph):
  """The head with its token rows padded (the default) against the same head
  unpadded (`ROW_ALIGN_BYTES = 1`), masks included: outputs and gradients.

  Padding is exact (zero token rows add nothing to the Gram matrix's products,
  and every iterate stays block-diagonal), so the two agree to the products'
  rounding: 1e-5 of the largest entry in float32, one bf16 unit (2^-8) in
  bfloat16. The third-order case runs in float32: in bfloat16, XLA:CPU fuses
  the unpadded propagation into the sketch without rounding its output to
  bf16 once, and the sketch's power normalisation turns that into 8%.
  """
  rng = np.random.default_rng(3)
  x = tokens(1, shape=(B, NP, DP))
  mask = random_mask(rng, B, NP)
  g = {"shared": GP, "batched": random_graph(rng, B, NP, False), None: None}[graph]
  head = MomentHead.from_preset(preset, policy=policy, dropout_rate=0.0, d_out=16, **kw)
  (out, (dp, dx)), padded = _padded_head_grads(monkeypatch, 16, head, x, g, mask)
  (out1, (dp1, dx1)), plain = _padded_head_grads(monkeypatch, 1, head, x, g, mask)
  rows = 24 if policy == "bfloat16" else 20
  assert (rows, rows) in padded and (rows, rows) not in plain  # the setting took effect
  assert (NP, NP) in plain and (NP, NP) not in padded  # no unpadded token-space product
  tol = 1e-5 if policy == "float32" else 2.0**-8
  for got, want in [(out, out1), (dp, dp1), (dx, dx1)]:
    # Over a tree's largest entry: a bias in front of the BatchNorm has a zero gradient.
    a, b = (
      np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(y)])
      for y in (got, want)
    )
    assert np.isfinite(a).all()
    assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)), np.max(np.abs(a - b)) / np.max(
      np.abs(b)
    )


def test_aligned_tokens_and_pad_tokens():
  assert [aligned_tokens(n, jnp.bfloat16) for n in (1, 8, 9, 196)] == [8, 8, 16, 200]
  assert [aligned_tokens(n, jnp.float32) for n in (1, 4, 5, 196)] == [4, 4, 8, 196]
  assert aligned_tokens(7, jnp.float64) == 8
  x = jnp.arange(6.0).reshape(1, 2, 3)
  y = gram_ops.pad_tokens(x, 4, axes=(-2, -1))
  assert y.shape == (1, 4, 4)
  np.testing.assert_array_equal(y[:, :2, :3], x)
  assert float(jnp.abs(y).sum()) == float(x.sum())  # the rest is zeros
  assert gram_ops.pad_tokens(x, 2) is x
