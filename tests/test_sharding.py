"""moment_jax.sharding: sharded training steps on 8 simulated CPU devices give
the single-device step's numbers, each device holds its slice of the head's
projection kernel and of its Adam moments, and the "rows" layout moves the
features, not the kernel's gradient (tests/sharding_worker.py runs them)."""

import fcntl
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


def _worker(*args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=600, env=env
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _once(factory: pytest.TempPathFactory, *args: str) -> dict:
  """`_worker(*args)`, run once per test session: under xdist each worker would
  run a module fixture itself (a minute of both CPU cores for the layouts), so
  the first writes the result to the run's shared temp folder, under a lock that
  keeps the others waiting for it. (`--dist loadgroup` would keep the module on
  one worker, but with pytest 9.2 it no longer groups: pytest-xdist issue 1386.)"""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return _worker(*args)
  root = factory.getbasetemp().parent  # this run's folder, shared by its workers
  path = root / f"sharding_{'_'.join(args) or 'report'}.json"
  with open(path.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not path.is_file():
      path.write_text(json.dumps(_worker(*args)))
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  return _once(tmp_path_factory)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  return _once(tmp_path_factory, "layouts")


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
  tree = {
    "params": {"moment": {"proj": {"kernel": np.zeros((6, 8)), "bias": np.zeros(8)}}},
    "opt": ({"mu": {"moment": {"proj": {"kernel": np.zeros((6, 8))}}}},),
  }
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


def test_head_rules():
  kernel = {"params": {"proj": {"kernel": np.zeros((16, 8))}}}
  for layout, spec in (
    ("replicated", P()),
    ("columns", P(None, "model")),
    ("rows", P("data", "model")),
  ):
    rules = shd.head_rules(layout)
    assert shd.partition_specs(kernel, rules)["params"]["proj"]["kernel"] == spec, layout
    assert dict(rules.logical)["batch"] == "data"
  # the NNX state's path ends in "/value"; the columns rules are HEAD_RULES
  nnx_path = {"0": {"mu": {"proj": {"kernel": {"value": np.zeros((16, 8))}}}}}
  assert shd.partition_specs(nnx_path, shd.head_rules("rows"))["0"]["mu"]["proj"]["kernel"][
    "value"
  ] == P("data", "model")
  assert shd.head_rules("columns").params == shd.HEAD_RULES
  with pytest.raises(ValueError, match="layout"):
    shd.head_rules("diagonal")


def test_collectives_reader():
  hlo = """HloModule m, entry_computation_layout={()->f32[]}

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ar = f32[8,4]{1,0} all-reduce(%x), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %ar)
}

ENTRY %main.1 (a: f32[8,4]) -> f32[] {
  %a = f32[8,4]{1,0} parameter(0)
  %ag = f32[32,4]{1,0} all-gather(%a), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %rs = f32[2,4]{1,0} reduce-scatter(%a), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}
  %a2a = (bf16[8,4]{1,0}, bf16[8,4]{1,0}) all-to-all(%b, %c), channel_id=4, replica_groups={{0,1}}
  %w = (s32[], f32[8,4]{1,0}) while(%i), condition=%c, body=%body, TRIPS
  ROOT %r = f32[] constant(0)
}
""".replace("TRIPS", 'backend_config={"known_trip_count":{"n":"5"}}')
  ops = {op.kind: op for op in shd.collectives(hlo, 8)}
  ar, ag, rs, a2a = (ops[k] for k in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all"))
  assert (ar.bytes, ar.group, ar.count) == (128, 4, 5)  # in a loop of 5
  assert (ag.bytes, ag.group, ag.count) == (512, 4, 1)  # iota groups [2, 4]: 4 devices
  assert (rs.bytes, rs.group) == (128, 4)  # the array before scattering
  assert (a2a.bytes, a2a.group) == (128, 2)
  # ring: all-reduce 2 (n-1)/n, the others (n-1)/n of the array
  assert shd.wire_bytes(list(ops.values())) == pytest.approx(
    5 * 2 * 3 / 4 * 128 + 3 / 4 * 512 + 3 / 4 * 128 + 1 / 2 * 128
  )


# Leaves whose exact gradient is zero in the tiny head: the projection bias
# before BatchNorm (see ZERO_GRAD).
HEAD_ZERO_GRAD = ("proj/bias", "proj/bias/value")


def test_layouts_match_one_device(layouts):
  """Each layout's step (Linen and NNX; n = 1, 2, 4, 8 and 4x2, 2x4 meshes; whole
  batch and `isqrt_chunk`; float32 and bfloat16) gives the no-mesh step's
  numbers after 3 AdamW steps (lr 1e-2)."""
  assert layouts["devices"] == 8
  for name, r in layouts["cases"].items():
    if name.endswith("1x1"):  # one device: the layout changes nothing
      assert r["losses"] == r["ref_losses"], name
      assert all(d == 0 for d, _ in r["params"].values()), name
      continue
    # Losses: means over 128 outputs of products summed over F = 136 terms,
    # split n ways and reordered: float32 rounding, 2e-6 relative (~16 ulp).
    # bfloat16 compares with bfloat16: the features move as raw bits, only
    # float32 sums reorder, so the same bound holds.
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=2e-6, err_msg=name)
    for path, (diff, scale) in r["params"].items():
      if path in HEAD_ZERO_GRAD:
        assert diff <= 2 * 1e-2 * 3, (name, path, diff)  # three steps of at most ~lr
        continue
      assert diff <= 1e-6 + 1e-5 * scale, (name, path, diff, scale)
    ((diff, scale),) = r["d_tokens"].values()  # the tokens' gradient: the features' cotangents
    assert diff <= 1e-5 * scale, (name, diff, scale)


def test_rows_keeps_kernel_rows_apart(layouts):
  for name, r in layouts["cases"].items():
    f, d_out = r["kernel_shape"]
    data, model = shd.parse_mesh(name.split()[2])
    rows = " rows " in f" {name} "
    want = [f // data if rows else f, d_out // model if rows else d_out]
    assert r["kernel_shards"] == [want] * (data * model), (name, r["kernel_shards"])


def test_rows_hlo_at_vit_b_scale(layouts):
  """Compiled (never run) AdamW step of the optimized preset at D=768, 64 samples
  per device on 8 devices (benchmarks/comm.py): no all-gather, all-reduce or
  reduce-scatter of the kernel's size (or 10% of it), <= 150 MB on the wire and
  <= 240 MB of parameters + AdamW state per device; plain data parallelism
  all-reduces the 605 MB gradient."""
  kernel = 295296 * 512 * 4
  base = layouts["hlo"]["linen replicated"]
  assert base["kernel_bytes"] == kernel
  assert base["largest_gather_bytes"] >= kernel  # the reader sees the gradient's all-reduce
  assert base["wire_bytes"] > 1000e6 and base["params_opt_bytes"] > 1800e6
  for api in ("linen", "nnx"):
    r = layouts["hlo"][f"{api} rows"]
    assert r["kernel_sized"] == [], (api, r["kernel_sized"])
    assert r["largest_gather_bytes"] < 0.01 * kernel, (api, r["largest_gather"])
    assert r["wire_bytes"] <= 150e6, (api, r["wire_bytes"])
    assert r["params_opt_bytes"] <= 240e6, (api, r["params_opt_bytes"])
    # what moves: the features forward, their cotangents backward
    assert r["collectives"]["all-to-all"]["bytes"] == 2 * 64 * 295296 * 4  # [64, F] f32, twice


def test_per_device_features(layouts):
  """`ops.project.per_device`: the third-order sketch's FFTs run per device (XLA
  all-gathers their batch otherwise) and give the same features."""
  r = layouts["per_device"]
  assert r["plain"]["gathers"] > 0  # what it avoids
  assert r["per_device"]["gathers"] == 0
  # Against the whole batch on one device: float32 rounding (1e-6 of the
  # scale) in the square root's triangle; the sketch's signed cube root
  # (|m| + eps)^(1/3) multiplies rounding in m by up to eps^(-2/3) / 3 ~ 700
  # (eps = 1e-5), hence 1e-4 there.
  assert r["diff_plain"] <= 1e-6 * r["scale"], r
  assert r["diff_triangle"] <= 1e-6 * r["scale"], r
  assert r["diff_sketch"] <= 1e-4, r
