"""`MomentHead` for flax.linen: the moment pipeline plus its projection MLP."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike

from moment_jax import presets
from moment_jax.ops import checks
from moment_jax.ops.features import check_chunk, check_config, feature_size, pipeline
from moment_jax.ops.project import project
from moment_jax.precision import Policy, get_policy
from moment_jax.remat import resolve_remat

MLPS = ("single", "double")


def check_head_config(d_out: int, mlp: str, dropout_rate: float,
                      d_reduce: int | None) -> None:
  """Validates the projection's configuration."""
  if isinstance(d_out, bool) or not isinstance(d_out, int) or d_out < 1:
    raise ValueError(f"d_out: expected an int >= 1, got {d_out!r}")
  if mlp not in MLPS:
    raise ValueError(f"mlp: expected one of {', '.join(MLPS)}, got {mlp!r}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate: expected a value in [0, 1), got {dropout_rate!r}")
  if d_reduce is not None and (isinstance(d_reduce, bool)
                               or not isinstance(d_reduce, int) or d_reduce < 1):
    raise ValueError(f"d_reduce: expected None or an int >= 1, got {d_reduce!r}")


def width_from_features(f: int, use_third_order: bool, sketch_dim: int) -> int:
  """Inverts `feature_size`: the token width that gives `f` features."""
  tri = f - (sketch_dim if use_third_order else 0)
  if tri < 1:  # no width fits: report a mismatch rather than fail in isqrt
    return -1
  return (math.isqrt(8 * tri + 1) - 1) // 2


class Projection(nn.Module):
  """The head's `Dense(F -> d_out)`, without copies of its weight.

  Same parameters (names, shapes, initialisers) as `nn.Dense(features)` on
  `[batch, F]` inputs; the product is `ops.split_matmul`, which keeps XLA:GPU
  from materialising a padded copy of the `[F, d_out]` kernel. Called with
  `chunk`, it fuses the feature pipeline into the projection: `feature_fn`
  and the product run over `chunk` samples at a time (`lax.map`), so neither
  the `[batch, F]` features nor their cotangent exist for the whole batch.
  Each chunk reads the kernel once: fewer, larger chunks trade memory for speed.

  Attributes:
    features: output width.
    dtype, param_dtype, precision: as `nn.Dense`.
  """

  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array | None = None, *,
               feature_fn: Callable[..., jax.Array] | None = None,
               tokens: jax.Array | None = None, graph: jax.Array | None = None,
               mask: jax.Array | None = None, in_features: int | None = None,
               chunk: int | None = None,
               remat: Callable[..., Any] | None = None) -> jax.Array:
    in_features = x.shape[-1] if x is not None else in_features
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (in_features, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                      self.param_dtype)
    kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=self.dtype)
    return project(x, kernel, bias, precision=self.precision, feature_fn=feature_fn,
                   tokens=tokens, graph=graph, mask=mask, chunk=chunk, remat=remat)


