"""The JAX head against the PyTorch design (moment_jax.torch_reference), same weights.

Weights go torch -> Flax through `moment_jax.convert`; BatchNorm running
statistics are set to random values on the scale of the batch's projections
(so the normalised outputs are O(1) and stay sensitive to the features).

Errors are relative and norm-wise: `max_i ||a_i - b_i|| / ||b_i||` over the
samples for outputs, `||a - b|| / ||b||` over the whole array for gradients.
Tolerances (float32 on both sides, highest matmul precision):
  * outputs 1e-5 (the spec's guarantee, docs/math.md): both sides are float32 evaluations of
    the same formula; measured ~1e-6, the sum of two ~5e-7 errors against
    float64;
  * gradients 1e-4: the backward of the Newton–Schulz iteration and of
    BatchNorm (training mode) take differences of O(1) terms, so float32
    round-off reaches a few 1e-6 relative; 1e-4 leaves room for other BLAS.
The third order is compared where every Tensor Sketch bucket is reached
(`D^3 / sketch_dim >= 8`); see `test_sparse_sketch_is_float32_noise` for
why sparse sketches cannot meet 1e-5 in float32, in either framework.
"""

import copy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference as ref  # noqa: E402

from moment_jax import PRESET_NAMES, MomentHead, grid_graph, moment_features  # noqa: E402
from moment_jax.convert import torch_to_flax  # noqa: E402
from moment_jax.torch_reference import MomentHead as TorchHead  # noqa: E402

torch.set_float32_matmul_precision("highest")

OUT_RTOL = 1e-5
GRAD_RTOL = 1e-4
B = 4
# sketch_dim with D^3 / sketch_dim >= 8 at D=8 and D=16 (every bucket reached).
SMALL_SKETCH = {8: 64, 16: 256}


