"""`MomentHead` for flax.linen: the moment pipeline plus its projection MLP."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.typing import Dtype, PrecisionLike

from moment_jax import _deprecated, presets
from moment_jax.config import CheckValues, HeadConfig, Method, Mlp, Normalization, Space
from moment_jax.kernels import FusedAdamW, triu_project, triu_project_adamw
from moment_jax.ops import _checks
from moment_jax.ops.features import feature_size
from moment_jax.ops.project import project, project_chunked
from moment_jax.precision import Policy

__all__ = ["ChunkedProjection", "MomentHead", "Projection", "TriangleProjection"]


def _kernel_and_bias(
  module: nn.Module, in_features: int, promote: bool = True
) -> tuple[jax.Array, jax.Array]:
  """`nn.Dense`'s parameters (names, shapes, initialisers), promoted to `module.dtype`."""
  kernel = module.param(
    "kernel", nn.initializers.lecun_normal(), (in_features, module.features), module.param_dtype
  )
  bias = module.param("bias", nn.initializers.zeros_init(), (module.features,), module.param_dtype)
  if promote:
    kernel, bias = nn.dtypes.promote_dtype(kernel, bias, dtype=module.dtype)
  return kernel, bias


class Projection(nn.Module):
  """The head's `Dense(F -> d_out)`, without copies of its weight.

  Same parameters (names, shapes, initialisers) as `nn.Dense(features)` on
  `[batch, F]` inputs; the product is `ops.project`, which keeps XLA:GPU from
  materialising a padded copy of the `[F, d_out]` kernel. Its arrays carry
  logical axis names (`ops.project.KERNEL_AXES` for the kernel), which
  `moment_jax.sharding.head_rules` lays out on a mesh.

  Attributes:
    features: output width.
    dtype, param_dtype, precision: as `nn.Dense`.
  """

  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, F]` -> `[batch, features]`."""
    kernel, bias = _kernel_and_bias(self, x.shape[-1])
    return project(x, kernel, bias, self.precision)


class TriangleProjection(nn.Module):
  """`Projection` applied to the square root itself: `triu_vector(S)` (and the
  sketch after it) times the kernel by `moment_jax.kernels.triu_project`, whose
  Pallas backward reads each kernel tile once for both cotangents and never
  builds the `[batch, F]` features. The same parameters as `Projection`.

  With `adamw`, the kernel, its Adam moments `mu`, `nu` and the update count
  live in the `OVERWRITE_WITH_GRADIENT` collection (the kernel initialised as
  `nn.Dense`'s) and the backward takes the AdamW step
  (`kernels.triu_project_adamw`); the bias stays in "params".

  Attributes:
    features: output width.
    dtype: the products' operand dtype (`kernels.triu_project`'s `dtype`):
      as `nn.Dense`'s, except that the kernel is rounded tile by tile inside
      the kernels, never copied; default the kernel's.
    param_dtype, precision: as `nn.Dense`.
    adamw: optional `kernels.FusedAdamW`.
  """

  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  adamw: FusedAdamW | None = None

  @nn.compact
  def __call__(self, s: jax.Array, extra: jax.Array | None = None) -> jax.Array:
    """`s` `[batch, dim, dim]`, `extra` `[batch, e]` -> `[batch, features]`."""
    dim = s.shape[-1]
    in_features = dim * (dim + 1) // 2 + (0 if extra is None else extra.shape[-1])
    if self.adamw is None:
      kernel, bias = _kernel_and_bias(self, in_features, promote=False)
      return triu_project(s, kernel, bias, extra=extra, precision=self.precision, dtype=self.dtype)
    shape = (in_features, self.features)
    owg = OVERWRITE_WITH_GRADIENT
    init = nn.initializers.lecun_normal()
    w = self.variable(owg, "kernel", lambda: init(self.make_rng("params"), shape, self.param_dtype))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    md = self.adamw.moment_dtype
    mu = self.variable(owg, "mu", jnp.zeros, shape, md)
    nu = self.variable(owg, "nu", jnp.zeros, shape, md)
    count = self.variable(owg, "count", jnp.zeros, (), jnp.float32)
    return triu_project_adamw(
      s,
      w.value,
      bias,
      mu.value,
      nu.value,
      count.value,
      self.adamw,
      extra=extra,
      precision=self.precision,
      dtype=self.dtype,
    )


class ChunkedProjection(nn.Module):
  """`Projection` fused with the feature pipeline over `chunk` samples at a
  time (`ops.project_chunked`): the same parameters, and neither the
  `[batch, F]` features nor their cotangent exist for the whole batch.

  Attributes:
    features: output width.
    in_features: `F`, the width `feature_fn` returns.
    chunk: samples per step.
    dtype, param_dtype, precision: as `nn.Dense`.
  """

  features: int
  in_features: int
  chunk: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(
    self,
    feature_fn: Callable[..., jax.Array],
    tokens: jax.Array,
    graph: jax.Array | None = None,
    mask: jax.Array | None = None,
    remat: Callable[..., Any] | None = None,
  ) -> jax.Array:
    """`feature_fn(tokens, graph, mask) @ kernel + bias`, chunk by chunk."""
    kernel, bias = _kernel_and_bias(self, self.in_features)
    return project_chunked(
      feature_fn,
      kernel,
      bias,
      tokens,
      graph,
      mask,
      chunk=self.chunk,
      remat=remat,
      precision=self.precision,
    )


class MomentHead(nn.Module):
  """Second-order moment head for flax.linen: graph propagation, square-rooted
  covariance, optional third-order sketch, then Dense -> BatchNorm -> GELU ->
  Dropout (-> Dense with `mlp="double"`).

  Attributes:
    The fields of `moment_jax.HeadConfig`, with the same names, defaults and
    meaning (its docstring documents them; `self.config` is this head's).

  Inputs: tokens `[batch, tokens, dim]`, optional graph `[tokens, tokens]` or
  `[batch, tokens, tokens]`, optional mask `[batch, tokens]` bool. Output
  `[batch, d_out]`. BatchNorm statistics live in `batch_stats`; dropout draws
  from the `'dropout'` rng.

  Example:
    >>> head = MomentHead.from_preset("optimized", d_out=16)
    >>> tokens, graph = jnp.ones((2, 16, 8)), grid_graph(4, 4)
    >>> variables = head.init(jax.random.key(0), tokens, graph, train=False)
    >>> out, updates = head.apply(variables, tokens, graph, train=True,
    ...     rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    >>> out.shape, variables["params"]["proj"]["kernel"].shape
    ((2, 16), (36, 16))

  References:
    Li et al., "Towards Faster Training of Global Covariance Pooling Networks
    by Iterative Matrix Square Root Normalization", CVPR 2018.
    Pham, Pagh, "Fast and Scalable Polynomial Kernels via Explicit Feature
    Maps", KDD 2013.
  """

  # The fields of HeadConfig, flat as Flax modules keep them (see its docstring);
  # tests/test_config.py checks that both lists agree.
  d_out: int = 512
  use_third_order: bool = False
  isqrt_iterations: int = 3
  isqrt_normalization: Normalization = "trace"
  isqrt_method: Method = "newton_schulz"
  isqrt_space: Space = "auto"
  sketch_dim: int = 1024
  eps: float = 1e-5
  mlp: Mlp = "single"
  dropout_rate: float = 0.1
  sketch_seed: int = 0
  d_reduce: int | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  policy: str | Policy | None = None
  remat_policy: str | Callable[..., Any] | None = None  # None: fastest, most memory
  isqrt_chunk: int | None = None
  use_kernels: bool | None = None
  fused_adamw: FusedAdamW | None = None
  check_values: CheckValues = False

  @classmethod
  def from_preset(cls, preset_name: str, /, **overrides: Any) -> MomentHead:
    """A head configured as preset `preset_name` (`moment_jax.presets`), with overrides."""
    return cls(**{**presets.preset(preset_name), **overrides})

  @classmethod
  def from_config(cls, config: HeadConfig, **kwargs: Any) -> MomentHead:
    """The head of `config` (`kwargs`: Linen's `name`, `parent`)."""
    return cls(**config.asdict(), **kwargs)

  @property
  def config(self) -> HeadConfig:
    """This head's configuration as a `HeadConfig`."""
    return HeadConfig.from_fields(self)

  def validate(self) -> None:
    """Raises `ValueError` for a bad configuration (called on every trace)."""
    self.config.validate()

  def resolved_policy(self, tokens_dtype: Any = jnp.float32) -> Policy:
    """`HeadConfig.resolved_policy`."""
    return self.config.resolved_policy(tokens_dtype)

  def feature_fn(self, policy: Policy, outer_remat: bool = True) -> Callable[..., jax.Array]:
    """`HeadConfig.feature_fn`: `(tokens, graph, mask) -> [batch, F]`."""
    return self.config.feature_fn(policy, outer_remat)

  def _check_width(self, config: HeadConfig, width: int) -> None:
    if self.is_initializing():
      return
    params = self.variables.get("params", {})
    proj = self.variables.get(OVERWRITE_WITH_GRADIENT, {}).get("proj", params.get("proj", {}))
    if config.d_reduce is not None and "reduce" in params:
      built = params["reduce"]["kernel"].shape[0]
    elif config.d_reduce is None and "kernel" in proj:
      built = config.width_from_features(proj["kernel"].shape[0])
    else:
      return
    if built != width:
      raise ValueError(
        f"tokens: width (last axis) {width} differs from the width {built} "
        f"the parameters were built for"
      )

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    graph: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    train: bool,
  ) -> jax.Array:
    """Applies the head: `[batch, tokens, dim]` -> `[batch, d_out]`."""
    cfg = self.config
    cfg.validate()
    _checks.check_call(tokens, graph, mask, values=cfg.check_values)
    self._check_width(cfg, tokens.shape[-1])
    pol = cfg.resolved_policy(tokens.dtype)
    dense = functools.partial(
      nn.Dense, dtype=pol.compute_dtype, param_dtype=pol.param_dtype, precision=pol.matmul
    )

    x = tokens.astype(pol.compute_dtype)
    if cfg.d_reduce is not None:
      x = dense(cfg.d_reduce, name="reduce")(x)
    # The XLA paths' projection runs in the parameter dtype: casting its [F, d_out]
    # kernel (151M entries at D=768) to a bf16 compute dtype would add a copy of it
    # to the residuals and one to its gradient; casting the features is cheap. The
    # kernels round the kernel's tiles to the compute dtype in registers instead.
    proj_args: dict[str, Any] = dict(
      dtype=pol.param_dtype, param_dtype=pol.param_dtype, precision=pol.matmul, name="proj"
    )
    if cfg.kernel_path(x.shape[-1], pol):
      tri_args = proj_args | dict(dtype=pol.compute_dtype)
      tri = TriangleProjection(cfg.d_out, adamw=cfg.fused_adamw, **tri_args)
      y = tri(*cfg.parts_fn(pol)(x, graph, mask))
    elif cfg.isqrt_chunk is None:
      y = Projection(cfg.d_out, **proj_args)(cfg.feature_fn(pol)(x, graph, mask))
    else:
      proj = ChunkedProjection(
        cfg.d_out,
        feature_size(x.shape[-1], cfg.use_third_order, cfg.sketch_dim),
        cfg.isqrt_chunk,
        **proj_args,
      )
      y = proj(cfg.feature_fn(pol, outer_remat=False), x, graph, mask, cfg.chunk_remat())
    y = y.astype(pol.compute_dtype)
    y = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=pol.compute_dtype,
      param_dtype=pol.param_dtype,
      name="norm",
    )(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(cfg.dropout_rate, deterministic=not train)(y)
    if cfg.mlp == "double":
      y = dense(cfg.d_out, name="out")(y)
    y = _checks.check_finite(y, "output", _checks.check_mode(cfg.check_values))
    return y.astype(pol.output_dtype)


def _check_head_config(d_out: int, mlp: str, dropout_rate: float, d_reduce: int | None) -> None:
  HeadConfig(d_out=d_out, mlp=mlp, dropout_rate=dropout_rate, d_reduce=d_reduce).validate()  # type: ignore[arg-type]


def _width_from_features(f: int, use_third_order: bool, sketch_dim: int) -> int:
  w = HeadConfig(use_third_order=use_third_order, sketch_dim=sketch_dim).width_from_features(f)
  return -1 if w is None else w


__getattr__ = _deprecated.module_getattr(
  __name__,
  {
    "MLPS": (lambda: ("single", "double"), "typing.get_args(moment_jax.config.Mlp)"),
    "check_head_config": (lambda: _check_head_config, "moment_jax.HeadConfig(...).validate()"),
    "width_from_features": (
      lambda: _width_from_features,
      "moment_jax.HeadConfig(...).width_from_features(f)",
    ),
  },
)
