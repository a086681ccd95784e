"""Property-based fuzzing (hypothesis) of `moment_features` and `MomentHead`.

Inputs are drawn at random: B, N, D each in 1..33 (the extremes 1 and 33
half of the time); tokens scaled by 10**u, u in [-8, 8], Gaussian, low-rank,
constant (all tokens equal), offset (a large mean over a tiny spread) or with
channel scales spread over six decades; no graph, random sparse or all-zero
graphs, shared `[N, N]` or batched `[B, N, N]`, weights scaled by 10**[-4, 4];
no mask, random masks, masks with single-token and with all-padding rows.

Properties:

* `moment_features` (K = 1, 2, 3, 5, both normalisations, Newton-Schulz and
  eigh, with and without the sketch, float32 and bfloat16 tokens and
  stages): right shape and dtype, finite values, finite gradients for the
  tokens and the graph;
* `MomentHead`, every preset x every policy: finite training-mode output,
  batch statistics and gradients (parameters and tokens), finite
  evaluation-mode output, right shapes;
* permuting the tokens (graph rows and columns and mask alike, one
  permutation for the batch or one per sample) leaves the features and the
  evaluation-mode output of the float32 pipeline unchanged, up to the
  round-off bound derived below ("Round-off bounds").

Examples are few (each compiles: JAX compiles per shape) and seeded, so CI
draws the same inputs on every run. A longer, random search (fresh inputs on
every run; a failure prints its `@reproduce_failure` blob):

    MOMENT_JAX_FUZZ_EXAMPLES=200 python -m pytest tests/test_fuzz.py -n 2

sets every test's `max_examples` (about 1 s of compilation per example).
"""

import functools
import os
import zlib
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from helpers import head_grads
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from moment_jax import NAMED_POLICIES, PRESET_NAMES, MomentHead, feature_size, moment_features
from moment_jax.linen import Projection

pytestmark = pytest.mark.slow  # subprocesses or many examples: CI runs them; -m "not slow" skips

_EXAMPLES = os.environ.get("MOMENT_JAX_FUZZ_EXAMPLES")
SMALL = dict(d_out=8, sketch_dim=16)  # every preset's structure, small weights
HIGHEST = jax.lax.Precision.HIGHEST


