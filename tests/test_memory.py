"""Remat policies, chunking, the projection and the memory toolkit (CPU, deterministic).

Absolute GPU figures live in benchmarks/memory_gpu.py and docs/memory.md; here
only what compiled analysis and residual listings fix exactly.
"""

import dataclasses
import functools
import operator

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import head_grads, random_tokens

from moment_jax import MomentHead, grid_graph, memory, ops, steps
from moment_jax.linen import Projection
from moment_jax.ops.sqrtm import Z_ONLY_MAX_ITERATIONS
from moment_jax.remat import resolve_remat

B, N, D = 3, 9, 6
G = grid_graph(3, 3)


tokens = functools.partial(random_tokens, shape=(B, N, D))


def grads(head, v, x, mask=None):
  return head_grads(head, v, x, G, mask, key=1)


REMATS = [
  None,
  "isqrt",
  "features",
  "save_only_these_names:moment,sqrtm",
  "dots_saveable",
  "nothing_saveable",
]


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("remat", REMATS)
def test_remat_and_chunk_keep_outputs_and_grads(remat, chunk):
  base = MomentHead(
    d_out=8, use_third_order=True, sketch_dim=8, isqrt_iterations=4, precision="highest"
  )
  x = tokens()
  mask = jnp.ones((B, N), bool).at[0, -2:].set(False)
  v = base.init(jax.random.key(0), x, G, mask, train=False)
  head = dataclasses.replace(base, remat_policy=remat, isqrt_chunk=chunk)
  chex.assert_trees_all_equal(v, head.init(jax.random.key(0), x, G, mask, train=False))
  ref_out, ref_g = grads(base, v, x, mask)
  out, g = grads(head, v, x, mask)
  if chunk is None and remat in (None, "isqrt"):
    # the same operations in the same order: bit-identical
    chex.assert_trees_all_equal((out, g), (ref_out, ref_g))
  else:
    # recomputation and batching let XLA fuse and reduce in another order:
    # float32 round-off, 1e-5 of each tree's scale (the projection bias's
    # gradient is zero up to round-off: BatchNorm removes the mean)
    scale = lambda t: max(float(jnp.max(jnp.abs(l))) for l in jax.tree.leaves(t))
    chex.assert_trees_all_close(out, ref_out, rtol=1e-5, atol=1e-5 * scale(ref_out))
    chex.assert_trees_all_close(g, ref_g, rtol=1e-5, atol=1e-5 * scale(ref_g))


def test_resolve_remat():
  assert resolve_remat(None) == (False, None)
  assert resolve_remat("isqrt") == (True, None)
  assert resolve_remat("features")[0] is True
  assert callable(resolve_remat("save_only_these_names:moment")[1])
  policy = jax.checkpoint_policies.everything_saveable
  assert resolve_remat(policy) == (False, policy)
  with pytest.raises(ValueError, match=r"unknown checkpoint names \['momnet'\]"):
    resolve_remat("save_only_these_names:momnet")
  with pytest.raises(ValueError, match=r"'dots_saveable' takes no names"):
    resolve_remat("dots_saveable:moment")


def _sqrt_residuals(k, remat_body, b=2, d=8):
  fn = lambda m: ops.sqrtm_newton_schulz(m, k, remat_body=remat_body)
  return memory.residual_bytes(fn, jax.ShapeDtypeStruct((b, d, d), jnp.float32))


def test_checkpointed_loop_keeps_its_state_per_iteration():
  b, d = 2, 8
  per_matrix = b * d * d * 4
  z_only = range(3, Z_ONLY_MAX_ITERATIONS + 1)
  coupled = range(Z_ONLY_MAX_ITERATIONS + 1, Z_ONLY_MAX_ITERATIONS + 5)
  assert set(np.diff([_sqrt_residuals(k, True) for k in z_only])) == {per_matrix}  # Z
  assert set(np.diff([_sqrt_residuals(k, True) for k in coupled])) == {2 * per_matrix}  # Y, Z
  for ks in (z_only, coupled):  # without remat: the three products' operands
    assert set(np.diff([_sqrt_residuals(k, False) for k in ks])) == {3 * per_matrix}


def _head_residuals(token_grad, shape=(4, 196, 768), **kw):
  head = MomentHead.from_preset("optimized", **kw)
  graph = grid_graph(14, 14) if shape[1] == 196 else None
  return memory.head_residual_bytes(head, shape, graph, token_grad)


