"""Every op of moment_jax.ops against the float64 NumPy reference of docs/math.md.

Tolerances: the ops run in float32 (highest matmul precision). Relative
errors are norm-wise per sample, ||x - ref|| / ||ref||. float32 has a unit
round-off of 6e-8; the pipeline chains O(10) reductions and products over
dimensions <= 64 here, so 1e-5 covers each op with margin and 1e-4 (the
issue's contract) the whole pipeline. Gradients are checked in float64 with
finite differences (`jax.test_util.check_grads`), where round-off does not
drown the difference quotient.
"""

import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from absl.testing import parameterized
from helpers import equations
from jax.test_util import check_grads

from moment_jax import memory, ops


def rel_err(x, r):
  x = np.asarray(x, np.float64).reshape(len(r), -1)
  r = np.asarray(r, np.float64).reshape(len(r), -1)
  return float(np.max(np.linalg.norm(x - r, axis=1) / np.linalg.norm(r, axis=1)))


def random_graph(rng, b, n, shared):
  shape = (n, n) if shared else (b, n, n)
  g = rng.uniform(0, 1, shape) * (rng.uniform(0, 1, shape) < 0.4)
  return (g + np.swapaxes(g, -1, -2)).astype(np.float32)


def random_mask(rng, b, n):
  m = rng.uniform(size=(b, n)) < 0.7
  m[:, 0] = True
  return m


def spd(rng, b, d, cond=10.0):
  q, _ = np.linalg.qr(rng.normal(size=(b, d, d)))
  w = np.geomspace(1.0, 1.0 / cond, d) * rng.uniform(0.5, 2.0, (b, 1))
  return ((q * w[:, None, :]) @ np.swapaxes(q, -1, -2)).astype(np.float32)


# -- graph -------------------------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_normalize_graph(shared, masked):
  rng = np.random.default_rng(0)
  g = random_graph(rng, 3, 9, shared)
  g[..., 2, :] = 0  # an isolated token
  g[..., :, 2] = 0
  mask = random_mask(rng, 3, 9) if masked else None
  out = ops.normalize_graph(jnp.asarray(g), 1e-5, None if mask is None else jnp.asarray(mask))
  np.testing.assert_allclose(out, ref.normalize_graph(g, 1e-5, mask), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_centred_graph_propagates_centred_tokens(shared, masked):
  # The pipeline propagates with `center_graph`'s C: C x must be the reference's
  # propagation followed by its centring, padding rows zero.
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 9, 5)).astype(np.float32) + 3.0  # a mean to remove
  g = random_graph(rng, 3, 9, shared)
  mask = random_mask(rng, 3, 9) if masked else None
  m = None if mask is None else jnp.asarray(mask)
  c = ops.center_graph(ops.normalize_graph(jnp.asarray(g), 1e-5, m), m)
  want, n = ref.center(ref.propagate(x, g, 1e-5, mask), mask)
  assert rel_err(ops.propagate(c, jnp.asarray(x)), want) < 1e-6
  np.testing.assert_array_equal(ops.token_count(jnp.asarray(x), m), n)


def test_shared_graph_propagation_keeps_the_graph_not_its_broadcast():
  # The shared graph is applied as a batched product (for XLA's layouts); its
  # `[batch, tokens, tokens]` broadcast must not become a backward residual.
  rng = np.random.default_rng(3)
  a = jnp.asarray(random_graph(rng, 1, 16, shared=True))
  x = jnp.asarray(rng.normal(size=(8, 16, 4)), jnp.float32)
  saved = memory.residuals(lambda x: jnp.sum(ops.propagate(a, x) ** 2), x)
  assert (8, 16, 16) not in [r.shape for r, _ in saved], saved
  with jax.enable_x64(True):
    a64, x64 = a.astype(jnp.float64), x.astype(jnp.float64)
    check_grads(ops.propagate, (a64, x64), order=1, modes=["rev"])


