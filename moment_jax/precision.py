"""Mixed-precision policies for the moment head, in the spirit of jmp.

A `Policy` names four dtypes and a matmul precision:

* `param_dtype`: storage of parameters;
* `compute_dtype`: tokens, the Dense layers and their activations;
* `output_dtype`: the head's output;
* `moment_dtype`: the moment and Newton–Schulz stage (operands and state;
  products always accumulate in float32 and the trace stays float32);
* `matmul`: `jax.lax.Precision` of every product.

Example:
  >>> get_policy("bfloat16").compute_dtype
  dtype(bfloat16)
  >>> get_policy("params=float32,compute=bfloat16,output=float32").moment_dtype
  dtype('float32')
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["NAMED_POLICIES", "Policy", "get_policy", "parse_policy"]

_MATMUL = {
  "default": jax.lax.Precision.DEFAULT,
  "tf32": jax.lax.Precision.DEFAULT,  # XLA:GPU runs DEFAULT f32 dots in TF32
  "high": jax.lax.Precision.HIGH,
  "highest": jax.lax.Precision.HIGHEST,
}
_KEYS = ("params", "compute", "output", "moment", "matmul")


@dataclasses.dataclass(frozen=True)
class Policy:
  """dtypes and matmul precision of the head; see the module docstring."""

  param_dtype: jnp.dtype = jnp.dtype(jnp.float32)
  compute_dtype: jnp.dtype = jnp.dtype(jnp.float32)
  output_dtype: jnp.dtype = jnp.dtype(jnp.float32)
  moment_dtype: jnp.dtype = jnp.dtype(jnp.float32)
  matmul: jax.lax.Precision = jax.lax.Precision.HIGHEST

  def __post_init__(self):
    for f in ("param_dtype", "compute_dtype", "output_dtype", "moment_dtype"):
      dt = jnp.dtype(getattr(self, f))
      if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"Policy.{f}: expected a floating dtype, got {dt}")
      object.__setattr__(self, f, dt)
    if self.moment_dtype == jnp.float16:
      # Squares of token entries above ~256 exceed float16's 65504: the
      # moment would silently become inf (the PyTorch ancestors' fp16 NaNs).
      raise ValueError(
        "Policy.moment_dtype: float16 overflows in the second moment (max 65504, "
        "reached by token entries of ~256); use bfloat16 (same width, float32's range)"
      )

  def cast_to_param(self, tree: Any) -> Any:
    return _cast_floating(tree, self.param_dtype)

  def cast_to_compute(self, tree: Any) -> Any:
    return _cast_floating(tree, self.compute_dtype)

  def cast_to_output(self, tree: Any) -> Any:
    return _cast_floating(tree, self.output_dtype)


def _cast_floating(tree: Any, dtype: jnp.dtype) -> Any:
  """Casts the floating leaves of `tree` to `dtype`; other leaves are kept."""

  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree.map(cast, tree)


_F32, _BF16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)
NAMED_POLICIES = {
  "float32": Policy(_F32, _F32, _F32, _F32, jax.lax.Precision.HIGHEST),
  "tf32": Policy(_F32, _F32, _F32, _F32, jax.lax.Precision.DEFAULT),
  # bf16 operands everywhere, f32 accumulation, trace and BatchNorm
  # statistics; at K <= 5 the rounding is small beside the truncation error.
  "bfloat16": Policy(_F32, _BF16, _F32, _BF16, jax.lax.Precision.DEFAULT),
  # bf16 except the moment and Newton–Schulz stage: for many iterations or a
  # near-exact root, where bf16 rounding would dominate.
  "bfloat16-sqrt32": Policy(_F32, _BF16, _F32, _F32, jax.lax.Precision.DEFAULT),
}


def _dtype(key: str, value: str) -> jnp.dtype:
  try:
    dt = jnp.dtype(value)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"policy: {key}={value!r} is not a floating dtype name")
  return dt


def parse_policy(spec: str) -> Policy:
  """Parses `"params=float32,compute=bfloat16,output=float32"`-style strings.

  Keys: `params`, `compute`, `output`, `moment` (defaults to `float32`) and
  `matmul` (`default`, `tf32`, `high`, `highest`; default `highest` when every
  dtype is float32, else `default`). Omitted dtypes default to float32.
  """
  fields: dict[str, str] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    key, sep, value = part.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or key not in _KEYS:
      raise ValueError(
        f"policy: unknown key {key!r} in {spec!r}; valid keys are {', '.join(_KEYS)}"
      )
    if key in fields:
      raise ValueError(f"policy: key {key!r} given twice in {spec!r}")
    fields[key] = value
  dts = {k: _dtype(k, fields.get(k, "float32")) for k in _KEYS[:-1]}
  all_f32 = all(dt == _F32 for dt in dts.values())
  mm = fields.get("matmul", "highest" if all_f32 else "default")
  if mm not in _MATMUL:
    raise ValueError(f"policy: matmul={mm!r} is unknown; valid values are {', '.join(_MATMUL)}")
  return Policy(dts["params"], dts["compute"], dts["output"], dts["moment"], _MATMUL[mm])


def get_policy(policy: str | Policy) -> Policy:
  """A `Policy` from itself, a name of `NAMED_POLICIES` or a `key=value` string."""
  if isinstance(policy, Policy):
    return policy
  if not isinstance(policy, str):
    raise ValueError(f"policy: expected a str or Policy, got {type(policy).__name__}")
  if policy in NAMED_POLICIES:
    return NAMED_POLICIES[policy]
  if "=" in policy:
    return parse_policy(policy)
  raise ValueError(
    f"policy: unknown name {policy!r}; valid names are "
    f"{', '.join(NAMED_POLICIES)}, or a string like "
    f"'params=float32,compute=bfloat16,output=float32'"
  )
