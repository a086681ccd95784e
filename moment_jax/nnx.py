"""`MomentHead` for flax.nnx: the same head as `moment_jax.linen`, same numbers.

The NNX module owns parameters only; configuration checks, the precision
policy and the feature pipeline come from the Linen module's pure pieces
(`linen.MomentHead.validate`, `resolved_policy`, `feature_fn`, which read
nothing but the configuration), so both front ends run one code path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from moment_jax import linen as _linen
from moment_jax import presets
from moment_jax.ops import checks
from moment_jax.ops.features import feature_size
from moment_jax.ops.project import project
from moment_jax.precision import Policy
from moment_jax.remat import resolve_remat

# The configuration fields shared with `moment_jax.linen.MomentHead`, in order.
CONFIG_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(_linen.MomentHead)
    if f.name not in ("parent", "name"))


def _keep_dtypes(args: tuple[Any, ...], *, dtype: Dtype | None = None,
                 inexact: bool = True) -> tuple[Any, ...]:
  """`promote_dtype` stand-in for `nnx.BatchNorm` that casts nothing.

  Linen's BatchNorm keeps its float32 statistics, scale and bias as they are
  and computes `(x - mean) * rsqrt(var + eps) * scale` in float32 before
  casting to `dtype`; NNX's default promotion would first round all of them
  to a bf16 compute dtype. Keeping them makes the two heads agree bit for bit.
  """
  del dtype, inexact
  return tuple(args)


class Projection(nnx.Module):
  """The head's `Dense(F -> d_out)`, as `moment_jax.linen.Projection`.

  Parameters `kernel [F, d_out]` (LeCun normal) and `bias [d_out]` (zeros);
  the product is `ops.split_matmul`. Called with `chunk`, the feature
  pipeline `feature_fn` and the product run over `chunk` samples at a time.

  Args:
    in_features: `F`.
    features: `d_out`.
    dtype, param_dtype, precision: as `nnx.Linear`.
    rngs: draws the kernel from the `params` stream.
  """

  def __init__(self, in_features: int, features: int, *, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
               rngs: nnx.Rngs):
    self.in_features = in_features
    self.features = features
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(
        rngs.params(), (in_features, features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

  def __call__(self, x: jax.Array | None = None, *,
               feature_fn: Callable[..., jax.Array] | None = None,
               tokens: jax.Array | None = None, graph: jax.Array | None = None,
               mask: jax.Array | None = None, chunk: int | None = None,
               remat: Callable[..., Any] | None = None) -> jax.Array:
    """`[batch, F] -> [batch, d_out]`, or fused with `feature_fn` over chunks."""
    kernel, bias = nnx.nn.dtypes.promote_dtype(
        (self.kernel[...], self.bias[...]), dtype=self.dtype)
    return project(x, kernel, bias, precision=self.precision, feature_fn=feature_fn,
                   tokens=tokens, graph=graph, mask=mask, chunk=chunk, remat=remat)


class MomentHead(nnx.Module):
  """Second-order moment head for flax.nnx: graph propagation, square-rooted
  covariance, optional third-order sketch, then Dense -> BatchNorm -> GELU ->
  Dropout (-> Dense with `mlp="double"`).

  Same configuration, submodule names (`reduce`, `proj`, `norm`, `out`) and
  numbers as `moment_jax.linen.MomentHead`; `linen_to_nnx` / `nnx_to_linen`
  move weights between the two. Like every NNX module it starts in training
  mode (batch statistics, dropout on); `model.eval()` switches BatchNorm to
  its running statistics and turns dropout off, `model.train()` back.

  Args:
    d_in: token width `dim` of the inputs (NNX creates parameters eagerly).
    d_out: output width.
    use_third_order: append the Tensor Sketch of the third moment.
    isqrt_iterations: Newton–Schulz steps (>= 1).
    isqrt_normalization: "trace" or "frobenius" (see the Linen head).
    isqrt_method: "newton_schulz" or "eigh" (see the Linen head).
    isqrt_space: "auto", "channel" or "token" (see the Linen head).
    sketch_dim: Tensor Sketch length (with the third order).
    eps: ridge of the moment, degree floor and power-normalisation offset.
    mlp: "single" or "double" (a second Dense d_out -> d_out).
    dropout_rate: dropout probability, active only in training mode.
    sketch_seed: seed of the sketch hashes.
    d_reduce: optional Dense projection of the tokens to this width first.
    dtype: compute dtype of the Dense layers; None infers from the inputs.
    param_dtype: parameter dtype.
    precision: matmul precision of every product.
    policy: optional precision policy (name, "params=...,compute=..." string
      or `Policy`); replaces `dtype`, `param_dtype` and `precision`.
    remat_policy: None, "isqrt", "features", a `jax.checkpoint_policies`
      name or a policy callable (`moment_jax.remat.resolve_remat`).
    isqrt_chunk: run the feature pipeline and projection over this many
      samples at a time.
    check_values: False, True / "callback" or "checkify": value checks of the
      inputs and every stage (see the Linen head).
    rngs: `params` stream for the weights, `dropout` stream for dropout.

  Inputs: tokens `[batch, tokens, dim]`, optional graph `[tokens, tokens]` or
  `[batch, tokens, tokens]`, optional mask `[batch, tokens]` bool. Output
  `[batch, d_out]`.

  Example:
    >>> head = MomentHead.from_preset("optimized", 64, d_out=32,
    ...                               rngs=nnx.Rngs(params=0, dropout=1))
    >>> tokens, graph = jnp.ones((4, 196, 64)), grid_graph(14, 14)
    >>> out = head(tokens, graph)   # training mode: batch statistics, dropout
    >>> head.eval()
    >>> out = head(tokens, graph)   # running statistics, no dropout

  References:
    Li et al., "Towards Faster Training of Global Covariance Pooling Networks
    by Iterative Matrix Square Root Normalization", CVPR 2018.
    Pham, Pagh, "Fast and Scalable Polynomial Kernels via Explicit Feature
    Maps", KDD 2013.
  """

  def __init__(
      self,
      d_in: int,
      *,
      d_out: int = 512,
      use_third_order: bool = False,
      isqrt_iterations: int = 3,
      isqrt_normalization: str = "trace",
      isqrt_method: str = "newton_schulz",
      isqrt_space: str = "auto",
      sketch_dim: int = 1024,
      eps: float = 1e-5,
      mlp: str = "single",
      dropout_rate: float = 0.1,
      sketch_seed: int = 0,
      d_reduce: int | None = None,
      dtype: Dtype | None = None,
      param_dtype: Dtype = jnp.float32,
      precision: PrecisionLike = None,
      policy: str | Policy | None = None,
      remat_policy: str | Callable[..., Any] | None = None,  # None: fastest, most memory
      isqrt_chunk: int | None = None,
      check_values: bool | str = False,
      rngs: nnx.Rngs,
  ):
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
      raise ValueError(f"d_in: expected an int >= 1, got {d_in!r}")
    self.d_in = d_in
    self.d_out = d_out
    self.use_third_order = use_third_order
    self.isqrt_iterations = isqrt_iterations
    self.isqrt_normalization = isqrt_normalization
    self.isqrt_method = isqrt_method
    self.isqrt_space = isqrt_space
    self.sketch_dim = sketch_dim
    self.eps = eps
    self.mlp = mlp
    self.dropout_rate = dropout_rate
    self.sketch_seed = sketch_seed
    self.d_reduce = d_reduce
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.policy = policy
    self.remat_policy = remat_policy
    self.isqrt_chunk = isqrt_chunk
    self.check_values = check_values
    spec = self.linen_module()
    spec.validate()

    # With neither `policy` nor `dtype`, Linen's compute dtype is
    # promote(tokens, param_dtype), known only at call time; layers built with
    # dtype=None compute exactly that from inputs already cast to it.
    explicit = policy is not None or dtype is not None
    pol = spec.resolved_policy()
    compute = pol.compute_dtype if explicit else None
    width = d_reduce if d_reduce is not None else d_in
    if d_reduce is not None:
      self.reduce = nnx.Linear(d_in, d_reduce, dtype=compute, param_dtype=pol.param_dtype,
                               precision=pol.matmul, rngs=rngs)
    self.proj = Projection(feature_size(width, use_third_order, sketch_dim), d_out,
                           dtype=pol.param_dtype, param_dtype=pol.param_dtype,
                           precision=pol.matmul, rngs=rngs)
    self.norm = nnx.BatchNorm(d_out, use_running_average=False, momentum=0.9,
                              epsilon=1e-5, dtype=compute, param_dtype=pol.param_dtype,
                              promote_dtype=_keep_dtypes, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, deterministic=False, rngs=rngs)
    if mlp == "double":
      self.out = nnx.Linear(d_out, d_out, dtype=compute, param_dtype=pol.param_dtype,
                            precision=pol.matmul, rngs=rngs)

  @classmethod
  def from_preset(cls, name: str, d_in: int, *, rngs: nnx.Rngs,
                  **overrides: Any) -> "MomentHead":
    """A head configured as preset `name` (see `moment_jax.presets`), with overrides."""
    return cls(d_in, **{**presets.preset(name), **overrides}, rngs=rngs)

  def config(self) -> dict[str, Any]:
    """The keyword arguments shared with `moment_jax.linen.MomentHead`."""
    return {k: getattr(self, k) for k in CONFIG_FIELDS}

  def linen_module(self) -> _linen.MomentHead:
    """The Linen head with this configuration (unbound; pair it with
    `nnx_to_linen(self)` to apply it)."""
    return _linen.MomentHead(**self.config())

  def __call__(self, tokens: jax.Array, graph: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
    """Applies the head: `[batch, tokens, dim]` -> `[batch, d_out]`."""
    spec = self.linen_module()
    spec.validate()
    checks.check_call(tokens, graph, mask, values=self.check_values)
    if tokens.shape[-1] != self.d_in:
      raise ValueError(
          f"tokens: width (last axis) {tokens.shape[-1]} differs from d_in={self.d_in} "
          f"the parameters were built for")
    pol = spec.resolved_policy(tokens.dtype)

    x = tokens.astype(pol.compute_dtype)
    if self.d_reduce is not None:
      x = self.reduce(x)
    if self.isqrt_chunk is None:
      y = self.proj(spec.feature_fn(pol)(x, graph, mask))
    else:
      _, ckpt = resolve_remat(self.remat_policy)
      y = self.proj(feature_fn=spec.feature_fn(pol, outer_remat=False), tokens=x,
                    graph=graph, mask=mask, chunk=self.isqrt_chunk, remat=ckpt)
    y = self.norm(y.astype(pol.compute_dtype))
    y = nnx.gelu(y, approximate=False)
    y = self.dropout(y)
    if self.mlp == "double":
      y = self.out(y)
    y = checks.check_finite(y, "output", checks.check_mode(self.check_values))
    return y.astype(pol.output_dtype)


def _check_tree(name: str, got: Any, want: Any) -> None:
  """Raises `ValueError` unless `got` has `want`'s keys, shapes and dtypes."""
  got_flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  want_flat = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  path = lambda p: "/".join(str(getattr(k, "key", k)) for k in p)
  if set(got_flat) != set(want_flat):
    raise ValueError(
        f"variables[{name!r}]: expected entries {sorted(map(path, want_flat))}, "
        f"got {sorted(map(path, got_flat))}")
  for p, w in want_flat.items():
    g = got_flat[p]
    if jnp.shape(g) != jnp.shape(w) or jnp.result_type(g) != jnp.result_type(w):
      raise ValueError(
          f"variables[{name!r}]/{path(p)}: expected {jnp.result_type(w)}{list(jnp.shape(w))}, "
          f"got {jnp.result_type(g)}{list(jnp.shape(g))}")


def linen_to_nnx(variables: Mapping[str, Any], model: MomentHead) -> MomentHead:
  """Loads Linen `MomentHead` variables into an NNX `MomentHead`, in place.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` from the Linen head's
      `init` (or training); `batch_stats` may be omitted.
    model: an NNX head of the same configuration and `d_in`.

  Returns:
    `model`, whose parameters and batch statistics are now `variables`'.
    A missing or extra entry, or a shape or dtype that differs, raises
    `ValueError` and leaves `model` untouched.
  """
  updates = []
  for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    if collection not in variables:
      if collection == "params":
        raise ValueError(f"variables: expected a 'params' collection, got {sorted(variables)}")
      continue
    state = nnx.state(model, kind)
    new = jax.tree.map(lambda x: x, dict(variables[collection]))
    _check_tree(collection, new, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, new)
    updates.append(state)
  nnx.update(model, *updates)
  return model


def nnx_to_linen(model: MomentHead) -> dict[str, Any]:
  """The Linen variables `{"params": ..., "batch_stats": ...}` of an NNX head.

  `model.linen_module().apply(nnx_to_linen(model), tokens, train=...)` gives
  the NNX head's numbers.
  """
  return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
          "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}
