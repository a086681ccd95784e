"""The benchmark scripts run end to end at toy sizes on CPU (their numbers
come from GPU runs; here only that they work and check what they claim)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses or many examples: CI runs them; -m "not slow" skips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path, devices=1):
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
  )
  proc = subprocess.run(
    [sys.executable, *args, "--out", str(tmp_path)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_multigpu_on_simulated_devices(tmp_path):
  out = _run(
    [
      "benchmarks/multigpu.py",
      "--dim",
      "8",
      "--tokens",
      "4",
      "--batch-per-device",
      "2",
      "--presets",
      "memory",
      "--devices",
      "1",
      "2",
      "4",
      "--steps",
      "1",
      "--warmup",
      "1",
      "--check-steps",
      "2",
    ],
    tmp_path,
    devices=4,
  )
  assert "loss check: pass (0 failed, 0 unchecked" in out
  rows = {r["mesh"]: r for r in json.load(open(tmp_path / "multigpu.json"))["rows"]}
  assert set(rows) == {"1x1", "2x1", "1x2", "4x1", "1x4", "2x2"}
  # the kernel and its Adam moments are split over "model": 1/model of them per device
  for mesh, r in rows.items():
    assert r["kernel_share"] == 1 / r["model"], mesh
  assert (
    rows["1x4"]["params_opt_bytes"]
    < rows["1x2"]["params_opt_bytes"]
    < (rows["1x1"]["params_opt_bytes"])
  )


def test_accuracy_smoke(tmp_path):
  out = _run(
    [
      "benchmarks/accuracy.py",
      "--families",
      "lowrank",
      "--dim",
      "16",
      "--tokens",
      "4",
      "--batch",
      "2",
      "--iterations",
      "1",
      "3",
      "--scan",
    ],
    tmp_path,
  )
  assert "tf32: skipped" in out
  data = json.load(open(tmp_path / "accuracy.json"))
  assert {(r["family"], r["policy"], r["normalization"]) for r in data["table"]} == {
    ("lowrank", p, n) for p in ("float32", "bfloat16") for n in ("trace", "frobenius")
  }
  # more iterations get closer to the exact root in float32
  for r in data["table"]:
    if r["policy"] == "float32":
      assert r["errors"]["3"] < r["errors"]["1"]


_NCU_CSV = "\n".join(
  [
    "a line the profiled program printed",
    '==PROF== Profiling "triu_project_fwd": 0%....50%....100% - 18 passes',
    '"ID","Process ID","Kernel Name","Block Size","Grid Size","Section Name",'
    '"Metric Name","Metric Unit","Metric Value","Rule Name"',
    '"0","7","triu_project_fwd","(128, 1, 1)","(4, 1, 132)","SOL","Duration","us","297.57",""',
    '"0","7","triu_project_fwd","(128, 1, 1)","(4, 1, 132)","SOL","DRAM Throughput","%","69.33",""',
    '"0","7","triu_project_fwd","(128, 1, 1)","(4, 1, 132)","SOL","Memory Throughput",'
    '"%","69.33",""',
    '"0","7","triu_project_fwd","(128, 1, 1)","(4, 1, 132)","Mem","Memory Throughput",'
    '"byte/s","2,320,500,000,000",""',
    '"1","7","triu_project_bwd_adamw","(128, 1, 1)","(4614, 1, 1)","SOL","Duration","ms","1.29",""',
    '"1","7","triu_project_bwd_adamw","(128, 1, 1)","(4614, 1, 1)","Launch",'
    '"Dynamic Shared Memory Per Block","byte/block","90,112",""',
    '"1","7","triu_project_bwd_adamw","(128, 1, 1)","(4614, 1, 1)","Mem",'
    '"Local Memory Spilling Requests","","1,661,040",""',
    '"1","7","triu_project_bwd_adamw","(128, 1, 1)","(4614, 1, 1)","Mem",'
    '"Local Memory Spilling Request Overhead","%","no data",""',
    '"2","7","triu_project_fwd","(128, 1, 1)","(4, 1, 132)","SOL","Duration","ns","290100",""',
  ]
)


def test_kernel_ncu_parses_and_labels_ncu_csv():
  from benchmarks import kernel_ncu

  rows = kernel_ncu.label(kernel_ncu.parse(_NCU_CSV))
  assert [r["kernel"] for r in rows] == ["triu_project_fwd", "triu_project_bwd_adamw"] + [
    "triu_project_fwd"
  ]
  fwd, fused, fwd2 = rows
  # units normalised: us, TB/s (the "%" row of the same name is not a rate), KB
  assert fwd["duration_us"] == pytest.approx(297.57)
  assert fwd["dram_pct"] == pytest.approx(69.33)
  assert fwd["memory_TBps"] == pytest.approx(2.3205)
  assert fused["duration_us"] == pytest.approx(1290.0)
  assert fused["smem_KB"] == pytest.approx(90.112)
  assert fused["spill_requests"] == 1661040.0
  assert fwd2["duration_us"] == pytest.approx(290.1)
  # each call starts at the forward kernel
  assert [r["call"] for r in rows] == ["forward", "forward", "forward+backward"]
  assert kernel_ncu.parse("no csv here\n") == []


def test_kernel_ncu_worker_runs_at_toy_size(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "benchmarks/kernel_ncu.py", "--worker", "--batch", "3"]
  cmd += ["--dim", "12", "--d-out", "16"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


_HLO = """HloModule m

%fused_add (p0: f32[4,8], p1: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
}

ENTRY %main (a: f32[4,8], b: bf16[8,8]) -> (f32[4,8], bf16[8]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  %gemm_fusion_dot = f32[4,8]{1,0} fusion(%a, %b), kind=kCustom, calls=%g
  %loop_add_fusion = f32[4,8]{1,0} fusion(%a, /*index=1*/%gemm_fusion_dot), kind=kLoop, calls=%f
  %input_reduce_fusion = (bf16[8]{0}, f32[]) fusion(%b), kind=kInput, calls=%r
  ROOT %t = (f32[4,8]{1,0}, bf16[8]{0}) tuple(%loop_add_fusion, %input_reduce_fusion)
}
"""


def test_hlo_bytes_counts_each_fusions_operands_and_output():
  from benchmarks import hlo_bytes

  rows = {r["name"]: r for r in hlo_bytes.fusion_bytes(_HLO)}
  assert set(rows) == {"loop_add_fusion", "input_reduce_fusion"}  # not the GEMM fusion
  assert rows["loop_add_fusion"] == dict(
    name="loop_add_fusion", kind="kLoop", out_bytes=128, in_bytes=256
  )
  assert rows["input_reduce_fusion"]["out_bytes"] == 8 * 2 + 4  # a tuple: both arrays
  assert rows["input_reduce_fusion"]["in_bytes"] == 64 * 2
  with pytest.raises(ValueError, match="ENTRY"):
    hlo_bytes.fusion_bytes("HloModule m\n")
