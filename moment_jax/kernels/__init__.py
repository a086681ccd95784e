"""Pallas kernels (GPU Triton backend; interpreted on CPU) for the head's hot spots."""

from moment_jax.kernels.triu_project import (
  FusedAdamW,
  Tiles,
  default_tiles,
  triu_project,
  triu_project_adamw,
)

__all__ = ["FusedAdamW", "Tiles", "default_tiles", "triu_project", "triu_project_adamw"]
