"""`MomentHead` for flax.nnx: the same head as `moment_jax.linen`, same numbers.

The NNX module owns parameters only; its configuration is a `HeadConfig`
(checks, precision policy and the feature pipeline), the same object the
Linen head delegates to, so both front ends run one code path without this
module importing Linen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, PrecisionLike

from moment_jax import _trees
from moment_jax.config import FIELDS, HeadConfig
from moment_jax.kernels import FusedAdamW, triu_project, triu_project_adamw
from moment_jax.ops import _checks
from moment_jax.ops.project import project, project_chunked

__all__ = ["FusedState", "MomentHead", "Projection", "linen_to_nnx", "nnx_to_linen"]

# Deprecated: the configuration fields, now `moment_jax.config.FIELDS`.
CONFIG_FIELDS: tuple[str, ...] = FIELDS

# `flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT`, the Linen collection of a fused
# head's `FusedState` variables (spelled out: this module does not import Linen).
_OWG = "_overwrite_with_gradient"


class FusedState(nnx.Variable):
  """A variable whose gradient is its new value: after `nnx.grad` w.r.t. it,
  assign the gradient (`nnx.update(model, grads)`) instead of giving it to an
  optimizer.

  NNX's form of Flax's overwrite-with-gradient collection: with
  `HeadConfig.fused_adamw`, the projection's kernel, its Adam moments `mu`,
  `nu` and the update count are `FusedState`s, whose "gradients" from
  `kernels.triu_project_adamw` are their values after the AdamW step. Take
  gradients w.r.t. `nnx.Param` and `FusedState`, give the `Param` part to
  the optimizer (built with `wrt=nnx.Param`, so it keeps no state for the
  kernel) and assign the rest. Call the head once per gradient: a second
  call would add two new values, no call would give zeros.

  Example:
    >>> import optax
    >>> from moment_jax.kernels import FusedAdamW
    >>> model = MomentHead.from_preset("optimized", 8, d_out=16, use_kernels=True,
    ...     fused_adamw=FusedAdamW(learning_rate=1e-2), rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    >>> tokens, graph = jnp.ones((4, 16, 8)), grid_graph(4, 4)
    >>> loss_fn = lambda model: jnp.mean(model(tokens, graph) ** 2)
    >>> diff = nnx.DiffState(0, nnx.Any(nnx.Param, FusedState))
    >>> loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model)
    >>> fused, params = nnx.split_state(grads, FusedState, ...)
    >>> _ = optimizer.update(model, params)   # the bias, BatchNorm: optax AdamW
    >>> nnx.update(model, fused)              # the kernel, mu, nu, count: assigned
    >>> int(model.proj.count[...])
    1
  """


def _keep_dtypes(
  args: tuple[Any, ...], *, dtype: Dtype | None = None, inexact: bool = True
) -> tuple[Any, ...]:
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
  `__call__` is `ops.project`, `chunked` is `ops.project_chunked`, both laid
  out on a mesh by the logical names of `ops.project` under
  `moment_jax.sharding.use_layout` (the state's path rules: `head_rules`).

  With `adamw`, as `moment_jax.linen.TriangleProjection`'s: the kernel (the
  same draw), its Adam moments `mu`, `nu` (zeros, `adamw.moment_dtype`) and
  the update count `count` (float32 zero) are `FusedState`s, and `triangle`
  is `kernels.triu_project_adamw`, whose backward takes the AdamW step; the
  bias stays an `nnx.Param`, and the XLA paths (`__call__`, `chunked`) are
  refused.

  Args:
    in_features: `F`.
    features: `d_out`.
    dtype, param_dtype, precision: as `nnx.Linear`.
    adamw: optional `kernels.FusedAdamW`.
    rngs: draws the kernel from the `params` stream.
  """

  def __init__(
    self,
    in_features: int,
    features: int,
    *,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    adamw: FusedAdamW | None = None,
    rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.features = features
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.adamw = adamw
    shape = (in_features, features)
    kernel = nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype)
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
    if adamw is None:
      self.kernel: nnx.Variable[jax.Array] = nnx.Param(kernel)
    else:
      self.kernel = FusedState(kernel)
      self.mu = FusedState(jnp.zeros(shape, adamw.moment_dtype))
      self.nu = FusedState(jnp.zeros(shape, adamw.moment_dtype))
      self.count = FusedState(jnp.zeros((), jnp.float32))

  def _weights(self) -> tuple[jax.Array, jax.Array]:
    if self.adamw is not None:
      raise ValueError(
        "fused_adamw: the projection's AdamW step runs in the Pallas kernel, so only "
        "Projection.triangle runs with FusedState weights"
      )
    return nnx.nn.dtypes.promote_dtype((self.kernel[...], self.bias[...]), dtype=self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[batch, F] -> [batch, d_out]`."""
    kernel, bias = self._weights()
    return project(x, kernel, bias, self.precision)

  def triangle(
    self, s: jax.Array, extra: jax.Array | None = None, *, dtype: Dtype | None = None
  ) -> jax.Array:
    """`triu_vector(s)` (then `extra`) times the kernel, by the Pallas kernel
    `moment_jax.kernels.triu_project` (as `moment_jax.linen.TriangleProjection`);
    with `adamw`, `kernels.triu_project_adamw`. `dtype`: the products' operand
    dtype (`triu_project`'s; the kernel is never copied), default `self.dtype`."""
    dtype = self.dtype if dtype is None else dtype
    if self.adamw is not None:
      return triu_project_adamw(
        s,
        self.kernel[...],
        self.bias[...],
        self.mu[...],
        self.nu[...],
        self.count[...],
        self.adamw,
        extra=extra,
        precision=self.precision,
        dtype=dtype,
      )
    w, b = self.kernel[...], self.bias[...]
    return triu_project(s, w, b, extra=extra, precision=self.precision, dtype=dtype)

  def chunked(
    self,
    feature_fn: Callable[..., jax.Array],
    tokens: jax.Array,
    graph: jax.Array | None,
    mask: jax.Array | None,
    *,
    chunk: int,
    remat: Callable[..., Any] | None = None,
  ) -> jax.Array:
    """`feature_fn(tokens, graph, mask)` and the product, `chunk` samples at a time."""
    kernel, bias = self._weights()
    return project_chunked(
      feature_fn,
      kernel,
      bias,
      tokens,
      graph,
      mask,
      chunk=chunk,
      remat=remat,
      precision=self.precision,
    )


class MomentHead(nnx.Module):
  """Second-order moment head for flax.nnx: graph propagation, square-rooted
  covariance, optional third-order sketch, then Dense -> BatchNorm -> GELU ->
  Dropout (-> Dense with `mlp="double"`).

  Same configuration, submodule names (`reduce`, `proj`, `norm`, `out`) and
  numbers as `moment_jax.linen.MomentHead`; `linen_to_nnx` / `nnx_to_linen`
  move weights between the two. Like every NNX module it starts in training
  mode (batch statistics, dropout on); `model.eval()` switches BatchNorm to
  its running statistics and turns dropout off, `model.train()` back.

  With `fused_adamw` (`HeadConfig`), the projection's kernel, Adam moments
  and update count are `FusedState`s: take gradients w.r.t.
  `nnx.Any(nnx.Param, FusedState)`, give the `Param`s to an
  `nnx.Optimizer(model, tx, wrt=nnx.Param)` and assign the `FusedState`s'
  gradients, their new values (`nnx.update`; `FusedState` has the recipe).

  Args:
    d_in: token width `dim` of the inputs (NNX creates parameters eagerly).
    config: a `HeadConfig` (default: its defaults).
    rngs: `params` stream for the weights, `dropout` stream for dropout.
    **fields: `HeadConfig` fields, overriding `config`'s (e.g. `d_out=256`).

  Inputs: tokens `[batch, tokens, dim]`, optional graph `[tokens, tokens]` or
  `[batch, tokens, tokens]`, optional mask `[batch, tokens]` bool. Output
  `[batch, d_out]`.

  Example:
    >>> head = MomentHead.from_preset("optimized", 8, d_out=16,
    ...                               rngs=nnx.Rngs(params=0, dropout=1))
    >>> tokens, graph = jnp.ones((4, 16, 8)), grid_graph(4, 4)
    >>> head(tokens, graph).shape   # training mode: batch statistics, dropout
    (4, 16)
    >>> head.eval()
    >>> head(tokens, graph).shape   # running statistics, no dropout
    (4, 16)

  References:
    Li et al., "Towards Faster Training of Global Covariance Pooling Networks
    by Iterative Matrix Square Root Normalization", CVPR 2018.
    Pham, Pagh, "Fast and Scalable Polynomial Kernels via Explicit Feature
    Maps", KDD 2013.
  """

  def __init__(self, d_in: int, config: HeadConfig | None = None, *, rngs: nnx.Rngs, **fields: Any):
    _checks.check_int("d_in", d_in)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
      raise TypeError(f"MomentHead: unknown fields {unknown}; HeadConfig has {', '.join(FIELDS)}")
    cfg = dataclasses.replace(config or HeadConfig(), **fields)
    cfg.validate()
    self.d_in = d_in
    self.config = cfg

    # With neither `policy` nor `dtype`, Linen's compute dtype is
    # promote(tokens, param_dtype), known only at call time; layers built with
    # dtype=None compute exactly that from inputs already cast to it.
    explicit = cfg.policy is not None or cfg.dtype is not None
    pol = cfg.resolved_policy()
    compute = pol.compute_dtype if explicit else None
    if cfg.d_reduce is not None:
      self.reduce = nnx.Linear(
        d_in,
        cfg.d_reduce,
        dtype=compute,
        param_dtype=pol.param_dtype,
        precision=pol.matmul,
        rngs=rngs,
      )
    self.proj = Projection(
      cfg.feature_size(d_in),
      cfg.d_out,
      dtype=pol.param_dtype,
      param_dtype=pol.param_dtype,
      precision=pol.matmul,
      adamw=cfg.fused_adamw,
      rngs=rngs,
    )
    self.norm = nnx.BatchNorm(
      cfg.d_out,
      use_running_average=False,
      momentum=0.9,
      epsilon=1e-5,
      dtype=compute,
      param_dtype=pol.param_dtype,
      promote_dtype=_keep_dtypes,  # type: ignore[arg-type]
      rngs=rngs,
    )
    self.dropout = nnx.Dropout(cfg.dropout_rate, deterministic=False, rngs=rngs)
    if cfg.mlp == "double":
      self.out = nnx.Linear(
        cfg.d_out,
        cfg.d_out,
        dtype=compute,
        param_dtype=pol.param_dtype,
        precision=pol.matmul,
        rngs=rngs,
      )

  @classmethod
  def from_preset(cls, name: str, d_in: int, *, rngs: nnx.Rngs, **overrides: Any) -> MomentHead:
    """A head configured as preset `name` (see `moment_jax.presets`), with overrides."""
    return cls(d_in, HeadConfig.from_preset(name, **overrides), rngs=rngs)

  def __getattr__(self, name: str) -> Any:
    # The configuration's fields read as attributes (`head.d_out`), as on the Linen head.
    cfg = self.__dict__.get("config")
    if cfg is not None and name in FIELDS:
      return getattr(cfg, name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  def __call__(
    self, tokens: jax.Array, graph: jax.Array | None = None, mask: jax.Array | None = None
  ) -> jax.Array:
    """Applies the head: `[batch, tokens, dim]` -> `[batch, d_out]`."""
    cfg = self.config
    _checks.check_call(tokens, graph, mask, values=cfg.check_values)
    if tokens.shape[-1] != self.d_in:
      raise ValueError(
        f"tokens: width (last axis) {tokens.shape[-1]} differs from d_in={self.d_in} "
        f"the parameters were built for"
      )
    pol = cfg.resolved_policy(tokens.dtype)

    x = tokens.astype(pol.compute_dtype)
    if cfg.d_reduce is not None:
      x = self.reduce(x)
    if cfg.kernel_path(x.shape[-1], pol):
      y = self.proj.triangle(*cfg.parts_fn(pol)(x, graph, mask), dtype=pol.compute_dtype)
    elif cfg.isqrt_chunk is None:
      y = self.proj(cfg.feature_fn(pol)(x, graph, mask))
    else:
      y = self.proj.chunked(
        cfg.feature_fn(pol, outer_remat=False),
        x,
        graph,
        mask,
        chunk=cfg.isqrt_chunk,
        remat=cfg.chunk_remat(),
      )
    y = self.norm(y.astype(pol.compute_dtype))
    y = nnx.gelu(y, approximate=False)
    y = self.dropout(y)
    if cfg.mlp == "double":
      y = self.out(y)
    y = _checks.check_finite(y, "output", _checks.check_mode(cfg.check_values))
    return y.astype(pol.output_dtype)


def _shape_dtype(x: Any) -> str:
  return f"{jnp.result_type(x)}{list(jnp.shape(x))}"


def linen_to_nnx(variables: Mapping[str, Any], model: MomentHead) -> MomentHead:
  """Loads Linen `MomentHead` variables into an NNX `MomentHead`, in place.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` from the Linen head's
      `init` (or training); `batch_stats` may be omitted. With `fused_adamw`,
      also the overwrite-with-gradient collection
      (`flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT`: the kernel, `mu`, `nu`,
      `count`), loaded into the head's `FusedState`s.
    model: an NNX head of the same configuration and `d_in`.

  Returns:
    `model`, whose parameters and batch statistics are now `variables`'.
    A missing or extra entry or collection, or a shape or dtype that
    differs, raises `ValueError` and leaves `model` untouched.
  """
  fused = model.config.fused_adamw is not None
  if fused != (_OWG in variables):
    raise ValueError(
      f"variables: the NNX head has fused_adamw={model.config.fused_adamw!r}, so expected "
      f"{'an' if fused else 'no'} {_OWG!r} collection (a Linen head with fused_adamw keeps "
      f"the projection's kernel, mu, nu and count there), got {sorted(variables)}; "
      f"nothing was loaded"
    )
  kinds: list[tuple[str, type[nnx.Variable[Any]]]] = [
    ("params", nnx.Param),
    ("batch_stats", nnx.BatchStat),
  ]
  if fused:
    kinds.append((_OWG, FusedState))
  updates = []
  for collection, kind in kinds:
    if collection not in variables:
      if collection == "params":
        raise ValueError(f"variables: expected a 'params' collection, got {sorted(variables)}")
      continue
    state = nnx.state(model, kind)
    new = jax.tree.map(lambda x: x, dict(variables[collection]))
    _trees.check_entries(
      f"variables[{collection!r}]: does not match the NNX head; nothing was loaded:",
      {k: _shape_dtype(v) for k, v in _trees.flat(new).items()},
      {k: _shape_dtype(v) for k, v in _trees.flat(nnx.to_pure_dict(state)).items()},
    )
    nnx.replace_by_pure_dict(state, new)
    updates.append(state)
  nnx.update(model, *updates)
  return model


def nnx_to_linen(model: MomentHead) -> dict[str, Any]:
  """The Linen variables `{"params": ..., "batch_stats": ...}` of an NNX head
  (with `fused_adamw`, also the overwrite-with-gradient collection of its
  `FusedState`s, `flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT`).

  `moment_jax.MomentHead.from_config(model.config).apply(nnx_to_linen(model),
  tokens, train=...)` gives the NNX head's numbers.
  """
  variables = {
    "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
  }
  if model.config.fused_adamw is not None:
    variables[_OWG] = nnx.to_pure_dict(nnx.state(model, FusedState))
  return variables