def test_residuals_at_full_size():
  """Optimized preset, B=4, N=196, D=768: what each policy keeps for the backward."""
  d2 = 4 * 768 * 768 * 4  # one D x D float32 matrix per sample
  feats = 4 * 295296 * 4
  none, isqrt, features = (
    _head_residuals(True, remat_policy=p, isqrt_space="channel")
    for p in (None, "isqrt", "features")
  )
  assert none > 10 * d2  # the whole loop's matrices
  assert isqrt < 2.5 * d2 < none  # the moment (and its centred tokens), not the loop
  assert features < feats + d2 / 2  # the features for dW, nothing of the pipeline
  # the seed's scenario: tokens without gradient; only the features are kept
  assert _head_residuals(False, isqrt_space="channel") < feats + d2 / 4
  # On the Gram matrix (the default here) no D x D matrix is kept at all:
  # the features, the tokens' N x D maps and a few N x N iterates.
  token = [_head_residuals(True, remat_policy=p) for p in (None, "isqrt", "features")]
  assert token == [
    _head_residuals(True, remat_policy=p, isqrt_space="token") for p in (None, "isqrt", "features")
  ]
  assert token[0] < feats + 2.5 * d2 and token[0] < none / 4
  assert token[1] < feats + d2 / 2 and token[1] < isqrt / 2
  assert token[2] == features
  assert _head_residuals(False) == _head_residuals(False, isqrt_space="channel")


@pytest.mark.parametrize("space", ["channel", "token"])
def test_isqrt_residuals_do_not_grow_with_iterations(space):
  shape = (2, 16, 32)
  r = [
    _head_residuals(True, shape, remat_policy="isqrt", isqrt_iterations=k, isqrt_space=space)
    for k in (2, 5, 8)
  ]
  assert len(set(r)) == 1
  r = [_head_residuals(True, shape, isqrt_iterations=k, isqrt_space=space) for k in (2, 5, 8)]
  assert r[0] < r[1] < r[2]


def test_projection_is_dense_and_split_matmul_is_exact():
  x = jax.random.normal(jax.random.key(0), (3, 1 << 15))
  dense, proj = nn.Dense(5), Projection(5)
  vd = dense.init(jax.random.key(1), x)
  vp = proj.init(jax.random.key(1), x)
  chex.assert_trees_all_equal(vd, vp)
  assert ops.contraction_pieces(1 << 15) == 128 and ops.contraction_pieces(295296) == 128
  assert ops.contraction_pieces(1000) == 1
  w = vd["params"]["kernel"]
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  out = ops.split_matmul(x, w, precision="highest")
  # 32768-term sums in float32: round-off ~ sqrt(F) * 6e-8 relative
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(proj.apply(vp, x), dense.apply(vd, x), rtol=1e-4, atol=1e-5)


def test_compiled_memory_and_bill():
  head = MomentHead(d_out=8)
  shape = (4, N, D)
  opt = optax.adamw(1e-3)
  bill = memory.step_bill(head, shape, opt, G)
  shapes = steps.variable_shapes(head, shape, G)
  p = memory.nbytes(shapes["params"])
  assert p == 4 * (21 * 8 + 8 + 2 * 8)  # kernel, bias, BatchNorm scale and bias
  assert bill.params == bill.grads == p
  assert 2 * p <= bill.opt_state <= 2 * p + 64  # AdamW: mu, nu and a step count
  assert bill.inputs == 2 * 4 * N * D * 4
  assert bill.total == sum(dataclasses.asdict(bill).values())
  cm = memory.compiled_memory(lambda a: jnp.sin(a) @ a, jax.ShapeDtypeStruct((64, 64), jnp.float32))
  assert cm.argument == cm.output == 64 * 64 * 4


def test_train_step_keeps_no_second_weight_buffer():
  """Full size, compile only: the AdamW step's temp holds dW once, no copy of W."""
  head = MomentHead.from_preset("optimized")
  bill = memory.step_bill(head, (4, 196, 768), optax.adamw(1e-3), grid_graph(14, 14))
  weight = 295296 * 512 * 4
  assert weight < bill.activations < 1.2 * weight


def test_suggest_batch_size():
  head = MomentHead(d_out=8)
  opt = optax.sgd(1e-2)
  bill = lambda b: memory.step_bill(head, (b, N, D), opt, G).total
  assert memory.suggest_batch_size(head, (N, D), bill(5), opt, G) >= 5
  assert memory.suggest_batch_size(head, (N, D), bill(5) - 1, opt, G) < 5
  assert memory.suggest_batch_size(head, (N, D), 100, opt, G) == 0
  with pytest.raises(ValueError, match="budget_bytes"):
    memory.suggest_batch_size(head, (N, D), 0)


def test_device_peak_needs_a_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("measured in benchmarks/memory_gpu.py on GPU")
  with pytest.raises(RuntimeError, match="reports no memory_stats"):
    memory.device_peak(operator.neg, jax.ShapeDtypeStruct((4,), jnp.float32))


def test_memory_cli_small(tmp_path, capsys):
  from moment_jax import cli

  path = tmp_path / "m.json"
  assert (
    cli.main(
      [
        "memory",
        "--dim",
        "8",
        "--tokens",
        "16",
        "--batch",
        "2",
        "--preset",
        "memory",
        "--remat",
        "none",
        "features",
        "--policy",
        "bfloat16",
        "--chunk",
        "none",
        "1",
        "--json",
        str(path),
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  assert "tokens WITHOUT gradient" in out and "tokens WITH gradient" in out
  import json

  rows = json.loads(path.read_text())["rows"]
  assert len(rows) == 2 * 2 * 2  # remat x chunk x token gradients
  assert all(r["bill_mb"] > r["params_mb"] for r in rows)