def rel_rows(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(b, side, d, seed=0):
  """tokens `[b, side^2, d]`, the grid graph, a mask with padding in sample 1."""
  n = side * side
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  mask = np.ones((b, n), bool)
  mask[1, -(n // 3) :] = False
  return x, grid_graph(side, side), mask


def t(a):
  return None if a is None else torch.as_tensor(a)


def randomize(th, x, graph=None, mask=None, seed=0):
  """Random BatchNorm affine and running statistics on the scale of the projections."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    y = th.mlp[0](th.features(t(x), t(graph), t(mask)))
    mean, std = y.mean(0), y.std(0) + 1e-6
    rnd = lambda: torch.randn(y.shape[1:], generator=gen)
    uni = lambda: torch.rand(y.shape[1:], generator=gen)
    bn = th.mlp[1]
    bn.running_mean.copy_(mean + 0.5 * std * rnd())
    bn.running_var.copy_(std**2 * (0.5 + 1.5 * uni()))
    bn.weight.copy_(0.5 + uni())
    bn.bias.copy_(0.3 * rnd())
  return th


def pair(name, d, x, graph=None, mask=None, *, seed=0, **overrides):
  """A PyTorch head with random weights and the JAX head with the same weights."""
  torch.manual_seed(seed)
  th = TorchHead.from_preset(name, d, **overrides)
  randomize(th, x, graph, mask, seed)
  head = MomentHead.from_preset(name, precision="highest", **overrides)
  return th, head, torch_to_flax(th.state_dict(), head)


def torch_eval(th, x, graph=None, mask=None):
  with torch.no_grad():
    return th.eval()(t(x), t(graph), t(mask)).numpy()


def jax_eval(head, variables, x, graph=None, mask=None):
  return np.asarray(head.apply(variables, x, graph, mask, train=False))


GRAPH_MASK = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("graph_mask", GRAPH_MASK, ids=["plain", "graph", "mask", "graph+mask"])
@pytest.mark.parametrize("d,side", [(8, 3), (16, 4)])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_eval_parity_small(name, d, side, graph_mask):
  x, g, m = inputs(B, side, d)
  g, m = (g if graph_mask[0] else None), (m if graph_mask[1] else None)
  th, head, v = pair(name, d, x, g, m, sketch_dim=SMALL_SKETCH[d])
  err = rel_rows(jax_eval(head, v, x, g, m), torch_eval(th, x, g, m))
  assert err < OUT_RTOL, err


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_eval_parity_real_presets(name):
  """The presets' own sketch_dim, d_out and K at D=32 (sketch buckets all reached)."""
  x, g, m = inputs(B, 4, 32, seed=1)
  th, head, v = pair(name, 32, x, g, m, seed=1)
  assert th.mlp[0].weight.shape[0] == head.d_out
  for gg, mm in [(None, None), (g, m)]:
    err = rel_rows(jax_eval(head, v, x, gg, mm), torch_eval(th, x, gg, mm))
    assert err < OUT_RTOL, err


def test_eval_parity_batched_graph_and_d_reduce():
  """A per-sample graph `[batch, tokens, tokens]` (random weights) and `d_reduce`."""
  x, _, m = inputs(B, 4, 16, seed=2)
  g = np.random.default_rng(2).uniform(size=(B, 16, 16)).astype(np.float32)
  th, head, v = pair("performance", 16, x, g, m, d_reduce=12, sketch_dim=128)
  assert "reduce" in v["params"]
  err = rel_rows(jax_eval(head, v, x, g, m), torch_eval(th, x, g, m))
  assert err < OUT_RTOL, err


def test_parity_check_can_fail():
  """The comparison sees a one-step change of K or another sketch seed."""
  x, g, m = inputs(B, 4, 16)
  th, head, v = pair("performance", 16, x, g, m, sketch_dim=256)
  ref_out = torch_eval(th, x, g, m)
  assert rel_rows(jax_eval(head, v, x, g, m), ref_out) < OUT_RTOL
  for wrong in (head.clone(isqrt_iterations=2), head.clone(sketch_seed=1)):
    assert rel_rows(jax_eval(wrong, v, x, g, m), ref_out) > 100 * OUT_RTOL


def test_sparse_sketch_is_float32_noise():
  """Why the third order is compared with `D^3 / sketch_dim >= 8`.

  With few channels and a long sketch, some buckets of the Tensor Sketch
  receive no product at all: exactly 0 in exact arithmetic, float32 FFT
  round-off (~1e-7 of the largest entry) in practice. The power
  normalisation's slope at 0, `1 / (3 eps^(2/3))` ~ 700, turns that into
  feature errors of ~1e-5 relative, in JAX and in PyTorch alike: each is as
  far from float64 as from the other, so 1e-5 parity is not a property of
  float32 here. The second-order features are unaffected.
  """
  d, sketch = 16, 4096  # the 'original' preset's sketch at D=16: 1 product per bucket
  x, g, m = inputs(B, 4, d)
  th = TorchHead(d, use_third_order=True, sketch_dim=sketch)
  with torch.no_grad():
    f_torch = th.features(t(x), t(g), t(m)).numpy()
  f_jax = moment_features(
    jnp.asarray(x), g, m, use_third_order=True, sketch_dim=sketch, precision="highest"
  )
  f64 = ref.moment_features(x, g, m, use_third_order=True, sketch_dim=sketch)
  tri = d * (d + 1) // 2
  assert rel(f_jax[:, :tri], f64[:, :tri]) < 1e-6
  assert rel(f_torch[:, :tri], f64[:, :tri]) < 1e-6
  e_jax, e_torch = rel(f_jax[:, tri:], f64[:, tri:]), rel(f_torch[:, tri:], f64[:, tri:])
  assert 1e-6 < e_jax < 1e-4 and 1e-6 < e_torch < 1e-4, (e_jax, e_torch)
  assert rel(f_jax[:, tri:], f_torch[:, tri:]) < 3 * max(e_jax, e_torch)


def train_step_torch(th, x, graph, mask, cot):
  th.train()
  xt = torch.tensor(x, requires_grad=True)
  out = th(xt, t(graph), t(mask))
  (out * torch.as_tensor(cot)).sum().backward()
  return (
    out.detach().numpy(),
    xt.grad.numpy(),
    th.mlp[0].weight.grad.numpy().T,
    th.mlp[1].running_mean.numpy(),
    th.mlp[1].running_var.numpy(),
  )


def train_step_jax(head, v, x, graph, mask, cot):
  def loss(params, x):
    out, upd = head.apply(
      {"params": params, "batch_stats": v["batch_stats"]},
      x,
      graph,
      mask,
      train=True,
      rngs={"dropout": jax.random.key(0)},
      mutable=["batch_stats"],
    )
    return jnp.sum(out * cot), (out, upd)

  (g_params, g_x), (out, upd) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
    v["params"], jnp.asarray(x)
  )
  stats = upd["batch_stats"]["norm"]
  return (
    np.asarray(out),
    np.asarray(g_x),
    np.asarray(g_params["proj"]["kernel"]),
    np.asarray(stats["mean"]),
    np.asarray(stats["var"]),
  )


def torch_float64_token_grad(th, x, graph, mask, cot):
  """The token gradient of a training step of `th` in float64: an oracle."""
  th64 = copy.deepcopy(th).double().train()
  xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  g = None if graph is None else torch.tensor(graph, dtype=torch.float64)
  (th64(xt, g, t(mask)) * torch.tensor(cot, dtype=torch.float64)).sum().backward()
  return xt.grad.numpy()


@pytest.mark.parametrize("graph_mask", [(False, False), (True, True)], ids=["plain", "graph+mask"])
@pytest.mark.parametrize("name", ["original", "optimized", "memory", "performance"])
def test_train_parity(name, graph_mask):
  """Training mode, dropout 0: outputs and running means (1e-5), token and
  projection gradients (1e-4); running variances in `test_running_var_factor`.

  Token gradients through the third order are compared at 5e-3, and each
  framework to a float64 oracle at 3e-3: the signed cube root's slope,
  `(|m3| + eps)^(-2/3) / 3`, weights most the sketch buckets whose `m3` is
  smallest, and there an FFT output's round-off (relative to its largest
  entry) is largest. Both frameworks measure 1e-4 to 1.5e-3 against float64
  (8 seeds), so no float32 port can promise 1e-4 on these.
  """
  b, d = 6, 16
  x, g, m = inputs(b, 4, d, seed=3)
  g, m = (g if graph_mask[0] else None), (m if graph_mask[1] else None)
  th, head, v = pair(name, d, x, g, m, seed=3, dropout_rate=0.0, sketch_dim=SMALL_SKETCH[d])
  cot = np.random.default_rng(4).normal(size=(b, head.d_out)).astype(np.float32)
  g64 = torch_float64_token_grad(th, x, g, m, cot)
  out_t, gx_t, gk_t, mean_t, _ = train_step_torch(th, x, g, m, cot)
  out_j, gx_j, gk_j, mean_j, _ = train_step_jax(head, v, x, g, m, cot)
  assert rel_rows(out_j, out_t) < OUT_RTOL
  assert rel(mean_j, mean_t) < OUT_RTOL
  assert rel(gk_j, gk_t) < GRAD_RTOL
  if head.use_third_order:
    assert rel(gx_j, gx_t) < 5e-3
    assert rel(gx_j, g64) < 3e-3 and rel(gx_t, g64) < 3e-3
  else:
    assert rel(gx_j, gx_t) < GRAD_RTOL
    assert rel(gx_j, g64) < GRAD_RTOL
  if m is not None:  # padding tokens get no gradient in either
    assert not np.any(gx_t[~m]) and not np.any(gx_j[~m])


def test_checkpoint_isqrt_parity():
  """`checkpoint_isqrt` (torch.utils.checkpoint) changes no number; it matches
  the JAX head's `remat_policy="isqrt"`."""
  x, g, m = inputs(B, 4, 16, seed=5)
  th, head, v = pair("optimized", 16, x, g, m, seed=5, dropout_rate=0.0)
  cot = np.random.default_rng(5).normal(size=(B, head.d_out)).astype(np.float32)
  state = {k: c.clone() for k, c in th.state_dict().items()}
  plain = train_step_torch(th, x, g, m, cot)
  th_ckpt = TorchHead.from_preset("optimized", 16, dropout_rate=0.0, checkpoint_isqrt=True)
  th_ckpt.load_state_dict(state)
  ckpt = train_step_torch(th_ckpt, x, g, m, cot)
  for a, b in zip(plain, ckpt):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  jx = train_step_jax(head.clone(remat_policy="isqrt"), v, x, g, m, cot)
  assert rel_rows(jx[0], ckpt[0]) < OUT_RTOL and rel(jx[1], ckpt[1]) < GRAD_RTOL


def test_running_var_factor():
  """PyTorch's running_var takes the unbiased batch variance, Flax's the biased
  one: after one step from the same state (momentum 0.1 in both),
  `(rv_torch - 0.9 rv0) / (rv_flax - 0.9 rv0) = n / (n - 1)`, n the batch."""
  b, d = 5, 8
  x, g, _ = inputs(b, 3, d, seed=6)
  th, head, v = pair("optimized", d, x, g, seed=6, dropout_rate=0.0)
  rv0 = th.mlp[1].running_var.clone().numpy()
  cot = np.zeros((b, head.d_out), np.float32)
  *_, mean_t, var_t = train_step_torch(th, x, g, None, cot)
  *_, mean_j, var_j = train_step_jax(head, v, x, g, None, cot)
  assert rel(mean_j, mean_t) < OUT_RTOL
  ratio = (var_t.astype(np.float64) - 0.9 * rv0) / (var_j.astype(np.float64) - 0.9 * rv0)
  # The increments are 0.1 var_batch ~ 0.1 rv0: the subtraction keeps ~1e-6.
  np.testing.assert_allclose(ratio, b / (b - 1), rtol=1e-4)


def test_optimized_d768_parity():
  """The optimized preset at full width: B=2, N=196 (14x14 grid graph), D=768,
  F=295,296; evaluation outputs (1e-5) and token gradients (1e-4)."""
  b, side, d = 2, 14, 768
  x, g, m = inputs(b, side, d, seed=7)
  th, head, v = pair("optimized", d, x, g, m, seed=7)
  chex.assert_shape(v["params"]["proj"]["kernel"], (295296, 512))
  th.eval().requires_grad_(False)  # token gradients only: no 605 MB weight gradient
  cot = np.random.default_rng(8).normal(size=(b, 512)).astype(np.float32)
  for gg, mm in [(g, None), (g, m)]:
    xt = torch.tensor(x, requires_grad=True)
    out_t = th(xt, t(gg), t(mm))
    (out_t * torch.as_tensor(cot)).sum().backward()
    out_j, vjp = jax.vjp(lambda x: head.apply(v, x, gg, mm, train=False), jnp.asarray(x))
    (gx_j,) = vjp(jnp.asarray(cot))
    assert rel_rows(out_j, out_t.detach().numpy()) < OUT_RTOL
    assert rel(gx_j, xt.grad.numpy()) < GRAD_RTOL


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(d_in=0), "d_in: expected an int >= 1, got 0"),
    (dict(d_in=8, d_out=0), "d_out: expected an int >= 1, got 0"),
    (dict(d_in=8, isqrt_iterations=0), "isqrt_iterations: expected an int >= 1, got 0"),
    (dict(d_in=8, use_third_order=True, sketch_dim=0), "sketch_dim: expected an int >= 1, got 0"),
    (dict(d_in=8, mlp="triple"), "mlp: expected one of single, double, got 'triple'"),
    (dict(d_in=8, dropout_rate=1.0), r"dropout_rate: expected a value in \[0, 1\), got 1.0"),
    (dict(d_in=8, eps=0.0), "eps: expected a float > 0, got 0.0"),
    (dict(d_in=8, d_reduce=0), "d_reduce: expected None or an int >= 1, got 0"),
  ],
)
def test_torch_head_rejects_bad_config(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TorchHead(**kwargs)


def test_torch_head_rejects_bad_inputs_and_follows_presets():
  th = TorchHead.from_preset("original", 8, sketch_dim=32)
  assert (th.d_out, th.isqrt_iterations, th.sketch_dim, th.mlp_kind) == (1024, 5, 32, "double")
  assert isinstance(th.mlp[4], torch.nn.Linear) and th.mlp[3].p == 0.1
  x = torch.zeros(2, 9, 8)
  with pytest.raises(
    ValueError, match=r"tokens: expected shape \[batch, tokens, 8\], got \(2, 9, 7\)"
  ):
    th(torch.zeros(2, 9, 7))
  with pytest.raises(
    ValueError, match=r"graph: expected shape \(9, 9\) or \(2, 9, 9\), got \(8, 8\)"
  ):
    th(x, torch.zeros(8, 8))
  with pytest.raises(ValueError, match=r"mask: expected shape \(2, 9\), got \(9,\)"):
    th(x, None, torch.ones(9, dtype=torch.bool))
  with pytest.raises(ValueError, match="preset: unknown name 'huge'"):
    TorchHead.from_preset("huge", 8)
