"""Pallas kernels (GPU Triton backend; interpreted on CPU) for the head's hot spots."""

from moment_jax.kernels.triu_project import Tiles, default_tiles, triu_project

__all__ = ["Tiles", "default_tiles", "triu_project"]
