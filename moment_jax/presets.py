"""The named configurations of docs/math.md section 8 ("Presets")."""

from __future__ import annotations

import types
from typing import Any

from moment_jax import _deprecated

__all__ = ["PRESETS", "PRESET_NAMES", "preset"]

_PRESETS = {
  # The unoptimised design (~300M parameters at D=768).
  "original": dict(
    d_out=1024, use_third_order=True, isqrt_iterations=5, sketch_dim=4096, mlp="double"
  ),
  # The recommended one (151M parameters at D=768).
  "optimized": dict(
    d_out=512, use_third_order=False, isqrt_iterations=3, sketch_dim=1024, mlp="single"
  ),
  "memory": dict(
    d_out=256, use_third_order=False, isqrt_iterations=2, sketch_dim=512, mlp="single"
  ),
  "performance": dict(
    d_out=512, use_third_order=True, isqrt_iterations=3, sketch_dim=2048, mlp="single"
  ),
}
_PRESETS["balanced"] = _PRESETS["optimized"]

PRESETS: types.MappingProxyType = types.MappingProxyType(
  {k: types.MappingProxyType(v) for k, v in _PRESETS.items()}
)
"""Read-only map from preset name to `MomentHead` keyword arguments."""

PRESET_NAMES: tuple[str, ...] = ("original", "optimized", "balanced", "memory", "performance")


def preset(name: str) -> dict[str, Any]:
  """The keyword arguments of preset `name` (a fresh, mutable copy)."""
  if name not in PRESETS:
    raise ValueError(f"preset: unknown name {name!r}; valid names are {', '.join(PRESET_NAMES)}")
  return dict(PRESETS[name])


def _seed_memory() -> Any:
  from moment_jax import cli

  return cli._SEED_MEMORY_MB


__getattr__ = _deprecated.module_getattr(
  __name__, {"SEED_MEMORY_MB": (_seed_memory, "the table `moment-jax report` prints")}
)