def test_shared_graph_equals_its_broadcast():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 16, 5)).astype(np.float32)
  g = random_graph(rng, 3, 16, shared=True)
  a = ops.moment_features(x, g)
  b = ops.moment_features(x, np.broadcast_to(g, (3, 16, 16)))
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("conn,deg", [(4, (2, 3, 4)), (8, (3, 5, 8))])
def test_grid_graph(conn, deg):
  g = ops.grid_graph(4, 5, connectivity=conn, self_loops=False)
  assert g.shape == (20, 20) and g.dtype == np.float32
  np.testing.assert_array_equal(g, g.T)
  assert set(g.sum(-1).astype(int)) == set(deg)  # corner, edge, interior
  assert g[0, 1] == 1 and g[0, 5] == 1 and g[0, 6] == (conn == 8) and g[0, 2] == 0
  np.testing.assert_array_equal(np.diag(ops.grid_graph(4, 5, conn)), 1)


def test_grid_graph_bad_connectivity():
  with pytest.raises(ValueError, match="connectivity"):
    ops.grid_graph(3, 3, connectivity=6)


# -- moment ------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
def test_second_moment(masked):
  rng = np.random.default_rng(2)
  h = rng.normal(size=(3, 11, 6)).astype(np.float32) * 3 + 1
  mask = random_mask(rng, 3, 11) if masked else None
  out = ops.second_moment(jnp.asarray(h), None if mask is None else jnp.asarray(mask))
  assert out.shape == (3, 6, 6) and out.dtype == jnp.float32
  assert rel_err(out, ref.second_moment(h, mask)) < 1e-5


def test_padding_changes_nothing():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 9, 6)).astype(np.float32)
  g = random_graph(rng, 2, 9, shared=False)
  pad = 4
  xp = np.concatenate([x, rng.normal(size=(2, pad, 6)).astype(np.float32) * 100], 1)
  gp = np.zeros((2, 9 + pad, 9 + pad), np.float32)
  gp[:, :9, :9] = g
  gp[:, 9:, :] = rng.uniform(size=(2, pad, 9 + pad))  # padding edges are ignored
  mask = np.arange(9 + pad)[None, :].repeat(2, 0) < 9
  for third in (False, True):
    kw = dict(isqrt_iterations=4, use_third_order=third, sketch_dim=16)
    a = ops.moment_features(x, g, **kw)
    b = ops.moment_features(xp, gp, mask, **kw)
    assert rel_err(b, a) < 1e-5


# -- Newton–Schulz -------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_newton_schulz_matches_polynomial(k):
  m = spd(np.random.default_rng(k), 3, 12, cond=100.0)
  out = ops.sqrtm_newton_schulz(jnp.asarray(m), k)
  assert out.shape == m.shape and out.dtype == jnp.float32
  assert rel_err(out, ref.newton_schulz(m, k)) < 1e-5


def test_newton_schulz_converges_to_eigh_root():
  m = spd(np.random.default_rng(7), 4, 16, cond=3.0)
  exact = ref.sqrtm_eigh(m)
  errs = [rel_err(ops.sqrtm_newton_schulz(jnp.asarray(m), k), exact) for k in range(1, 9)]
  assert all(b < a for a, b in zip(errs[:5], errs[1:6])), errs
  assert errs[-1] < 1e-5, errs
  np.testing.assert_allclose(ref.newton_schulz(m, 12), exact, rtol=1e-9, atol=1e-9)


