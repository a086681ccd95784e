"""Tensor Sketch of the third-order moment.

References:
  Pham, Pagh. "Fast and Scalable Polynomial Kernels via Explicit Feature
  Maps", KDD 2013.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax.typing import Dtype

from moment_jax.ops import _checks

__all__ = ["count_sketch", "power_normalize", "sketch_hashes", "tensor_sketch_moment"]


def check_sketch_dim(sketch_dim: int) -> int:
  """Validates the sketch length (a static Python int >= 1)."""
  _checks.check_int("sketch_dim", sketch_dim)
  return sketch_dim


@functools.lru_cache(maxsize=None)
def sketch_hashes(dim: int, sketch_dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The three count-sketch hashes of docs/math.md section 6, drawn exactly as specified.

  Returns:
    `(h, s)`, each `[3, dim]`: bucket (int32 in `[0, sketch_dim)`) and sign
    (float32, +-1) of each channel for the three sketches. Any
    implementation that draws with `numpy.random.default_rng(seed)` in the
    same order gets the same hashes.
  """
  rng = np.random.default_rng(seed)
  hs, ss = [], []
  for _ in range(3):
    hs.append(rng.integers(0, sketch_dim, size=dim))
    ss.append(2 * rng.integers(0, 2, size=dim) - 1)
  h = np.stack(hs).astype(np.int32)
  s = np.stack(ss).astype(np.float32)
  h.setflags(write=False)
  s.setflags(write=False)
  return h, s


def count_sketch(x: jax.Array, h: np.ndarray, s: np.ndarray, sketch_dim: int) -> jax.Array:
  """`C(x) = sum_d s[d] x[d] e_{h[d]}` over the last axis: `[..., dim] -> [..., sketch_dim]`."""
  out = jnp.zeros((*x.shape[:-1], sketch_dim), x.dtype)
  return out.at[..., h].add(x * s.astype(x.dtype))


def power_normalize(m: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Signed cube root `sign(m) ((|m| + eps)^(1/3) - eps^(1/3))`; finite gradient at 0."""
  return jnp.sign(m) * (jnp.cbrt(jnp.abs(m) + eps) - eps ** (1.0 / 3.0))


def tensor_sketch_moment(
  hc: jax.Array,
  sketch_dim: int,
  seed: int = 0,
  mask: jax.Array | None = None,
  eps: float = 1e-5,
  *,
  dtype: Dtype | None = None,
) -> jax.Array:
  """Power-normalised Tensor Sketch of the third moment, docs/math.md section 6.

  Args:
    hc: centred tokens `[batch, tokens, dim]`, zero on padding rows.
    sketch_dim: sketch length, a static int >= 1.
    seed: seed of the hashes (`numpy.random.default_rng(seed)`).
    mask: optional `[batch, tokens]` bool; only counts the valid tokens
      (their rows of `hc` must already be zero).
    eps: power-normalisation offset.
    dtype: compute dtype, raised to at least float32 (FFTs need it).

  Returns:
    `[batch, sketch_dim]` in the compute dtype.
  """
  check_sketch_dim(sketch_dim)
  # FFTs exist for float32 and float64 only: bfloat16 policies sketch in float32.
  dtype = jnp.promote_types(dtype if dtype is not None else hc.dtype, jnp.float32)
  hc = hc.astype(dtype)
  hs, ss = sketch_hashes(hc.shape[-1], sketch_dim, seed)
  spectrum = jnp.fft.rfft(count_sketch(hc, hs[0], ss[0], sketch_dim), axis=-1)
  for h, s in zip(hs[1:], ss[1:]):
    spectrum = spectrum * jnp.fft.rfft(count_sketch(hc, h, s, sketch_dim), axis=-1)
  n: jax.Array | int
  if mask is None:
    n = hc.shape[1]
  else:
    n = jnp.maximum(jnp.sum(mask.astype(dtype), axis=-1, keepdims=True), 1)
  # The inverse FFT is linear: the sum over tokens of the per-token sketches is the
  # inverse FFT of the summed spectra, one per sample instead of one per token (and
  # no [batch, tokens, sketch_dim] buffer). Padding rows of hc are zero, so their
  # spectra are zero: a plain sum is right.
  m3 = jnp.fft.irfft(jnp.sum(spectrum, axis=1), n=sketch_dim, axis=-1) / n
  return power_normalize(m3, eps)
