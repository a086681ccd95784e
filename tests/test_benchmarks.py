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
