"""`HeadConfig`: the moment head's configuration, its checks and what follows from it.

One frozen dataclass holds every option of the head. The Linen head keeps the
same fields as flat attributes and delegates here; the NNX head holds one;
the converter and the PyTorch reference read it. The math behind each field
is in docs/math.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
from flax.typing import Dtype, PrecisionLike

from moment_jax import presets
from moment_jax.kernels.triu_project import FusedAdamW, is_highest
from moment_jax.ops import _checks
from moment_jax.ops.features import check_config, feature_size, pipeline, root_and_sketch
from moment_jax.ops.project import _layout_mesh, per_device
from moment_jax.precision import Policy, get_policy
from moment_jax.remat import resolve_remat

__all__ = ["CheckValues", "FIELDS", "HeadConfig", "Method", "Mlp", "Normalization", "Space"]

Normalization = Literal["trace", "frobenius"]
Method = Literal["newton_schulz", "eigh"]
Space = Literal["auto", "channel", "token"]
Mlp = Literal["single", "double"]
CheckValues = bool | Literal["callback", "checkify"]

_MLPS: tuple[str, ...] = ("single", "double")
_DTYPE_FIELDS = ("dtype", "param_dtype", "precision")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Configuration of the moment head (docs/math.md states the math).

  Attributes:
    d_out: output width.
    use_third_order: append the Tensor Sketch of the third moment.
    isqrt_iterations: Newton–Schulz steps `K >= 1`.
    isqrt_normalization: "trace" (the original's) or "frobenius" (same cost,
      closer to the exact root at few iterations; docs/numerics.md).
    isqrt_method: "newton_schulz" or "eigh" (the exact root: evaluation and
      reference; much slower on GPU).
    isqrt_space: "auto", "channel" or "token": run Newton–Schulz on the
      `[dim, dim]` moment or, with the same iterates, on the `[tokens, tokens]`
      Gram matrix (~10x fewer FLOPs for ViT-B's 196 tokens and 768 channels);
      "auto" takes the cheaper.
    sketch_dim: Tensor Sketch length (with the third order).
    eps: ridge of the moment, degree floor and power-normalisation offset; a
      positive float (with `eps=0`, constant tokens give a zero trace).
    mlp: "single" (Dense, BatchNorm, GELU, Dropout) or "double" (and a second
      Dense `d_out -> d_out`).
    dropout_rate: dropout probability in `[0, 1)`, active only in training.
    sketch_seed: seed of the sketch hashes.
    d_reduce: optional Dense projection of the tokens to this width before the
      moment (as iSQRT-COV's 2048 -> 256); the head weight then has
      `d_reduce (d_reduce + 1) / 2` rows instead of `D (D + 1) / 2`.
    dtype: compute dtype of the Dense layers (Flax convention); None infers.
    param_dtype: parameter dtype.
    precision: matmul precision of every product.
    policy: optional precision policy (`moment_jax.precision`): a name
      ("float32", "tf32", "bfloat16", "bfloat16-sqrt32"), a
      "params=...,compute=...,output=..." string or a `Policy`. It replaces
      `dtype`, `param_dtype` and `precision`, so giving it with any of them is
      an error.
    remat_policy: None (no recomputation: fastest, most memory), "isqrt",
      "features", a `jax.checkpoint_policies` name or a policy callable; see
      `moment_jax.remat.resolve_remat`.
    isqrt_chunk: run the feature pipeline and the projection over this many
      samples at a time, so neither the `[batch, F]` features nor the square
      root's workspace grow with the batch.
    use_kernels: run the projection's backward (and the triangle gather's
      transpose) as the Pallas kernel `moment_jax.kernels.triu_project`.
      None (default): on when JAX's backend is a GPU with one device, the
      pipeline is not chunked (`isqrt_chunk=None`), the width (after
      `d_reduce`) is below 2048 and the matmul precision is below HIGHEST
      (the tf32 and bfloat16 policies; docs/performance.md); False: the XLA
      path everywhere; True: the kernel wherever the pipeline is not chunked
      (interpreted on a CPU: for tests).
      Under several devices the kernel is off unless asked for, since the
      SPMD partitioner cannot split a custom kernel.
    fused_adamw: a `moment_jax.kernels.FusedAdamW`: the projection kernel's
      AdamW step runs inside its Pallas backward (`kernels.triu_project_adamw`),
      which reads each kernel tile once and never writes its gradient. The
      kernel and its moments then live in Flax's overwrite-with-gradient
      collection (`flax.linen.fp8_ops.OVERWRITE_WITH_GRADIENT`), whose
      "gradients" are their new values; train the other parameters with
      optax as usual (`flax.training.train_state.TrainState` does both; the
      NNX head holds them as `moment_jax.nnx.FusedState`, see its recipe).
      Needs the kernel path (not `use_kernels=False`, no `isqrt_chunk`, no
      sharding layout), one call per step and one device.
    check_values: check finite tokens, non-negative graph, non-empty mask rows
      and finite results of every stage, named in the error. `True` or
      "callback": host callbacks (a small sync per call); "checkify":
      `checkify.check`s, for a caller wrapped in `checkify.checkify`. Off (the
      default) adds nothing to the program.

  Example:
    >>> cfg = HeadConfig.from_preset("optimized", policy="bfloat16")
    >>> cfg.d_out, cfg.isqrt_iterations, cfg.feature_size(768)
    (512, 3, 295296)
    >>> cfg.resolved_policy().compute_dtype
    dtype(bfloat16)
  """

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
  remat_policy: str | Callable[..., Any] | None = None
  isqrt_chunk: int | None = None
  use_kernels: bool | None = None
  fused_adamw: FusedAdamW | None = None
  check_values: CheckValues = False

  @classmethod
  def from_preset(cls, name: str, /, **overrides: Any) -> HeadConfig:
    """Preset `name` (`moment_jax.presets`) with `overrides`."""
    return cls(**{**presets.preset(name), **overrides})

  @classmethod
  def from_fields(cls, source: Any) -> HeadConfig:
    """The configuration read off any object with the same attributes (a Linen head)."""
    return cls(**{f.name: getattr(source, f.name) for f in dataclasses.fields(cls)})

  def asdict(self) -> dict[str, Any]:
    """The fields as keyword arguments (values as given)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def validate(self) -> None:
    """Raises `ValueError` naming the first bad field and the value seen."""
    check_config(
      self.isqrt_iterations,
      self.use_third_order,
      self.sketch_dim,
      self.isqrt_normalization,
      self.isqrt_method,
      self.isqrt_space,
    )
    _checks.check_int("d_out", self.d_out)
    _checks.check_choice("mlp", self.mlp, _MLPS)
    if isinstance(self.dropout_rate, bool) or not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate: expected a value in [0, 1), got {self.dropout_rate!r}")
    _checks.check_int("d_reduce", self.d_reduce, allow_none=True)
    _checks.check_int("isqrt_chunk", self.isqrt_chunk, allow_none=True)
    _checks.check_int("sketch_seed", self.sketch_seed, low=0)
    if (
      isinstance(self.eps, bool)
      or not isinstance(self.eps, (int, float))
      or not math.isfinite(self.eps)
      or self.eps <= 0
    ):
      raise ValueError(
        f"eps: expected a float > 0, got {self.eps!r} (a positive finite ridge: with "
        f"eps=0 constant tokens give a zero trace)"
      )
    _checks.check_mode(self.check_values)
    if self.use_kernels not in (None, True, False):
      raise ValueError(f"use_kernels: expected None, True or False, got {self.use_kernels!r}")
    if self.fused_adamw is not None:
      if not isinstance(self.fused_adamw, FusedAdamW):
        raise ValueError(
          f"fused_adamw: expected None or a moment_jax.kernels.FusedAdamW, got {self.fused_adamw!r}"
        )
      self.fused_adamw.check()
      if self.use_kernels is False or self.isqrt_chunk is not None:
        raise ValueError(
          "fused_adamw: the update runs in the Pallas projection kernel, so it needs "
          f"use_kernels None or True and isqrt_chunk None, got use_kernels={self.use_kernels!r}, "
          f"isqrt_chunk={self.isqrt_chunk!r}"
        )
    if self.policy is not None:
      get_policy(self.policy)
      given = [f for f in _DTYPE_FIELDS if getattr(self, f) != _DEFAULTS[f]]
      if given:
        raise ValueError(
          f"policy: {self.policy!r} sets the dtypes and the matmul precision, so it "
          f"cannot be combined with {', '.join(f'{f}={getattr(self, f)!r}' for f in given)}; "
          f"give one or the other"
        )
    resolve_remat(self.remat_policy)

  def resolved_policy(self, tokens_dtype: Any = jnp.float32) -> Policy:
    """The effective `Policy`: `policy` if given, else the Flax dtype trio
    (compute dtype `dtype`, or the promotion of the tokens' and parameters')."""
    if self.policy is not None:
      return get_policy(self.policy)
    compute = jnp.dtype(self.dtype or jnp.promote_types(tokens_dtype, self.param_dtype))
    return Policy(
      param_dtype=jnp.dtype(self.param_dtype),
      compute_dtype=compute,
      output_dtype=compute,
      moment_dtype=jnp.promote_types(compute, jnp.float32),
      # None means JAX's default precision; Policy's annotation is the resolved kind.
      matmul=self.precision,  # type: ignore[arg-type]
    )

  def width(self, d_in: int) -> int:
    """Token width the moment sees: `d_reduce`, or `d_in`."""
    return self.d_reduce if self.d_reduce is not None else d_in

  def feature_size(self, d_in: int) -> int:
    """`F`, the projection's input width, for tokens of width `d_in`."""
    return feature_size(self.width(d_in), self.use_third_order, self.sketch_dim)

  def width_from_features(self, f: int) -> int | None:
    """The moment's width `w` with `feature_size(w) == f`, or None if none has it."""
    tri = f - (self.sketch_dim if self.use_third_order else 0)
    if tri < 1:
      return None
    w = (math.isqrt(8 * tri + 1) - 1) // 2
    return w if w * (w + 1) // 2 == tri else None

  def _pipeline_options(self, policy: Policy) -> dict[str, Any]:
    """The keyword arguments of `ops.features.root_and_sketch` / `pipeline`."""
    return dict(
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
      remat_isqrt=resolve_remat(self.remat_policy)[0],
      check=_checks.check_mode(self.check_values),
    )

  def feature_fn(self, policy: Policy, outer_remat: bool = True) -> Callable[..., jax.Array]:
    """`(tokens, graph, mask) -> [batch, F]`: the pipeline of docs/math.md
    sections 1-6 under this configuration and remat policy. With
    `outer_remat=False` the checkpoint around the whole pipeline is left to
    the caller (the chunked projection puts it around pipeline and product)."""
    _, ckpt = resolve_remat(self.remat_policy)
    fn: Callable[..., jax.Array] = functools.partial(pipeline, **self._pipeline_options(policy))
    if ckpt is not None and outer_remat:
      fn = jax.checkpoint(fn, policy=ckpt)
    # Under a sharding layout, run per device (the chunked path already does).
    return per_device(fn) if outer_remat else fn

  def kernel_path(self, width: int, policy: Policy | None = None) -> bool:
    """Whether the projection runs as `kernels.triu_project` for tokens (after
    `d_reduce`) of width `width` under `policy` (default: the resolved one);
    see `use_kernels`."""
    # A custom kernel cannot be split by the SPMD partitioner: under a layout
    # it would gather the weight, so the layout's constraints win.
    if self.isqrt_chunk is not None or self.use_kernels is False or _layout_mesh() is not None:
      if self.fused_adamw is not None:
        raise ValueError(
          "fused_adamw: needs the Pallas projection kernel, which is off under a sharding "
          "layout, with isqrt_chunk or with use_kernels=False"
        )
      return False
    if self.use_kernels or self.fused_adamw is not None:
      return True
    # At HIGHEST precision Triton's products are three TF32 passes, not XLA's
    # float32 ones: close (1e-6) but not equal, so "auto" leaves float32 to XLA.
    matmul = (policy or self.resolved_policy()).matmul
    return (
      jax.default_backend() == "gpu"
      and jax.device_count() == 1
      and width < 2048
      and not is_highest(matmul)
    )

  def parts_fn(self, policy: Policy) -> Callable[..., tuple[jax.Array, jax.Array | None]]:
    """`(tokens, graph, mask) -> (S, sketch or None)`: `feature_fn` before the
    triangle (`ops.features.root_and_sketch`), for the kernel path."""
    remat_isqrt, ckpt = resolve_remat(self.remat_policy)
    fn: Callable[..., Any] = functools.partial(root_and_sketch, **self._pipeline_options(policy))
    return jax.checkpoint(fn, policy=ckpt) if ckpt is not None else fn

  def chunk_remat(self) -> Callable[..., Any] | None:
    """The checkpoint policy around each chunk of the fused projection."""
    return resolve_remat(self.remat_policy)[1]


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(HeadConfig)}
FIELDS: tuple[str, ...] = tuple(_DEFAULTS)