def fuzz(examples, salt=""):
  """This file's hypothesis settings: `examples` seeded examples (the seed
  also hashes `salt`, so parametrized cases draw different inputs), or
  MOMENT_JAX_FUZZ_EXAMPLES random ones."""

  def wrap(test):
    test = settings(
      max_examples=int(_EXAMPLES or examples),
      deadline=None,
      database=None,
      print_blob=True,
      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(test)
    if _EXAMPLES:
      return test
    return seed(zlib.crc32(f"{test.__name__}/{salt}".encode()))(test)

  return wrap


# -- inputs ----------------------------------------------------------------------


class Case(NamedTuple):
  """One drawn input, short enough to print; `make_inputs` builds its arrays."""

  shape: tuple[int, int, int]
  tokens: str  # normal | low-rank | constant | offset | spread
  log_scale: float  # tokens * 10**log_scale
  rank: int  # of low-rank tokens
  graph: str  # none | shared | batched | empty-shared | empty-batched
  density: float  # of the graph's edges
  log_weight: float  # edge weights * 10**log_weight
  mask: str  # none | random | single | padding | mixed
  seed: int


DIMS = st.sampled_from((1, 33)) | st.integers(1, 33)
CASES = st.builds(
  Case,
  shape=st.tuples(DIMS, DIMS, DIMS),
  tokens=st.sampled_from(("normal", "low-rank", "constant", "offset", "spread")),
  log_scale=st.floats(-8, 8),
  rank=st.integers(1, 3),
  graph=st.sampled_from(("none", "shared", "batched", "empty-shared", "empty-batched")),
  density=st.floats(0, 1),
  log_weight=st.floats(-4, 4),
  mask=st.sampled_from(("none", "random", "single", "padding", "mixed")),
  seed=st.integers(0, 2**32 - 1),
)
PIPELINES = st.fixed_dictionaries(
  dict(
    isqrt_iterations=st.sampled_from((1, 2, 3, 5)),  # the presets' K, and 1
    isqrt_normalization=st.sampled_from(("trace", "frobenius")),
    isqrt_method=st.sampled_from(("newton_schulz", "eigh")),
    use_third_order=st.booleans(),
    sketch_dim=st.sampled_from((1, 5, 16)),
  )
)


def make_inputs(case):
  """`(tokens, graph, mask)` NumPy arrays (float32, float32 or None, bool or None)."""
  b, n, d = case.shape
  rng = np.random.default_rng(case.seed)
  if case.tokens == "low-rank":
    r = min(case.rank, n, d)
    x = rng.normal(size=(b, n, r)) @ rng.normal(size=(b, r, d)) / np.sqrt(r)
  elif case.tokens == "constant":
    x = np.repeat(rng.normal(size=(b, 1, d)), n, axis=1)
  elif case.tokens == "offset":  # centring cancels all but ~1e-4 of each value
    x = rng.normal(size=(b, 1, d)) + 1e-4 * rng.normal(size=(b, n, d))
  else:
    x = rng.normal(size=(b, n, d))
    if case.tokens == "spread":
      x = x * 10.0 ** rng.uniform(-6, 0, size=d)
  x = (x * 10.0**case.log_scale).astype(np.float32)
  graph = None
  if case.graph != "none":
    shape = (n, n) if case.graph.endswith("shared") else (b, n, n)
    graph = (rng.uniform(size=shape) < case.density) * rng.uniform(size=shape)
    graph = graph * 10.0**case.log_weight * (not case.graph.startswith("empty"))
    graph = graph.astype(np.float32)
  mask = None
  if case.mask != "none":
    mask = (
      rng.uniform(size=(b, n)) < 0.6
      if case.mask in ("random", "mixed")
      else (np.ones((b, n), bool))
    )
    rows, k = rng.permutation(b), max(1, b // 3)
    if case.mask in ("single", "mixed"):  # one valid token
      mask[rows[:k]] = False
      mask[rows[:k], rng.integers(0, n, k)] = True
    if case.mask in ("padding", "mixed"):  # all padding (other rows, where b > 1)
      mask[rows[-k:]] = False
  return x, graph, mask


def permute(case, x, graph, mask, shared):
  """The inputs with their tokens permuted (one permutation per sample, or one
  for the batch); the graph's rows and columns and the mask alike."""
  rng = np.random.default_rng(case.seed ^ 0x5EED)
  b, n, _ = x.shape
  perms = np.stack([rng.permutation(n)] * b if shared else [rng.permutation(n) for _ in range(b)])
  xp = np.take_along_axis(x, perms[:, :, None], axis=1)
  mp = None if mask is None else np.take_along_axis(mask, perms, axis=1)
  if graph is None:
    gp = None
  elif graph.ndim == 2:
    gp = graph[perms[0]][:, perms[0]]
  else:
    gp = np.stack([g[p][:, p] for g, p in zip(graph, perms)])
  return xp, gp, mp


def assert_finite(**arrays):
  bad = {
    k: int(np.size(v) - np.count_nonzero(np.isfinite(np.asarray(v, np.float64))))
    for k, tree in arrays.items()
    for v in jax.tree.leaves(tree)
  }
  bad = {k: v for k, v in bad.items() if v}
  assert not bad, f"non-finite entries: {bad}"


# -- round-off bounds --------------------------------------------------------------
#
# Permuting the tokens changes nothing mathematically, but it reorders every
# sum over tokens: the degrees (row sums of the graph), the propagation
# `A_hat @ tokens`, the token mean, the moment `Hc^T Hc` and the sketch's mean.
# A float32 sum of n terms in any order is within gamma_n = n u (u = 2^-24) of
# the exact sum, relative to the sum of the terms' absolute values. Nothing
# else is reordered (channels are not permuted), so every later stage gets
# slightly different inputs and passes the difference on.
#
# The tolerance cannot be relative to the output: for constant or offset
# tokens the exact centred tokens are 0 (or tiny), the float32 ones are
# round-off of the tokens' magnitude (~ u |x|, 6.0 for |x| = 1e8), and so are
# the features: their round-off is 100% of their value, and differs between
# orderings. Its scale is that of the propagated tokens, `|A_hat| |X|`.
#
# Bounds, to first order in u, each for one float32 evaluation against exact
# arithmetic on the same inputs (two orderings differ by at most twice that):
#
# 1. centred tokens: |Hc~ - Hc| <= dh = (3 P + 5 mean_n P) g, with P = |A_hat||X|
#    (|X| without a graph) and g = (N + 8) u: gamma_N per reordered sum plus a
#    few roundings (degrees -> rsqrt -> A_hat, propagation, mean, subtraction).
# 2. moment: |M~ - M| <= E = (dh^T H + H^T dh + g H^T H) / n + 2u (|M| + eps),
#    H = |Hc| + dh, entrywise.
# 3. square root, compared squared: S -> S^2 is one to one on PSD matrices,
#    and S^2 moves linearly with M, where S itself moves with sqrt(|dM|)
#    (unbounded derivative at the eps-sized eigenvalues of rank-deficient
#    moments). Newton-Schulz computes S = sqrt(c) p(M / c), c = tr M or
#    ||M||_F, p a polynomial; S^2 = c q(M / c), q = p^2. For symmetric M the
#    Frechet derivative of a spectral function is bounded in Frobenius norm by
#    max |q'| (Daleckii-Krein), and dc by tr E (||E||_F). So
#    ||S~^2 - S^2||_F <= (max|q'| + 1.5 max|p| max|p'|) ||E||_F
#                         + sqrt(D) max|q - x q'| dc + 3 ||S|| phi + phi^2;
#    the `1.5 max|p| max|p'|` term covers an asymmetric M~, `phi` is the
#    forward round-off of the float32 iteration, bounded by
#    8 K D^1.5 u sqrt(c) (measured: <= 0.6 K D^1.5 u sqrt(c), D, N <= 33,
#    spread spectra, K <= 8). Maxima over [-0.01, 1.01] (eigenvalues of M / c).
#    eigh: S~^2 is the PSD part of M~ plus the backward error of eigh and of
#    the product V s V^T: ||E||_F + 16 D^2 u ||M||_F (measured <= 1.5 D^2 u).
# 4. sketch, compared before the signed cube root (a bijection whose
#    derivative is unbounded at 0: round-off in a bucket with m3 ~ 0 would
#    come back cube-rooted). Count sketches a_k = |C_k|(H), their
#    perturbation c_k = C_k(dh) + gamma_D a_k; the product of three circular
#    convolutions moves by conv(c0, a1, a2) + conv(a0, c1, a2) + conv(a0, a1, c2),
#    the FFTs add 8 u (log2 k + 2) ||H_n||_1^3 per token (measured <= 1x that
#    over D <= 33, k <= 64), the token mean g conv(a0, a1, a2); recovering m3
#    from the float32 power normalisation adds 40 u (|m3| + eps).
#
# After the features, `head_output_bound` carries the observed feature
# difference through Dense, BatchNorm, GELU (Lipschitz 1.13) and Dense.

U = 2.0**-24  # float32 unit round-off


@functools.lru_cache(maxsize=None)
def ns_constants(k):
  """max |p|, |p'|, |q'|, |q - x q'| on [-0.01, 1.01] for K = k Newton-Schulz
  steps: `p` is docs/math.md section 3 on scalars, `q = p^2`."""
  x = np.linspace(-0.01, 1.01, 20001)
  if k == 1:
    p = 0.5 * x * (3 - x)
  else:
    t = 0.5 * (3 - x)
    y, z = x * t, t
    for _ in range(k - 2):
      t = 0.5 * (3 - z * y)
      y, z = y * t, t * z
    p = 0.5 * y * (3 - z * y)
  dp, q = np.gradient(p, x), p * p
  dq = np.gradient(q, x)
  return (np.abs(p).max(), np.abs(dp).max(), np.abs(dq).max(), np.abs(q - x * dq).max())


def moment_bounds(x, graph, mask, eps=1e-5):
  """Exact (float64) centred tokens and moment, with the bounds `dh`, `E` of
  steps 1-2: `(hc, count, dh, m2, e)`."""
  b, n, d = x.shape
  x = np.asarray(x, np.float64)
  m = (np.ones((b, n)) if mask is None else np.asarray(mask, np.float64))[..., None]
  g = (n + 8) * U
  if graph is None:
    h, p = x, np.abs(x)
  else:
    a = ref.normalize_graph(graph, eps, mask)
    h, p = a @ x, np.abs(a) @ np.abs(x)
  cnt = np.maximum(m.sum(1, keepdims=True), 1)
  hc = (h - (h * m).sum(1, keepdims=True) / cnt) * m
  dh = g * (3 * p + 5 * (p * m).sum(1, keepdims=True) / cnt) * m
  big, tr = np.abs(hc) + dh, lambda a: np.swapaxes(a, 1, 2)
  m2 = tr(hc) @ hc / cnt + eps * np.eye(d)
  e = (tr(dh) @ big + tr(big) @ dh + g * tr(big) @ big) / cnt + 2 * U * (np.abs(m2) + eps)
  return hc, cnt, dh, m2, e


def square_bound(m2, e, k, normalization, method):
  """Step 3: per sample, a bound on ||S~^2 - S^2||_F for one evaluation."""
  d = m2.shape[-1]
  e_f, m_f = np.linalg.norm(e, axis=(1, 2)), np.linalg.norm(m2, axis=(1, 2))
  if method == "eigh":
    return e_f + 16 * d * d * U * (m_f + e_f)
  p, dp, dq, r = ns_constants(k)
  if normalization == "trace":
    c, dc = np.trace(m2, axis1=1, axis2=2), np.trace(e, axis1=1, axis2=2)
  else:
    c, dc = m_f, e_f
  phi = 8 * k * d**1.5 * U * np.sqrt(c + dc)
  return (dq + 1.5 * p * dp) * e_f + np.sqrt(d) * r * dc + 3 * p * np.sqrt(c + dc) * phi + phi**2


def sketch_bound(hc, cnt, dh, sketch_dim, sketch_seed=0):
  """Step 4: `[batch, sketch_dim]` bound on |m3~ - m3| for one evaluation."""
  n, d = hc.shape[1:]
  big, g = np.abs(hc) + dh, (n + 8) * U
  buckets = [np.eye(sketch_dim)[h] for h in ref.hashes(d, sketch_dim, sketch_seed)[0]]
  a = [big @ o for o in buckets]
  c = [dh @ o + (d + 2) * U * ak for o, ak in zip(buckets, a)]

  def conv(*vs):
    return np.abs(np.fft.irfft(np.prod([np.fft.rfft(v) for v in vs], 0), n=sketch_dim))

  t = conv(*a)
  dts = (
    conv(c[0], a[1], a[2])
    + conv(a[0], c[1], a[2])
    + conv(a[0], a[1], c[2])
    + 8 * U * (np.log2(sketch_dim) + 2) * big.sum(-1, keepdims=True) ** 3
  )
  return ((dts + g * (t + dts)).sum(1) + U * t.sum(1)) / cnt[:, 0]


def from_triu(v, d):
  s, (rows, cols) = np.zeros((len(v), d, d)), np.triu_indices(d)
  s[:, rows, cols] = v
  return s + np.swapaxes(np.triu(s, 1), 1, 2)


def unpower(v, eps=1e-5):
  """The inverse of the sketch's power normalisation, in float64."""
  v = np.asarray(v, np.float64)
  return np.sign(v) * ((np.abs(v) + eps ** (1 / 3)) ** 3 - eps)


def check_permuted_features(f1, f2, x, graph, mask, cfg):
  """Asserts that float32 features `f1` of `(x, graph, mask)` and `f2` of its
  permutation differ by no more than the round-off of two evaluations."""
  d = x.shape[-1]
  tri = d * (d + 1) // 2
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  hc, cnt, dh, m2, e = moment_bounds(x, graph, mask)
  s1, s2 = from_triu(f1[:, :tri], d), from_triu(f2[:, :tri], d)
  err = np.linalg.norm(s1 @ s1 - s2 @ s2, axis=(1, 2))
  tol = 2 * square_bound(
    m2, e, cfg["isqrt_iterations"], cfg["isqrt_normalization"], cfg["isqrt_method"]
  )
  assert np.all(err <= tol), (
    f"square roots differ: ||S1^2 - S2^2||_F = {err} > bound {tol} "
    f"(||M||_F = {np.linalg.norm(m2, axis=(1, 2))})"
  )
  if cfg["use_third_order"]:
    m31, m32 = unpower(f1[:, tri:]), unpower(f2[:, tri:])
    tol = 2 * sketch_bound(hc, cnt, dh, cfg["sketch_dim"]) + 40 * U * (
      np.abs(m31) + np.abs(m32) + 2e-5
    )
    err = np.abs(m31 - m32)
    worst = np.unravel_index(np.argmax(err / tol), err.shape)
    assert np.all(err <= tol), (
      f"sketches differ: |m3_1 - m3_2| = {err[worst]} > bound {tol[worst]} at {worst}"
    )


def head_output_bound(variables, f1, f2, mlp):
  """Bound on |y1 - y2| of evaluation-mode float32 head outputs whose
  features (the projection's inputs) were `f1` and `f2`."""
  v = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  p, s = v["params"], v["batch_stats"]
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  w, bias = np.abs(p["proj"]["kernel"]), np.abs(p["proj"]["bias"])
  za = (np.abs(f1) + np.abs(f2)) @ w + 2 * bias  # >= |z1| + |z2|
  dz = np.abs(f1 - f2) @ w + (w.shape[0] + 2) * U * za
  mul = np.abs(p["norm"]["scale"]) / np.sqrt(s["norm"]["var"] + 1e-5)
  ya = mul * (za + 2 * np.abs(s["norm"]["mean"])) + 2 * np.abs(p["norm"]["bias"])
  dy = 1.13 * (mul * dz + 8 * U * ya) + 8 * U * ya  # BatchNorm, then GELU
  if mlp == "double":
    w2, b2 = np.abs(p["out"]["kernel"]), np.abs(p["out"]["bias"])
    dy = dy @ w2 + (w2.shape[0] + 2) * U * (ya @ w2 + 2 * b2)
  return dy


# -- moment_features ---------------------------------------------------------------

STAGE_DTYPES = (  # tokens, moment_dtype, sqrt_dtype
  ("float32", None, None),
  ("bfloat16", None, None),
  ("float32", "bfloat16", "bfloat16"),
  ("bfloat16", "bfloat16", "bfloat16"),
  ("float32", None, "bfloat16"),
)


@functools.lru_cache(maxsize=None)
def features_and_grads(config):
  """jit of `(tokens, graph, mask) -> (features, (d_tokens, d_graph))` under
  `dict(config)`, the gradients for a fixed cotangent."""

  def fn(x, graph, mask):
    f, vjp = jax.vjp(lambda t, g: moment_features(t, g, mask, **dict(config)), x, graph)
    ct = jnp.cos(jnp.arange(f.size, dtype=jnp.float32)).reshape(f.shape)
    return f, vjp(ct.astype(f.dtype))

  return jax.jit(fn)


@functools.lru_cache(maxsize=None)
def features(config):
  return jax.jit(lambda x, g, m: moment_features(x, g, m, precision=HIGHEST, **dict(config)))


@fuzz(24)
@given(case=CASES, pipeline=PIPELINES, dtypes=st.sampled_from(STAGE_DTYPES))
def test_features_finite_with_finite_gradients(case, pipeline, dtypes):
  x, graph, mask = make_inputs(case)
  tokens_dtype, moment_dtype, sqrt_dtype = dtypes
  cfg = dict(pipeline, moment_dtype=moment_dtype, sqrt_dtype=sqrt_dtype)
  f, grads = features_and_grads(tuple(sorted(cfg.items())))(
    jnp.asarray(x, tokens_dtype), graph, mask
  )
  b, _, d = case.shape
  assert f.shape == (b, feature_size(d, cfg["use_third_order"], cfg["sketch_dim"]))
  assert f.dtype == jnp.dtype(sqrt_dtype or moment_dtype or "float32")
  assert grads[0].shape == x.shape and (graph is None or grads[1].shape == graph.shape)
  assert_finite(features=f, d_tokens=grads[0], d_graph=grads[1])


@fuzz(24)
@given(case=CASES, pipeline=PIPELINES, shared=st.booleans())
def test_features_permutation_invariant(case, pipeline, shared):
  x, graph, mask = make_inputs(case)
  shared = shared or (graph is not None and graph.ndim == 2)  # a shared graph stays shared
  fn = features(tuple(sorted(pipeline.items())))
  f1 = fn(x, graph, mask)
  f2 = fn(*permute(case, x, graph, mask, shared))
  assert_finite(f1=f1, f2=f2)
  check_permuted_features(f1, f2, x, graph, mask, pipeline)


# -- MomentHead --------------------------------------------------------------------

ROOTS = dict(
  isqrt_normalization=st.sampled_from(("trace", "frobenius")),
  isqrt_method=st.sampled_from(("newton_schulz", "eigh")),
)


def head_step(head):
  """jit of `(tokens, graph, mask) -> (variables, (out, updates), grads, eval_out)`:
  init, a training step's output, batch statistics and gradients
  (`helpers.head_grads`), and the evaluation-mode output."""

  def fn(x, graph, mask):
    v = head.init(jax.random.key(0), x, graph, mask, train=False)
    out, grads = head_grads(head, v, x, graph, mask)
    train = head.apply(
      v, x, graph, mask, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
    )
    return v, train, grads, head.apply(v, x, graph, mask, train=False)

  return jax.jit(fn)


@pytest.mark.parametrize("policy", NAMED_POLICIES)
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_head_finite_every_preset_and_policy(name, policy):
  @fuzz(2, salt=f"{name}/{policy}")
  @given(case=CASES, **ROOTS)
  def check(case, isqrt_normalization, isqrt_method):
    head = MomentHead.from_preset(
      name,
      **SMALL,
      policy=policy,
      isqrt_normalization=isqrt_normalization,
      isqrt_method=isqrt_method,
    )
    x, graph, mask = make_inputs(case)
    v, (out, updates), (d_params, d_tokens), ev = head_step(head)(x, graph, mask)
    b = case.shape[0]
    assert out.shape == ev.shape == (b, 8) and out.dtype == ev.dtype == jnp.float32
    assert d_tokens.shape == x.shape
    assert jax.tree.map(jnp.shape, d_params) == jax.tree.map(jnp.shape, v["params"])
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(
      jnp.shape, {"batch_stats": v["batch_stats"]}
    )
    assert_finite(out=out, batch_stats=updates, d_params=d_params, d_tokens=d_tokens, eval_out=ev)

  check()


def eval_with_features(head, variables, x, graph, mask):
  """Evaluation-mode output and the features the head projected."""
  seen = []

  def grab(next_fun, args, kwargs, context):
    if isinstance(context.module, Projection) and context.method_name == "__call__":
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(grab):
    y = head.apply(variables, x, graph, mask, train=False)
  return y, seen[0]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_head_permutation_invariant(name):
  @fuzz(3, salt=name)
  @given(case=CASES, shared=st.booleans(), **ROOTS)
  def check(case, shared, isqrt_normalization, isqrt_method):
    head = MomentHead.from_preset(
      name,
      **SMALL,
      policy="float32",
      isqrt_normalization=isqrt_normalization,
      isqrt_method=isqrt_method,
    )
    x, graph, mask = make_inputs(case)
    shared = shared or (graph is not None and graph.ndim == 2)
    v = jax.jit(functools.partial(head.init, train=False))(jax.random.key(0), x, graph, mask)
    fn = jax.jit(functools.partial(eval_with_features, head))
    y1, f1 = fn(v, x, graph, mask)
    y2, f2 = fn(v, *permute(case, x, graph, mask, shared))
    assert_finite(y1=y1, y2=y2)
    cfg = {
      k: getattr(head, k)
      for k in (
        "isqrt_iterations",
        "isqrt_normalization",
        "isqrt_method",
        "use_third_order",
        "sketch_dim",
      )
    }
    check_permuted_features(f1, f2, x, graph, mask, cfg)
    err, tol = np.abs(np.asarray(y1, np.float64) - y2), head_output_bound(v, f1, f2, head.mlp)
    assert np.all(err <= tol), (
      f"outputs differ by {err.max()} (bound {tol.ravel()[np.argmax(err)]})"
    )

  check()
