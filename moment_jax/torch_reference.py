"""The PyTorch design, written from docs/math.md: the peer of `moment_jax.MomentHead`.

Requires the optional `torch` extra (`pip install "moment-jax[torch]"`);
`import moment_jax` never imports this module, and `moment_jax.convert`
works without torch. The module mirrors the original PyTorch design:

* an `nn.Sequential` MLP: `mlp.0` Linear(F, d_out), `mlp.1` BatchNorm1d,
  `mlp.2` GELU (exact), `mlp.3` Dropout, and `mlp.4` Linear(d_out, d_out) for
  the double MLP;
* degrees as row sums (`graph.sum(-1)`) and `torch.rsqrt(deg.clamp(min=eps))`;
* the upper-triangle indices built once (`torch.triu_indices`), kept as a
  non-persistent buffer that follows the module across devices;
* the coupled Newton–Schulz iteration exactly as docs/math.md section 3 (`3K - 3`
  products), checkpointed with `torch.utils.checkpoint` when
  `checkpoint_isqrt` is set and the module trains;
* the Tensor Sketch with the hashes of docs/math.md section 6
  (`moment_jax.ops.sketch.sketch_hashes`, pure NumPy) and `torch.fft`.

One addition to the original: an optional `d_reduce` Linear (`reduce.*`) on
the tokens before the moment, the peer of the Linen head's `d_reduce`.

Given the same weights (`moment_jax.convert`) it agrees with the JAX head to
1e-5 relative error in evaluation mode (float32, highest matmul precision);
tests/test_torch_parity.py checks it for every preset.

Example:
  >>> head = MomentHead.from_preset("optimized", d_in=768).eval()
  >>> graph = torch.as_tensor(moment_jax.grid_graph(14, 14))
  >>> out = head(torch.randn(4, 196, 768), graph)        # [4, 512]

References:
  Li, Xie, Wang, Gao. "Towards Faster Training of Global Covariance Pooling
  Networks by Iterative Matrix Square Root Normalization", CVPR 2018.
  Pham, Pagh. "Fast and Scalable Polynomial Kernels via Explicit Feature
  Maps", KDD 2013.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moment_jax import presets
from moment_jax.config import HeadConfig, Mlp
from moment_jax.ops._checks import check_int
from moment_jax.ops.features import feature_size
from moment_jax.ops.sketch import sketch_hashes

__all__ = ["MomentHead", "newton_schulz_sqrt", "power_normalize"]


def newton_schulz_sqrt(m2: torch.Tensor, iterations: int) -> torch.Tensor:
  """docs/math.md section 3, literally: coupled Newton–Schulz, `3K - 3` products for K >= 2.

  Args:
    m2: `[batch, dim, dim]` symmetric positive definite.
    iterations: K >= 1.

  Returns:
    `[batch, dim, dim]`, approximately `m2^(1/2)`.
  """
  eye = torch.eye(m2.shape[-1], device=m2.device, dtype=m2.dtype)
  t = m2.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]  # > 0: M2 has eps * I
  a = m2 / t
  if iterations == 1:
    y = 0.5 * a @ (3 * eye - a)
  else:
    tt = 0.5 * (3 * eye - a)  # iteration 1
    y = a @ tt
    z = tt
    for _ in range(iterations - 2):
      tt = 0.5 * (3 * eye - z @ y)
      y = y @ tt
      z = tt @ z
    y = 0.5 * y @ (3 * eye - z @ y)  # iteration K: Y only
  return torch.sqrt(t) * y


def power_normalize(m: torch.Tensor, eps: float) -> torch.Tensor:
  """Signed cube root `sign(m) ((|m| + eps)^(1/3) - eps^(1/3))`; finite gradient at 0."""
  return torch.sign(m) * ((m.abs() + eps) ** (1.0 / 3.0) - eps ** (1.0 / 3.0))


class MomentHead(nn.Module):
  """Second-order moment head (docs/math.md) in PyTorch: graph propagation,
  square-rooted covariance, optional third-order sketch, then
  Linear -> BatchNorm1d -> GELU -> Dropout (-> Linear).

  Args:
    d_in: token width `D`.
    d_out: output width.
    use_third_order: append the Tensor Sketch of the third moment.
    isqrt_iterations: Newton–Schulz steps `K >= 1`.
    sketch_dim: sketch length (used with the third order).
    eps: ridge of the moment, degree floor and power-normalisation offset (> 0).
    mlp: "single" (Linear, BatchNorm1d, GELU, Dropout) or "double" (and a
      second Linear d_out -> d_out as `mlp.4`).
    dropout_rate: dropout probability, in [0, 1).
    sketch_seed: seed of the sketch hashes (`numpy.random.default_rng`).
    checkpoint_isqrt: recompute the square root in the backward pass
      (`torch.utils.checkpoint`, non-reentrant; training only).
    d_reduce: optional width of a Linear (`reduce`) applied to the tokens
      before the moment; the peer of the Linen head's `d_reduce`.

  Inputs: tokens `[batch, tokens, d_in]`, optional graph `[tokens, tokens]`
  or `[batch, tokens, tokens]`, optional mask `[batch, tokens]` bool
  (`False` marks padding). Output `[batch, d_out]`.
  """

  # Buffers (set in __init__), typed for the type checker.
  triu_flat: torch.Tensor
  sketch_h: torch.Tensor
  sketch_s: torch.Tensor

  def __init__(
    self,
    d_in: int,
    d_out: int = 512,
    use_third_order: bool = False,
    isqrt_iterations: int = 3,
    sketch_dim: int = 1024,
    eps: float = 1e-5,
    mlp: Mlp = "single",
    dropout_rate: float = 0.1,
    sketch_seed: int = 0,
    checkpoint_isqrt: bool = False,
    d_reduce: int | None = None,
  ):
    super().__init__()
    check_int("d_in", d_in)
    HeadConfig(
      d_out=d_out,
      use_third_order=use_third_order,
      isqrt_iterations=isqrt_iterations,
      sketch_dim=sketch_dim,
      eps=eps,
      mlp=mlp,
      dropout_rate=dropout_rate,
      sketch_seed=sketch_seed,
      d_reduce=d_reduce,
    ).validate()
    self.d_in, self.d_out, self.d_reduce = d_in, d_out, d_reduce
    self.use_third_order, self.isqrt_iterations = use_third_order, isqrt_iterations
    self.sketch_dim, self.sketch_seed, self.eps = sketch_dim, sketch_seed, eps
    self.mlp_kind, self.checkpoint_isqrt = mlp, checkpoint_isqrt

    width = d_in if d_reduce is None else d_reduce
    if d_reduce is not None:
      self.reduce = nn.Linear(d_in, d_reduce)
    # Built once; non-persistent buffers follow .to(device) and stay out of
    # the state_dict.
    rows, cols = torch.triu_indices(width, width)
    self.register_buffer("triu_flat", rows * width + cols, persistent=False)
    if use_third_order:
      h, s = sketch_hashes(width, sketch_dim, sketch_seed)
      self.register_buffer(
        "sketch_h", torch.tensor(np.array(h), dtype=torch.long), persistent=False
      )
      self.register_buffer("sketch_s", torch.tensor(np.array(s)), persistent=False)

    layers: list[nn.Module] = [
      nn.Linear(feature_size(width, use_third_order, sketch_dim), d_out),
      nn.BatchNorm1d(d_out),  # eps 1e-5, momentum 0.1
      nn.GELU(),  # exact (erf)
      nn.Dropout(dropout_rate),
    ]
    if mlp == "double":
      layers.append(nn.Linear(d_out, d_out))
    self.mlp = nn.Sequential(*layers)

  @classmethod
  def from_preset(cls, name: str, d_in: int, **overrides: Any) -> "MomentHead":
    """A head configured as preset `name` (docs/math.md section 8), with overrides."""
    return cls(d_in, **{**presets.preset(name), **overrides})

  def extra_repr(self) -> str:
    return (
      f"d_in={self.d_in}, d_out={self.d_out}, use_third_order={self.use_third_order}, "
      f"isqrt_iterations={self.isqrt_iterations}, sketch_dim={self.sketch_dim}, "
      f"eps={self.eps}, mlp={self.mlp_kind!r}, sketch_seed={self.sketch_seed}, "
      f"checkpoint_isqrt={self.checkpoint_isqrt}, d_reduce={self.d_reduce}"
    )

  def load_state_dict(
    self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
  ):
    """`nn.Module.load_state_dict`, also accepting NumPy arrays as values
    (as `moment_jax.convert.flax_to_torch` returns by default)."""
    state_dict = {
      k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
      for k, v in state_dict.items()
    }
    return super().load_state_dict(state_dict, strict=strict, assign=assign)

  def _check_inputs(
    self, tokens: torch.Tensor, graph: torch.Tensor | None, mask: torch.Tensor | None
  ) -> None:
    if tokens.dim() != 3 or tokens.shape[-1] != self.d_in:
      raise ValueError(
        f"tokens: expected shape [batch, tokens, {self.d_in}], got {tuple(tokens.shape)}"
      )
    if not tokens.is_floating_point():
      raise ValueError(f"tokens: expected a floating dtype, got {tokens.dtype}")
    b, n, _ = tokens.shape
    if graph is not None and tuple(graph.shape) not in ((n, n), (b, n, n)):
      raise ValueError(
        f"graph: expected shape ({n}, {n}) or ({b}, {n}, {n}), got {tuple(graph.shape)}"
      )
    if mask is not None and tuple(mask.shape) != (b, n):
      raise ValueError(f"mask: expected shape ({b}, {n}), got {tuple(mask.shape)}")

  def _sketch(self, hc: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """docs/math.md section 6: `[batch, tokens, dim]` centred tokens -> `[batch, sketch_dim]`."""
    # FFTs in at least float32 (also under bf16 autocast).
    hc = hc.to(torch.promote_types(hc.dtype, torch.float32))
    spectrum = None
    for h, s in zip(self.sketch_h, self.sketch_s):
      c = hc.new_zeros(*hc.shape[:-1], self.sketch_dim).index_add_(-1, h, hc * s.to(hc.dtype))
      f = torch.fft.rfft(c, dim=-1)
      spectrum = f if spectrum is None else spectrum * f
    ts = torch.fft.irfft(spectrum, n=self.sketch_dim, dim=-1)  # [batch, tokens, sketch]
    # Padding rows of hc are zero, so their sketch is zero: a plain sum is right.
    m3 = ts.sum(1) / n.to(ts.dtype)[:, None]
    return power_normalize(m3, self.eps)

  def _sqrt(self, m2: torch.Tensor) -> torch.Tensor:
    if self.checkpoint_isqrt and self.training and torch.is_grad_enabled():
      return checkpoint(newton_schulz_sqrt, m2, self.isqrt_iterations, use_reentrant=False)
    return newton_schulz_sqrt(m2, self.isqrt_iterations)

  def features(
    self, tokens: torch.Tensor, graph: torch.Tensor | None = None, mask: torch.Tensor | None = None
  ) -> torch.Tensor:
    """docs/math.md sections 1-6 (after the optional `reduce`).

    `[batch, tokens, d_in]` -> `[batch, F]`.
    """
    self._check_inputs(tokens, graph, mask)
    h = tokens if self.d_reduce is None else self.reduce(tokens)
    b, n_tok, d = h.shape
    m = None if mask is None else mask.to(h.dtype)
    if graph is not None:
      graph = graph.to(h.dtype)
      if m is not None:  # padding takes no part in the degrees
        graph = graph * m[:, :, None] * m[:, None, :]
      deg = graph.sum(-1)  # a row sum, never a matmul with ones
      dinv = torch.rsqrt(deg.clamp(min=self.eps))
      h = (dinv[..., :, None] * graph * dinv[..., None, :]) @ h
    if m is None:
      n = torch.full((b,), float(n_tok), device=h.device, dtype=h.dtype)
      hc = h - h.mean(1, keepdim=True)
    else:
      n = m.sum(-1).clamp(min=1)  # an all-padding sample gets M2 = eps * I
      mu = (h * m[..., None]).sum(1) / n[:, None]
      hc = (h - mu[:, None, :]) * m[..., None]
    eye = torch.eye(d, device=h.device, dtype=hc.dtype)
    m2 = hc.transpose(1, 2) @ hc / n[:, None, None].to(hc.dtype) + self.eps * eye
    s = self._sqrt(m2)
    f = s.reshape(b, d * d)[:, self.triu_flat]
    if self.use_third_order:
      f = torch.cat([f, self._sketch(hc, n).to(f.dtype)], dim=-1)
    return f

  def forward(
    self, tokens: torch.Tensor, graph: torch.Tensor | None = None, mask: torch.Tensor | None = None
  ) -> torch.Tensor:
    """`[batch, tokens, d_in]` (graph `[tokens, tokens]` or `[batch, tokens,
    tokens]`, mask `[batch, tokens]`) -> `[batch, d_out]`."""
    return self.mlp(self.features(tokens, graph, mask))
