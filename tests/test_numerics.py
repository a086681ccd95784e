"""Square-root options, stability limits, gradients of the whole head and the
opt-in runtime checks, against the float64 NumPy reference (reference.py).

Tolerances: as in test_ops.py, float32 at highest matmul precision (set in
conftest.py) with dimensions <= 48, so 1e-5 relative covers an op's round-off;
the `eigh` root in float32 is limited by the smallest eigenvalues (the eps
ridge, 1e-5 of the largest here), whose roots carry a relative error of
~1e-7 * cond^(1/2), hence 1e-4. Gradients: float64 finite differences.
"""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from jax.experimental import checkify
from jax.test_util import check_grads
from test_ops import random_graph, random_mask, rel_err, spd

from moment_jax import MomentHead, grid_graph, ops
from moment_jax.ops import sqrtm as sq
from moment_jax.precision import get_policy


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def gaussian_moment(b=2, n=16, d=48, seed=0):
  """Moments of fewer tokens than channels: rank n - 1 plus the eps ridge."""
  x = np.random.default_rng(seed).normal(size=(b, n, d))
  return ref.second_moment(x)


# -- normalisation and method ----------------------------------------------------


@pytest.mark.parametrize("norm", sq.NORMALIZATIONS)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 8, 10])
def test_newton_schulz_matches_polynomial(norm, k):
  m = spd(np.random.default_rng(k), 3, 12, cond=100.0)
  got = ops.sqrtm_newton_schulz(jnp.asarray(m), k, normalization=norm)
  assert rel_err(got, ref.newton_schulz(m, k, norm)) < 1e-5


def test_frobenius_is_closer_at_few_iterations():
  """The issue's claim at a small size: N < D, same number of products."""
  m = gaussian_moment()
  exact = ref.sqrtm_eigh(m)
  for k in (3, 5):
    trace = rel_err(ops.sqrtm_newton_schulz(jnp.asarray(m, jnp.float32), k), exact)
    frob = rel_err(
      ops.sqrtm_newton_schulz(jnp.asarray(m, jnp.float32), k, normalization="frobenius"), exact
    )
    assert frob < 0.6 * trace, (k, frob, trace)


def test_frobenius_scale_does_not_overflow():
  m = spd(np.random.default_rng(1), 2, 8) * np.float32(1e30)  # sum of squares: 1e60
  s = ops.sqrtm_newton_schulz(jnp.asarray(m), 10, normalization="frobenius")
  assert rel_err(s, ref.sqrtm_eigh(m.astype(np.float64))) < 1e-4


def test_eigh_root():
  m = gaussian_moment()
  assert rel_err(ops.sqrtm_eigh(jnp.asarray(m, jnp.float32)), ref.sqrtm_eigh(m)) < 1e-4
  x = np.random.default_rng(2).normal(size=(2, 16, 12)).astype(np.float32)
  got = ops.moment_features(jnp.asarray(x), isqrt_method="eigh")
  want = ref.triu_vector(ref.sqrtm_eigh(ref.second_moment(x)))
  assert rel_err(got, want) < 1e-4


def test_coupled_and_z_only_agree_where_both_are_stable():
  m = jnp.asarray(gaussian_moment(d=32))
  for k in range(2, sq.Z_ONLY_MAX_ITERATIONS + 1):
    z = ops.sqrtm_newton_schulz(m, k, coupled=False)
    yz = ops.sqrtm_newton_schulz(m, k, coupled=True)
    assert rel_err(z, yz) < 1e-5, k
    assert rel_err(ops.sqrtm_newton_schulz(m, k), z) == 0.0  # the default carries Z


def test_many_iterations_converge_with_the_coupled_loop():
  m = gaussian_moment(d=32)
  k = 20
  s = ops.sqrtm_newton_schulz(jnp.asarray(m, jnp.float32), k)
  np.testing.assert_array_equal(
    s, ops.sqrtm_newton_schulz(jnp.asarray(m, jnp.float32), k, coupled=True)
  )
  assert rel_err(s, ref.sqrtm_eigh(m)) < 1e-3
  assert rel_err(s, ref.newton_schulz(m, k)) < 1e-3


