"""Upper-triangle vectorisation of symmetric matrices."""

from __future__ import annotations

import functools

import jax
import numpy as np

__all__ = ["triu_flat_indices", "triu_size", "triu_vector"]


@functools.lru_cache(maxsize=None)
def triu_flat_indices(dim: int) -> np.ndarray:
  """Flat row-major indices of `numpy.triu_indices(dim)`, built once per `dim`.

  A host constant: jit embeds it, nothing recomputes it per call.
  """
  rows, cols = np.triu_indices(dim)
  idx = (rows * dim + cols).astype(np.int32)
  idx.setflags(write=False)
  return idx


def triu_size(dim: int) -> int:
  """Length `dim * (dim + 1) / 2` of the upper-triangle vector."""
  return dim * (dim + 1) // 2


def triu_vector(s: jax.Array) -> jax.Array:
  """Row-major upper triangle (diagonal included) of `[..., dim, dim]` matrices.

  Args:
    s: `[..., dim, dim]`.

  Returns:
    `[..., dim * (dim + 1) / 2]` in `s`'s dtype, in the order of
    `s[numpy.triu_indices(dim)]`.
  """
  if s.ndim < 2 or s.shape[-1] != s.shape[-2]:
    raise ValueError(f"s: expected [..., dim, dim] square matrices, got shape {s.shape}")
  d = s.shape[-1]
  flat = s.reshape(*s.shape[:-2], d * d)
  return flat[..., triu_flat_indices(d)]
