"""moment_jax.sharding with examples/digits.py: a sharded training step on 8
simulated CPU devices gives the single-device step's numbers, and each device
holds its slice of the head's projection kernel and of its Adam moments."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moment_jax import sharding as shd

WORKER = pathlib.Path(__file__).resolve().parent / "sharding_worker.py"

# Leaves whose exact gradient is zero: a bias before BatchNorm (which removes
# any per-feature shift) and the attention key bias (softmax ignores a
# constant added to every logit of a query). Their computed gradient is
# rounding noise, which Adam normalises (m / sqrt(v)) to steps of about +-lr,
# so a different summation order moves them by O(lr): bounded, not compared.
ZERO_GRAD = ("moment/proj/bias", "block0/MultiHeadDotProductAttention_0/key/bias")


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_sharded_step_matches_single_device(report, mesh):
  r = report["meshes"][mesh]
  assert report["devices"] == 8
  # Loss: the batch is split over "data", so sums are reordered: float32
  # rounding, 1e-6 relative.
  np.testing.assert_allclose(r["losses"], report["ref_losses"], rtol=1e-6)
  # Parameters after two AdamW steps: reordered sums again; 1e-6 absolute plus
  # 1e-5 of the leaf's scale (the tiny model's parameters are O(0.1-1)).
  for path, (diff, scale) in r["params"].items():
    if path in ZERO_GRAD:
      assert diff <= 2 * report["lr"] * 2, (path, diff)  # two steps of at most ~lr
      continue
    assert diff <= 1e-6 + 1e-5 * scale, (path, diff, scale)
  for path, (diff, scale) in r["batch_stats"].items():
    assert diff <= 1e-7 + 1e-6 * scale, (path, diff, scale)
  # Adam's moments are linear (mu) and quadratic (nu) in the gradients; the
  # noise floor is set by the largest entry of each, not by the leaf.
  for name in ("mu", "nu"):
    floor = max(scale for _, scale in r[name].values())
    for path, (diff, scale) in r[name].items():
      assert diff <= 1e-6 * floor + 1e-5 * scale, (name, path, diff, scale)
  # The leaves exempted above really have (numerically) zero gradients.
  mu_floor = max(scale for _, scale in r["mu"].values())
  for path in ZERO_GRAD:
    assert r["mu"][path][1] < 1e-4 * mu_floor, (path, r["mu"][path], mu_floor)


@pytest.mark.parametrize("mesh", ["2x4", "1x8"])
def test_each_device_holds_a_slice_of_the_kernel(report, mesh):
  data, model = shd.parse_mesh(mesh)
  r = report["meshes"][mesh]
  f, d_out = r["kernel_shape"]
  for name in ("kernel", "mu", "nu"):  # the kernel and its Adam moments
    assert r["shards"][name] == [[f, d_out // model]] * 8, (name, r["shards"][name])
  assert r["shards"]["embed"] == [[2, 2, 1, 16]] * 8  # replicated: other weights whole
  assert r["shards"]["batch"] == [[32 // data, 8, 8, 1]] * 8
  assert "not divisible" in r["indivisible"], r["indivisible"]


def test_rules_and_errors():
  tree = {"params": {"moment": {"proj": {"kernel": np.zeros((6, 8)), "bias": np.zeros(8)}}},
          "opt": ({"mu": {"moment": {"proj": {"kernel": np.zeros((6, 8))}}}},)}
  specs = shd.partition_specs(tree, shd.HEAD_RULES)
  assert specs["params"]["moment"]["proj"] == {"kernel": P(None, "model"), "bias": P()}
  assert specs["opt"][0]["mu"]["moment"]["proj"]["kernel"] == P(None, "model")
  assert shd.parse_mesh("2x4") == (2, 4)
  for bad in ("8", "0x8", "2x"):
    with pytest.raises(ValueError, match="mesh"):
      shd.parse_mesh(bad)
  with pytest.raises(ValueError, match="needs 64 devices"):
    shd.make_mesh(8, 8)
  mesh = shd.make_mesh(1, 1)
  shd.tree_shardings(tree, mesh)  # a 1-device "model" axis divides anything
  with pytest.raises(ValueError, match="more entries"):
    shd.tree_shardings({"proj": {"kernel": np.zeros(3)}}, mesh)