@pytest.mark.parametrize("method,norm", [("newton_schulz", "frobenius"), ("eigh", "trace")])
def test_head_options(method, norm):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 9, 6)), jnp.float32)
  head = MomentHead(d_out=4, isqrt_method=method, isqrt_normalization=norm)
  v = head.init(jax.random.key(0), x, grid_graph(3, 3), train=False)
  out = head.apply(v, x, grid_graph(3, 3), train=False)
  # the feature option reaches the projection: compare with the op's features
  f = ops.moment_features(x, grid_graph(3, 3), isqrt_method=method, isqrt_normalization=norm)
  y = f @ v["params"]["proj"]["kernel"] + v["params"]["proj"]["bias"]
  st = v["batch_stats"]["norm"]
  y = (y - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * v["params"]["norm"]["scale"]
  y = jax.nn.gelu(y + v["params"]["norm"]["bias"], approximate=False)
  np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (
      dict(isqrt_normalization="spectral"),
      r"isqrt_normalization: expected one of trace, "
      r"frobenius, got 'spectral'",
    ),
    (dict(isqrt_method="svd"), r"isqrt_method: expected one of newton_schulz, eigh, got 'svd'"),
    (dict(check_values="always"), r"check_values: expected a bool, 'callback' or 'checkify'"),
  ],
)
def test_bad_options(kwargs, match):
  x = jnp.ones((2, 4, 3))
  with pytest.raises(ValueError, match=match):
    MomentHead(d_out=2, **kwargs).init(jax.random.key(0), x, train=False)
  if "check_values" not in kwargs:
    with pytest.raises(ValueError, match=match):
      ops.moment_features(x, **kwargs)


# -- stability limits --------------------------------------------------------------


def test_bfloat16_divergence_is_refused():
  m = jnp.asarray(spd(np.random.default_rng(4), 1, 8))
  with pytest.raises(
    ValueError,
    match=r"isqrt_iterations: 12 Newton–Schulz iterations "
    r"diverge with bfloat16 operands",
  ):
    ops.sqrtm_newton_schulz(m, 12, dtype=jnp.bfloat16)
  head = MomentHead(d_out=2, policy="bfloat16", isqrt_iterations=12)
  with pytest.raises(ValueError, match=r"isqrt_iterations: 12 .*'bfloat16-sqrt32'"):
    head.init(jax.random.key(0), jnp.ones((2, 4, 3)), train=False)
  # float32 operands under the same bf16 policy are allowed (at DEFAULT
  # precision, i.e. TF32 on GPU, with a warning)
  with pytest.warns(UserWarning, match=r"isqrt_iterations=12: .* TF32"):
    MomentHead(d_out=2, policy="bfloat16-sqrt32", isqrt_iterations=12).init(
      jax.random.key(0), jnp.ones((2, 4, 3)), train=False
    )


@pytest.mark.parametrize(
  "dtype,precision,k",
  [(jnp.bfloat16, None, 8), (jnp.float32, "default", 12), (jnp.float32, "highest", 25)],
)
def test_growing_error_warns(dtype, precision, k):
  m = jnp.asarray(spd(np.random.default_rng(5), 1, 8))
  with pytest.warns(UserWarning, match=rf"isqrt_iterations={k}: .* grows again from K={k}"):
    ops.sqrtm_newton_schulz(m, k, dtype=dtype, precision=precision)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ops.sqrtm_newton_schulz(m, k - 1, dtype=dtype, precision=precision)


def test_float16_moment_is_refused():
  with pytest.raises(ValueError, match=r"Policy.moment_dtype: float16 overflows"):
    get_policy("compute=float16,moment=float16")


# -- gradients of the whole head (float64) -----------------------------------------


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_grads_head(k):
  """Parameters and tokens, training mode (batch statistics), every input
  combination: graph (none, shared, batched) x mask x third order."""
  rng = np.random.default_rng(20 + k)
  b, n, d = 3, 6, 4
  x = jnp.asarray(rng.normal(size=(b, n, d)))
  for graph in (None, "shared", "batched"):
    g = (
      None
      if graph is None
      else jnp.asarray(random_graph(rng, b, n, graph == "shared"), jnp.float64)
    )
    for masked in (False, True):
      mask = jnp.asarray(random_mask(rng, b, n)) if masked else None
      for third in (False, True):
        head = MomentHead(
          d_out=3,
          isqrt_iterations=k,
          use_third_order=third,
          sketch_dim=8,
          dropout_rate=0.0,
          param_dtype=jnp.float64,
          dtype=jnp.float64,
          precision="highest",
        )
        v = head.init(jax.random.key(k), x, g, mask, train=False)

        def f(params, t):
          out, _ = head.apply(
            {"params": params, "batch_stats": v["batch_stats"]},
            t,
            g,
            mask,
            train=True,
            mutable=["batch_stats"],
          )
          return out

        assert f(v["params"], x).dtype == jnp.float64
        # 1e-6 difference step: see test_ops.test_grads_moment_features
        check_grads(f, (v["params"], x), order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-6)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("norm", sq.NORMALIZATIONS)
