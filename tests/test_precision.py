"""Precision policies: parsing, names, casting, and the head's numbers under each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moment_jax import NAMED_POLICIES, MomentHead, Policy, get_policy, parse_policy


def test_parse_full_and_defaults():
  p = parse_policy("params=float32,compute=bfloat16,output=float32")
  assert p == Policy(jnp.float32, jnp.bfloat16, jnp.float32, jnp.float32, jax.lax.Precision.DEFAULT)
  p = parse_policy("params=bfloat16, moment=float32, matmul=highest")
  assert p.param_dtype == jnp.bfloat16 and p.compute_dtype == jnp.float32
  assert p.matmul == jax.lax.Precision.HIGHEST
  assert parse_policy("output=float32").matmul == jax.lax.Precision.HIGHEST


@pytest.mark.parametrize(
  "spec,match",
  [
    (
      "param=float32",
      r"unknown key 'param'.*valid keys are params, compute, output, moment, matmul",
    ),
    ("compute=int8", r"compute='int8' is not a floating dtype"),
    ("compute=float32,compute=bfloat16", r"given twice"),
    ("matmul=fast", r"matmul='fast' is unknown; valid values are default, tf32, high, highest"),
  ],
)
def test_parse_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    parse_policy(spec)


def test_named_and_unknown():
  assert set(NAMED_POLICIES) == {"float32", "tf32", "bfloat16", "bfloat16-sqrt32"}
  assert get_policy("bfloat16").moment_dtype == jnp.bfloat16
  assert get_policy("bfloat16-sqrt32").moment_dtype == jnp.float32
  with pytest.raises(ValueError, match=r"unknown name 'fp8'; valid names are float32, tf32"):
    get_policy("fp8")


def test_cast_touches_floating_leaves_only():
  tree = {"w": jnp.ones(2), "i": jnp.ones(2, jnp.int32), "k": None}
  out = get_policy("bfloat16").cast_to_compute(tree)
  assert out["w"].dtype == jnp.bfloat16 and out["i"].dtype == jnp.int32 and out["k"] is None


@pytest.mark.parametrize("name", list(NAMED_POLICIES))
def test_head_under_each_policy(name):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 9, 6)), jnp.float32)
  head = MomentHead(d_out=8, isqrt_iterations=3, policy=name)
  v = head.init(jax.random.key(0), x, train=False)
  pol = get_policy(name)
  assert jax.tree.leaves(v["params"])[0].dtype == pol.param_dtype
  out = head.apply(v, x, train=False)
  assert out.dtype == pol.output_dtype
  base = MomentHead(d_out=8, isqrt_iterations=3, policy="float32").apply(v, x, train=False)
  # bf16 has an 8-bit mantissa (2^-8 = 4e-3 per rounding); a few roundings
  # through the moment, the loop and the Dense stay within 5e-2 of float32.
  tol = 5e-2 if pol.compute_dtype == jnp.bfloat16 else 1e-5
  err = np.linalg.norm(np.asarray(out, np.float64) - base) / np.linalg.norm(base)
  assert err < tol, err
