"""A float64 NumPy implementation of the spec (docs/math.md), written from it alone.

Tests compare moment_jax against these functions, never against itself.
"""

from __future__ import annotations

import numpy as np


def normalize_graph(graph, eps=1e-5, mask=None):
  g = np.asarray(graph, np.float64)
  if mask is not None:
    m = np.asarray(mask, np.float64)
    g = np.broadcast_to(g, (m.shape[0], *g.shape[-2:])) * m[:, :, None] * m[:, None, :]
  deg = g.sum(-1)
  dinv = 1.0 / np.sqrt(np.maximum(deg, eps))
  return dinv[..., :, None] * g * dinv[..., None, :]


def propagate(tokens, graph, eps=1e-5, mask=None):
  x = np.asarray(tokens, np.float64)
  if graph is None:
    return x
  a = normalize_graph(graph, eps, mask)
  return np.matmul(a, x)


def center(h, mask=None):
  h = np.asarray(h, np.float64)
  b, n, d = h.shape
  m = np.ones((b, n)) if mask is None else np.asarray(mask, np.float64)
  cnt = np.maximum(m.sum(-1), 1.0)
  mu = (h * m[..., None]).sum(1) / cnt[:, None]
  return (h - mu[:, None, :]) * m[..., None], cnt


def second_moment(h, mask=None, eps=1e-5):
  hc, cnt = center(h, mask)
  d = hc.shape[-1]
  return np.einsum("bnd,bne->bde", hc, hc) / cnt[:, None, None] + eps * np.eye(d)


def newton_schulz(m, k, normalization="trace"):
  """docs/math.md section 3, literally, in float64; "frobenius" divides by ||M||_F
  instead of tr(M) (and multiplies by its square root at the end)."""
  m = np.asarray(m, np.float64)
  eye = np.eye(m.shape[-1])
  if normalization == "trace":
    t = np.trace(m, axis1=-2, axis2=-1)[..., None, None]
  else:
    t = np.linalg.norm(m, axis=(-2, -1))[..., None, None]
  a = m / t
  if k == 1:
    y = 0.5 * a @ (3 * eye - a)
  else:
    tt = 0.5 * (3 * eye - a)
    y = a @ tt
    z = tt
    for _ in range(k - 2):
      tt = 0.5 * (3 * eye - z @ y)
      y = y @ tt
      z = tt @ z
    y = 0.5 * y @ (3 * eye - z @ y)
  return np.sqrt(t) * y


def sqrtm_eigh(m):
  w, v = np.linalg.eigh(np.asarray(m, np.float64))
  return (v * np.sqrt(np.maximum(w, 0))[..., None, :]) @ np.swapaxes(v, -1, -2)


def triu_vector(s):
  d = s.shape[-1]
  iu = np.triu_indices(d)
  return np.asarray(s)[..., iu[0], iu[1]]


def hashes(d, sketch_dim, seed=0):
  rng = np.random.default_rng(seed)
  hs, ss = [], []
  for _ in range(3):
    hs.append(rng.integers(0, sketch_dim, size=d))
    ss.append(2 * rng.integers(0, 2, size=d) - 1)
  return hs, ss


def tensor_sketch(hc, sketch_dim, seed=0, mask=None, eps=1e-5):
  hc = np.asarray(hc, np.float64)
  b, n, d = hc.shape
  hs, ss = hashes(d, sketch_dim, seed)
  spec = np.ones((b, n, sketch_dim // 2 + 1), np.complex128)
  for h, s in zip(hs, ss):
    c = np.zeros((b, n, sketch_dim))
    for j in range(d):  # the count sketch, one channel at a time
      c[..., h[j]] += s[j] * hc[..., j]
    spec = spec * np.fft.rfft(c, axis=-1)
  ts = np.fft.irfft(spec, n=sketch_dim, axis=-1)
  m = np.ones((b, n)) if mask is None else np.asarray(mask, np.float64)
  cnt = np.maximum(m.sum(-1), 1.0)
  m3 = (ts * m[..., None]).sum(1) / cnt[:, None]
  return np.sign(m3) * ((np.abs(m3) + eps) ** (1 / 3) - eps ** (1 / 3))


def moment_features(
  tokens,
  graph=None,
  mask=None,
  *,
  isqrt_iterations=3,
  use_third_order=False,
  sketch_dim=1024,
  sketch_seed=0,
  eps=1e-5,
):
  h = propagate(tokens, graph, eps, mask)
  m2 = second_moment(h, mask, eps)
  f = triu_vector(newton_schulz(m2, isqrt_iterations))
  if use_third_order:
    hc, _ = center(h, mask)
    f = np.concatenate([f, tensor_sketch(hc, sketch_dim, sketch_seed, mask, eps)], -1)
  return f


def gelu(x):
  from scipy.special import erf

  return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def head_eval(variables, tokens, graph=None, mask=None, *, mlp="single", **cfg):
  """Evaluation-mode head (running statistics, no dropout) in float64."""
  p, st = variables["params"], variables["batch_stats"]
  f = moment_features(tokens, graph, mask, **cfg)
  y = f @ np.asarray(p["proj"]["kernel"], np.float64) + np.asarray(p["proj"]["bias"])
  y = (y - st["norm"]["mean"]) / np.sqrt(np.asarray(st["norm"]["var"], np.float64) + 1e-5)
  y = y * p["norm"]["scale"] + p["norm"]["bias"]
  y = gelu(y)
  if mlp == "double":
    y = y @ np.asarray(p["out"]["kernel"], np.float64) + p["out"]["bias"]
  return y