class MomentHead(nn.Module):
  """Second-order moment head: graph propagation, square-rooted covariance,
  optional third-order sketch, then Dense -> BatchNorm -> GELU -> Dropout.

  Attributes:
    d_out: output width.
    use_third_order: append the Tensor Sketch of the third moment.
    isqrt_iterations: Newton–Schulz steps (>= 1).
    isqrt_normalization: "trace" (the original's) or "frobenius" (same cost,
      closer to the exact root at few iterations; docs/numerics.md).
    isqrt_method: "newton_schulz" or "eigh" (the exact root: evaluation and
      reference; much slower on GPU).
    isqrt_space: "auto" (default), "channel" or "token": run Newton–Schulz on
      the `[dim, dim]` moment or, with the same iterates, on the
      `[tokens, tokens]` Gram matrix (`ops.gram`; ~10x fewer FLOPs for
      ViT-B's 196 tokens and 768 channels); "auto" takes the cheaper.
    sketch_dim: Tensor Sketch length (with the third order).
    eps: ridge of the moment, degree floor and power-normalisation offset.
    mlp: "single" (Dense, BatchNorm, GELU, Dropout) or "double" (and a
      second Dense d_out -> d_out).
    dropout_rate: dropout probability, active only with `train=True`.
    sketch_seed: seed of the sketch hashes.
    d_reduce: optional Dense projection of the tokens to this width before
      the moment (as iSQRT-COV's 2048 -> 256); the head weight then has
      `d_reduce (d_reduce + 1) / 2` rows instead of `D (D + 1) / 2`.
    dtype: compute dtype of the Dense layers (Flax convention); None infers.
    param_dtype: parameter dtype.
    precision: matmul precision of every product.
    policy: optional precision policy (`moment_jax.precision`): a name
      ("float32", "tf32", "bfloat16", "bfloat16-sqrt32"), a
      "params=...,compute=...,output=..." string or a `Policy`. When given it
      replaces `dtype`, `param_dtype` and `precision`.
    remat_policy: None (no recomputation: fastest), "isqrt", "features", a
      `jax.checkpoint_policies` name or a policy callable; see
      `moment_jax.remat.resolve_remat`.
    isqrt_chunk: compute the square root over the batch in chunks of this
      many samples, bounding its workspace.
    check_values: check finite tokens, non-negative graph, non-empty mask
      rows and finite results of every stage, named in the error. `True` or
      "callback": host callbacks (a small sync per call); "checkify":
      `checkify.check`s, for a caller wrapped in `checkify.checkify`. Off
      (the default) adds nothing to the program.

  Inputs: tokens `[batch, tokens, dim]`, optional graph `[tokens, tokens]` or
  `[batch, tokens, tokens]`, optional mask `[batch, tokens]` bool. Output
  `[batch, d_out]`. BatchNorm statistics live in `batch_stats`; dropout draws
  from the `'dropout'` rng.

  Example:
    >>> head = MomentHead.from_preset("optimized")
    >>> variables = head.init(jax.random.key(0), tokens, graph, train=False)
    >>> out, updates = head.apply(variables, tokens, graph, train=True,
    ...     rngs={"dropout": key}, mutable=["batch_stats"])

  References:
    Li et al., "Towards Faster Training of Global Covariance Pooling Networks
    by Iterative Matrix Square Root Normalization", CVPR 2018.
    Pham, Pagh, "Fast and Scalable Polynomial Kernels via Explicit Feature
    Maps", KDD 2013.
  """

  d_out: int = 512
  use_third_order: bool = False
  isqrt_iterations: int = 3
  isqrt_normalization: str = "trace"
  isqrt_method: str = "newton_schulz"
  isqrt_space: str = "auto"
  sketch_dim: int = 1024
  eps: float = 1e-5
  mlp: str = "single"
  dropout_rate: float = 0.1
  sketch_seed: int = 0
  d_reduce: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  policy: str | Policy | None = None
  remat_policy: str | Callable[..., Any] | None = None  # None: fastest, most memory
  isqrt_chunk: int | None = None
  check_values: bool | str = False

  @classmethod
  def from_preset(cls, preset_name: str, /, **overrides: Any) -> "MomentHead":
    """A head configured as preset `name` (see `moment_jax.presets`), with overrides."""
    return cls(**{**presets.preset(preset_name), **overrides})

  def validate(self) -> None:
    """Raises `ValueError` for a bad configuration (called on every trace)."""
    check_config(self.isqrt_iterations, self.use_third_order, self.sketch_dim,
                 self.isqrt_normalization, self.isqrt_method, self.isqrt_space)
    check_head_config(self.d_out, self.mlp, self.dropout_rate, self.d_reduce)
    check_chunk(self.isqrt_chunk)
    checks.check_mode(self.check_values)
    if self.policy is not None:
      get_policy(self.policy)
    resolve_remat(self.remat_policy)

  def resolved_policy(self, tokens_dtype: Any = jnp.float32) -> Policy:
    """The effective `Policy`: `policy` if given, else the Flax dtype trio."""
    if self.policy is not None:
      return get_policy(self.policy)
    compute = self.dtype or jnp.promote_types(tokens_dtype, self.param_dtype)
    return Policy(
        param_dtype=self.param_dtype,
        compute_dtype=compute,
        output_dtype=compute,
        moment_dtype=jnp.promote_types(compute, jnp.float32),
        matmul=self.precision)

  def feature_fn(self, policy: Policy, outer_remat: bool = True) -> Callable[..., jax.Array]:
    """`(tokens, graph, mask) -> [batch, F]`: the pipeline of SPEC sections 1-5
    under this head's configuration and remat policy."""
    remat_isqrt, ckpt = resolve_remat(self.remat_policy)
    fn = functools.partial(
        pipeline,
        isqrt_iterations=self.isqrt_iterations,
        isqrt_normalization=self.isqrt_normalization,
        isqrt_method=self.isqrt_method,
        isqrt_space=self.isqrt_space,
        use_third_order=self.use_third_order,
        sketch_dim=self.sketch_dim,
        sketch_seed=self.sketch_seed,
        eps=self.eps,
        moment_dtype=policy.moment_dtype,
        sqrt_dtype=policy.moment_dtype,
        precision=policy.matmul,
        remat_isqrt=remat_isqrt,
        check=checks.check_mode(self.check_values))
    if ckpt is not None and outer_remat:
      fn = jax.checkpoint(fn, policy=ckpt)
    return fn

  def _check_width(self, width: int) -> None:
    if self.is_initializing():
      return
    params = self.variables.get("params", {})
    if self.d_reduce is not None and "reduce" in params:
      built = params["reduce"]["kernel"].shape[0]
    elif self.d_reduce is None and "proj" in params:
      built = width_from_features(params["proj"]["kernel"].shape[0],
                                  self.use_third_order, self.sketch_dim)
    else:
      return
    if built != width:
      raise ValueError(
          f"tokens: width (last axis) {width} differs from the width {built} "
          f"the parameters were built for")

  @nn.compact
  def __call__(self, tokens: jax.Array, graph: jax.Array | None = None,
               mask: jax.Array | None = None, *, train: bool) -> jax.Array:
    """Applies the head: `[batch, tokens, dim]` -> `[batch, d_out]`."""
    self.validate()
    checks.check_call(tokens, graph, mask, values=self.check_values)
    self._check_width(tokens.shape[-1])
    pol = self.resolved_policy(tokens.dtype)
    dense = functools.partial(nn.Dense, dtype=pol.compute_dtype,
                              param_dtype=pol.param_dtype, precision=pol.matmul)

    x = tokens.astype(pol.compute_dtype)
    if self.d_reduce is not None:
      x = dense(self.d_reduce, name="reduce")(x)
    # The projection runs in the parameter dtype: casting its [F, d_out] kernel
    # (151M entries at D=768) to a bf16 compute dtype would add a copy of it to
    # the residuals and one to its gradient; casting the features is cheap.
    proj = Projection(self.d_out, dtype=pol.param_dtype, param_dtype=pol.param_dtype,
                      precision=pol.matmul, name="proj")
    if self.isqrt_chunk is None:
      y = proj(self.feature_fn(pol)(x, graph, mask))
    else:
      _, ckpt = resolve_remat(self.remat_policy)
      y = proj(feature_fn=self.feature_fn(pol, outer_remat=False), tokens=x, graph=graph,
               mask=mask, chunk=self.isqrt_chunk, remat=ckpt,
               in_features=feature_size(x.shape[-1], self.use_third_order, self.sketch_dim))
    y = y.astype(pol.compute_dtype)
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=pol.compute_dtype, param_dtype=pol.param_dtype,
                     name="norm")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    if self.mlp == "double":
      y = dense(self.d_out, name="out")(y)
    y = checks.check_finite(y, "output", checks.check_mode(self.check_values))
    return y.astype(pol.output_dtype)