def _products(jaxpr, dim, loop_trips):
  """D x D x D products in a jaxpr: (outside the loop, inside one loop body, #loops)."""
  outside, inside, loops = 0, 0, 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      outside += int(np.prod(eqn.outvars[0].aval.shape)) // (dim * dim)
    elif eqn.primitive.name in ("while", "scan"):
      loops += 1
      if eqn.primitive.name == "scan":  # fori_loop with static bounds lowers to scan
        assert eqn.params["length"] == loop_trips
      body = eqn.params.get("body_jaxpr", eqn.params.get("jaxpr"))
      o, i, l = _products(body.jaxpr, dim, loop_trips)
      assert l == 0 and i == 0
      inside += o
    else:
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        o, i, l = _products(sub, dim, loop_trips)
        outside, inside, loops = outside + o, inside + i, loops + l
  return outside, inside, loops


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
def test_newton_schulz_product_count_and_loop(k):
  d = 8
  jaxpr = jax.make_jaxpr(functools.partial(ops.sqrtm_newton_schulz, iterations=k))(jnp.eye(d)[None])
  outside, inside, loops = _products(jaxpr.jaxpr, d, k - 2)
  if k == 1:
    assert (outside, loops) == (1, 0)
    return
  # a single fori_loop whose body holds 3 products; 3 more outside: 3K - 3 in all
  assert loops == 1 and inside == 3 and outside == 3
  assert outside + inside * (k - 2) == 3 * k - 3


def test_newton_schulz_rejects_bad_iterations():
  for k in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="isqrt_iterations"):
      ops.sqrtm_newton_schulz(jnp.eye(3)[None], k)
  with pytest.raises(ValueError, match=r"square.*\(2, 3, 4\)"):
    ops.sqrtm_newton_schulz(jnp.ones((2, 3, 4)), 3)


# -- triangle ----------------------------------------------------------------


def test_triu_vector_order():
  s = jnp.arange(2 * 5 * 5, dtype=jnp.float32).reshape(2, 5, 5)
  np.testing.assert_array_equal(ops.triu_vector(s), ref.triu_vector(np.asarray(s)))
  assert ops.triu_vector(s).shape == (2, 15) == (2, ops.triu_size(5))


def test_triu_indices_are_a_host_constant():
  assert ops.triu_flat_indices(7) is ops.triu_flat_indices(7)
  jaxpr = jax.make_jaxpr(ops.triu_vector)(jnp.zeros((2, 7, 7)))
  prims = {e.primitive.name for e in jaxpr.eqns}
  assert "iota" not in prims and "gather" in prims


# -- sketch ------------------------------------------------------------------


def test_sketch_hashes_are_specs_draws():
  h, s = ops.sketch_hashes(10, 7, seed=3)
  rh, rs = ref.hashes(10, 7, seed=3)
  np.testing.assert_array_equal(h, np.stack(rh))
  np.testing.assert_array_equal(s, np.stack(rs))
  assert set(np.unique(s)) <= {-1.0, 1.0} and h.min() >= 0 and h.max() < 7


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("sketch_dim", [1, 8, 33])
def test_tensor_sketch_moment(masked, sketch_dim):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 10, 6)).astype(np.float32)
  mask = random_mask(rng, 3, 10) if masked else None
  hc, _ = ref.center(x, mask)
  out = ops.tensor_sketch_moment(
    jnp.asarray(hc, jnp.float32),
    sketch_dim,
    seed=5,
    mask=None if mask is None else jnp.asarray(mask),
  )
  assert out.shape == (3, sketch_dim)
  # |m3| ~ 1 here: power normalisation is well conditioned, FFT round-off ~1e-6
  np.testing.assert_allclose(out, ref.tensor_sketch(hc, sketch_dim, 5, mask), rtol=1e-4, atol=1e-5)


def test_tensor_sketch_inverts_one_spectrum_per_sample():
  # The tokens' spectra are summed before the inverse FFT: no [batch, tokens, sketch]
  # buffer, one irfft over [batch, sketch_dim // 2 + 1].
  hc = jnp.zeros((3, 10, 6))
  jaxpr = jax.make_jaxpr(lambda h: ops.tensor_sketch_moment(h, 16))(hc)

  ffts = [e for e in equations(jaxpr.jaxpr) if e.primitive.name == "fft"]
  inverse = [e for e in ffts if e.params["fft_type"] == jax.lax.FftType.IRFFT]
  assert len(ffts) == 4 and len(inverse) == 1
  assert inverse[0].invars[0].aval.shape == (3, 9)