@pytest.mark.parametrize("k", [1, 2, 3, 9])
def test_grads_newton_schulz_second_order(norm, k):
  """Order 2, both modes; K=9 runs the coupled loop."""
  m = jnp.asarray(spd(np.random.default_rng(6), 2, 5), jnp.float64)
  check_grads(
    lambda a: ops.sqrtm_newton_schulz(a, k, normalization=norm),
    (m,),
    order=2,
    modes=["fwd", "rev"],
    atol=1e-5,
    rtol=1e-5,
  )


@pytest.mark.usefixtures("x64")
def test_grads_eigh_root_with_repeated_eigenvalues():
  """The moment of 3 tokens in 6 channels has a 4-fold eigenvalue (the eps
  ridge): `eigh`'s own derivative divides by zero there, the root's doesn't.
  Second derivatives differentiate `eigh` inside the rule, so they are
  checked on distinct eigenvalues only."""
  x = np.random.default_rng(7).normal(size=(2, 3, 6))
  m = jnp.asarray(ref.second_moment(x, eps=1e-2))
  check_grads(ops.sqrtm_eigh, (m,), order=1, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5, eps=1e-6)
  distinct = jnp.asarray(spd(np.random.default_rng(7), 2, 5), jnp.float64)
  check_grads(ops.sqrtm_eigh, (distinct,), order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)
  g = jax.grad(lambda t: ops.moment_features(t, isqrt_method="eigh").sum())(jnp.asarray(x))
  chex.assert_tree_all_finite(g)


# -- opt-in runtime checks ---------------------------------------------------------


def _overflowing_trace(n=8, d=48):
  """Tokens whose moment is finite in float32 but whose trace (a sum of 48
  variances of ~9e36) overflows, so the first non-finite value appears in
  the square root."""
  x = np.sign(np.random.default_rng(8).normal(size=(2, n, d)))
  return jnp.asarray(x * 3e18, jnp.float32)


def test_checks_off_add_nothing():
  x = jnp.ones((2, 9, 3))
  head = MomentHead(d_out=2)
  v = head.init(jax.random.key(0), x, train=False)
  text = lambda h: str(jax.make_jaxpr(lambda t: h.apply(v, t, grid_graph(3, 3), train=False))(x))
  assert text(head) == text(head.clone(check_values=False))
  assert "callback" not in text(head) and "check" not in text(head)
  assert "callback" in text(head.clone(check_values=True))


def test_callback_check_names_the_stage():
  x = _overflowing_trace()
  m2 = ref.second_moment(np.asarray(x, np.float64))
  assert np.abs(m2).max() < 1e38 < np.trace(m2, axis1=1, axis2=2).min()
  f = jax.jit(lambda t: ops.moment_features(t, check_values=True, isqrt_space="channel"))
  with pytest.raises(Exception, match=r"sqrtm: \d+ non-finite entries in the matrix square root"):
    jax.block_until_ready(f(x))
  # In token space the Gram matrix's diagonal holds those sums: it overflows first.
  token = jax.jit(lambda t: ops.moment_features(t, check_values=True, isqrt_space="token"))
  with pytest.raises(Exception, match=r"moment: \d+ non-finite entries in the second moment"):
    jax.block_until_ready(token(x))
  big = jnp.ones((2, 8, 4)).at[:, 0].set(3e20)
  with pytest.raises(Exception, match=r"moment: \d+ non-finite entries in the second moment"):
    jax.block_until_ready(f(big))
  jax.block_until_ready(f(x / 1e19))  # finite: no error


def test_checkify_mode():
  head = MomentHead(d_out=2, check_values="checkify")
  x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 9, 48)), jnp.float32)
  v = head.init(jax.random.key(0), x, train=False)
  fn = jax.jit(checkify.checkify(lambda t, g: head.apply(v, t, g, train=False)))
  err, out = fn(x, grid_graph(3, 3))
  assert err.get() is None and out.shape == (2, 2)
  err, _ = fn(x.at[1, 2, 3].set(jnp.inf), grid_graph(3, 3))
  assert "tokens: expected finite values, found 1 NaN/Inf entries" in err.get()
  err, _ = fn(x, -grid_graph(3, 3))
  assert "graph: expected non-negative edge weights" in err.get()
  err, _ = fn(_overflowing_trace(n=9), None)
  assert err.get().startswith("moment: ")  # token space (auto): the Gram overflows
  channel = head.clone(isqrt_space="channel")
  err, _ = jax.jit(checkify.checkify(lambda t: channel.apply(v, t, train=False)))(
    _overflowing_trace(n=9)
  )
  assert err.get().startswith("sqrtm: ")
  # works under vmap and grad as checkify does
  err, g = jax.jit(checkify.checkify(jax.grad(lambda t: head.apply(v, t, train=False).sum())))(x)
  assert err.get() is None and g.shape == x.shape
