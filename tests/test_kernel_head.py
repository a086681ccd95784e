"""The heads with `use_kernels=True` (the Pallas projection, interpreted on CPU)
against the XLA path: outputs and gradients, every preset and policy, both heads."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import head_grads, random_tokens

from moment_jax import PRESET_NAMES, HeadConfig, MomentHead, grid_graph
from moment_jax.nnx import MomentHead as NNXHead
from moment_jax.nnx import linen_to_nnx

B, N, D = 3, 9, 6
SMALL = dict(d_out=8, sketch_dim=16)
tokens = functools.partial(random_tokens, shape=(B, N, D))

# Under float32 the kernel and XLA paths run the same forward (XLA's gather and
# product) and differ in the backward's summation order only: float32
# round-off, 1e-5 of the largest entry. Under bfloat16 the kernel path's
# products also take bf16 operands (the kernel and the output's cotangent
# rounded in registers; the XLA path multiplies by the float32 kernel), which
# moves these tiny heads (BatchNorm over 3 samples) by up to ~8 bf16 units of
# the largest entry: 2^-4 (16 units). The bfloat16 policy itself sits 3 to
# 670 units away from float32 here. The op alone is checked tightly against
# float64 in test_kernels.py.
TOL = {"float32": 1e-5, "bfloat16": 2**-4}


def has_pallas(fn, *args):
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def close(got, want, tol, scale=None):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    s = scale or float(jnp.max(jnp.abs(w))) or 1.0
    np.testing.assert_allclose(
      np.asarray(g, np.float64), np.asarray(w, np.float64), rtol=0, atol=tol * s
    )


def close_grads(got, want, tol):
  """`head_grads` results; the projection's bias gradient is zero up to round-off
  (BatchNorm follows), so it is compared at the scale of the kernel's."""
  (out, (dp, dx)), (out_w, (dp_w, dx_w)) = got, want
  dp, dp_w = dict(dp), dict(dp_w)
  proj, proj_w = dict(dp.pop("proj")), dict(dp_w.pop("proj"))
  close((out, dp, dx, proj["kernel"]), (out_w, dp_w, dx_w, proj_w["kernel"]), tol)
  close(proj["bias"], proj_w["bias"], tol, scale=float(jnp.max(jnp.abs(proj_w["kernel"]))))


@pytest.mark.parametrize("policy", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_linen_kernel_path_matches_xla(name, policy):
  x, g = tokens(1), grid_graph(3, 3)
  mask = np.ones((B, N), bool)
  mask[2, -3:] = False
  xla = MomentHead.from_preset(name, policy=policy, use_kernels=False, dropout_rate=0.0, **SMALL)
  pallas = xla.clone(use_kernels=True)
  v = xla.init(jax.random.key(0), x, g, mask, train=False)
  want = head_grads(xla, v, x, g, mask)
  got = head_grads(pallas, v, x, g, mask)
  close_grads(got, want, TOL[policy])
  # and the kernel really ran (in the backward), and did not without the switch
  f = lambda h: lambda p, t: h.apply({**v, "params": p}, t, g, mask, train=False).sum()
  assert has_pallas(jax.grad(f(pallas), argnums=(0, 1)), v["params"], x)
  assert not has_pallas(jax.grad(f(xla), argnums=(0, 1)), v["params"], x)


@pytest.mark.parametrize("name", ["optimized", "original"])
def test_nnx_kernel_path_matches_linen(name):
  x, g = tokens(2), grid_graph(3, 3)
  linen = MomentHead.from_preset(name, dropout_rate=0.0, **SMALL)
  v = linen.init(jax.random.key(0), x, g, train=False)
  model = linen_to_nnx(v, NNXHead(D, linen.config, use_kernels=True, rngs=nnx.Rngs(0)))
  model.eval()
  loss = lambda m, t: jnp.sum(m(t, g) ** 2)
  got = nnx.grad(loss, argnums=(0, 1))(model, x)
  want = jax.grad(
    lambda p, t: jnp.sum(linen.apply({**v, "params": p}, t, g, train=False) ** 2), argnums=(0, 1)
  )(v["params"], x)
  close(got[1], want[1], TOL["float32"])
  close(nnx.to_pure_dict(nnx.state(got[0], nnx.Param)), want[0], TOL["float32"])


def test_auto_is_off_on_cpu_and_with_chunks():
  assert jax.default_backend() == "cpu"
  assert not HeadConfig().kernel_path(768)  # None: only on a single GPU
  assert HeadConfig(use_kernels=True).kernel_path(768)
  assert not HeadConfig(use_kernels=True, isqrt_chunk=2).kernel_path(768)  # chunks: XLA
  with pytest.raises(ValueError, match=r"use_kernels: expected None, True or False, got 'yes'"):
    HeadConfig(use_kernels="yes").validate()


def test_chunked_head_ignores_the_kernel():
  x = tokens(3)
  head = MomentHead.from_preset("optimized", use_kernels=True, isqrt_chunk=2, **SMALL)
  v = head.init(jax.random.key(0), x, train=False)
  f = lambda p: jnp.sum(head.apply({**v, "params": p}, x, train=False))
  assert not has_pallas(jax.grad(f), v["params"])
  chex.assert_trees_all_close(
    head.apply(v, x, train=False),
    head.clone(isqrt_chunk=None, use_kernels=False).apply(v, x, train=False),
    rtol=1e-5,
    atol=1e-6,
  )


def test_auto_rule_on_one_gpu(monkeypatch):
  """What "auto" (use_kernels=None) picks on one GPU, with the backend faked."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert HeadConfig(policy="bfloat16").kernel_path(768)
  assert HeadConfig(policy="tf32").kernel_path(768)
  assert not HeadConfig(policy="float32").kernel_path(768)  # HIGHEST stays on XLA
  assert not HeadConfig(policy="bfloat16").kernel_path(2048)  # the kernels' offset limit
  assert not HeadConfig(policy="bfloat16", use_kernels=False).kernel_path(768)
  assert not HeadConfig(policy="bfloat16", isqrt_chunk=4).kernel_path(768)
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  assert not HeadConfig(policy="bfloat16").kernel_path(768)  # several devices: opt in only