# -- the pipeline --------------------------------------------------------------

COMBOS = [
  (g, m, t) for g in (None, "shared", "batched") for m in (False, True) for t in (False, True)
]


@pytest.mark.parametrize("graph,masked,third", COMBOS)
def test_moment_features_matches_float64(graph, masked, third):
  rng = np.random.default_rng(5)
  b, n, d = 3, 16, 12
  x = (rng.normal(size=(b, n, d)) * 2 + 0.5).astype(np.float32)
  g = None if graph is None else random_graph(rng, b, n, graph == "shared")
  mask = random_mask(rng, b, n) if masked else None
  kw = dict(isqrt_iterations=5, use_third_order=third, sketch_dim=24, sketch_seed=2)
  out = ops.moment_features(x, g, mask, **kw)
  assert out.shape == (b, ops.feature_size(d, third, 24))
  r = ref.moment_features(x, g, mask, **kw)
  assert rel_err(out, r) < 1e-4
  if third:  # the sketch part on its own, which the norm-wise error could hide
    assert rel_err(out[:, -24:], r[:, -24:]) < 1e-4


class JitTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(False, True)
  def test_jit_and_eager_agree(self, third):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 9, 5)).astype(np.float32)
    g = ops.grid_graph(3, 3)
    fn = self.variant(
      functools.partial(
        ops.moment_features, isqrt_iterations=3, use_third_order=third, sketch_dim=8
      )
    )
    out = fn(x, g)
    r = ref.moment_features(x, g, isqrt_iterations=3, use_third_order=third, sketch_dim=8)
    chex.assert_shape(out, r.shape)
    chex.assert_tree_all_finite(out)
    assert rel_err(out, r) < 1e-4


def test_vmap_over_a_leading_axis():
  x = np.random.default_rng(8).normal(size=(3, 2, 9, 5)).astype(np.float32)
  f = functools.partial(ops.moment_features, isqrt_iterations=2)
  np.testing.assert_allclose(jax.vmap(f)(x), np.stack([f(xi) for xi in x]), rtol=1e-5, atol=1e-6)


# -- gradients (float64, finite differences) -----------------------------------


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("k", [1, 2, 3])
def test_grads_newton_schulz(k):
  m = jnp.asarray(spd(np.random.default_rng(9), 2, 5), jnp.float64)
  check_grads(
    lambda a: ops.sqrtm_newton_schulz(a, k),
    (m,),
    order=1,
    modes=["fwd", "rev"],
    atol=1e-6,
    rtol=1e-6,
  )


@pytest.mark.usefixtures("x64")
def test_grads_graph_moment_triu_sketch():
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.normal(size=(2, 6, 4)))
  g = jnp.asarray(random_graph(rng, 2, 6, False), jnp.float64)
  mask = jnp.asarray(random_mask(rng, 2, 6))
  tol = dict(order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
  check_grads(lambda a: ops.normalize_graph(a, 1e-5, mask), (g,), **tol)
  check_grads(lambda h: ops.second_moment(h, mask), (x,), **tol)
  check_grads(ops.triu_vector, (jnp.asarray(rng.normal(size=(2, 4, 4))),), **tol)
  check_grads(lambda h: ops.tensor_sketch_moment(h, 8, mask=mask), (x,), **tol)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("k", [1, 3])
def test_grads_moment_features(k):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 6, 4)))
  g = jnp.asarray(random_graph(rng, 2, 6, True), jnp.float64)
  mask = jnp.asarray(random_mask(rng, 2, 6))
  f = lambda t: ops.moment_features(
    t, g, mask, isqrt_iterations=k, use_third_order=True, sketch_dim=8
  )
  assert f(x).dtype == jnp.float64
  # The cube root's curvature makes the default 1e-4 difference step too
  # coarse (its O(step^2) error is ~1e-5); 1e-6 is safe in float64.
  check_grads(f, (x,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)
