"""examples/digits.py: SIGKILL mid-run, restart, and end bit-identical to an
uninterrupted run; no half-written checkpoint survives."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses or many examples: CI runs them; -m "not slow" skips

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "digits.py"
# A tiny model and run: the test measures resumption, not learning.
TINY = [
  "--head",
  "moment",
  "--steps",
  "40",
  "--save-every",
  "10",
  "--eval-every",
  "10",
  "--width",
  "8",
  "--depth",
  "1",
  "--d-out",
  "8",
  "--batch-size",
  "32",
  "--no-progress",
  "--out",
  "",
]
KILL_AT = "checkpoint: saving step 30"  # SIGKILL while step 30 is being written
TIMEOUT = 120


def env(cache=None):
  """The runs' environment: one CPU device, unbuffered output and a shared
  compilation cache (the second and third runs load the first's executables
  instead of compiling: ~4 s each; the same program, so the same numbers)."""
  e = dict(
    os.environ,
    PYTHONUNBUFFERED="1",
    JAX_PLATFORMS="cpu",
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  if cache is not None:
    e["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  e.pop("XLA_FLAGS", None)
  return e


def run(args, cache):
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), *TINY, *args],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    env=env(cache),
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def tmp_dirs(directory):
  return [p.name for p in directory.glob("*") if ".orbax-checkpoint-tmp" in p.name]


def run_and_kill(args, steps_dir, cache):
  """Starts the script and SIGKILLs it while it writes step 30's checkpoint.

  On reading `KILL_AT` it polls `steps_dir` and kills as soon as orbax's
  temporary directory for the save appears (a save takes ~0.1 s), so the
  process dies with a half-written checkpoint on disk; if it never shows up
  within 5 s the process is killed anyway. Returns stdout and whether a
  temporary directory was seen.
  """
  proc = subprocess.Popen(
    [sys.executable, str(SCRIPT), *TINY, *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    env=env(cache),
    cwd=ROOT,
  )
  lines, seen = [], False
  try:
    for line in proc.stdout:
      lines.append(line)
      if line.strip() == KILL_AT:
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline and proc.poll() is None:
          seen = bool(tmp_dirs(steps_dir))
          time.sleep(2e-4)
        os.kill(proc.pid, signal.SIGKILL)
        break
  finally:
    proc.wait(timeout=TIMEOUT)
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL, f"not killed (rc={proc.returncode}): {lines}"
  return "".join(lines), seen


def load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
  import orbax.checkpoint as ocp

  cache = tmp_path / "jax_cache"
  reference = tmp_path / "reference.npz"
  run(["--save-final", str(reference)], cache)

  ckpt, final = tmp_path / "ckpt", tmp_path / "resumed.npz"
  args = ["--ckpt-dir", str(ckpt), "--save-final", str(final)]
  steps_dir = ckpt / "moment"
  out, seen = run_and_kill(args, steps_dir, cache)
  assert "checkpoint: saved step 20" in out and not final.exists()
  left = sorted(p.name for p in steps_dir.iterdir())
  # Typically ['10', '20', '30.orbax-checkpoint-tmp']: killed mid-write (`seen`).
  print(f"left after SIGKILL: {left} (temporary directory seen before the kill: {seen})")

  out = run(args, cache)
  resumed = [line for line in out.splitlines() if line.startswith("checkpoint: resumed")]
  # Step 30 was being written when the kill came: if its temporary directory
  # is still there, the restart must ignore it and resume from 20. Only a
  # save that was already committed and renamed may be resumed from.
  if any(".orbax-checkpoint-tmp" in name for name in left):
    assert resumed == ["checkpoint: resumed from step 20"], (left, out)
  else:
    assert resumed in (
      ["checkpoint: resumed from step 20"],
      ["checkpoint: resumed from step 30"],
    ), out

  want, got = load(reference), load(final)
  assert sorted(got) == sorted(want) and any("proj/kernel" in k for k in want)
  for k in want:
    assert want[k].dtype == got[k].dtype and np.array_equal(want[k], got[k]), k

  # Nothing half-written remains: only finalized, restorable step directories.
  names = sorted(p.name for p in steps_dir.iterdir())
  assert names == ["20", "30", "40"], names  # max_to_keep=3, no tmp directories
  with ocp.CheckpointManager(
    steps_dir, options=ocp.CheckpointManagerOptions(read_only=True)
  ) as mngr:
    assert mngr.all_steps() == [20, 30, 40]
    for step in mngr.all_steps():
      assert ocp.utils.is_checkpoint_finalized(steps_dir / str(step))
      restored = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(), history=ocp.args.JsonRestore()),
      )
      assert int(restored["state"]["step"]) == step
      assert restored["history"]["step"][-1] == step
    last = restored["state"]
  np.testing.assert_array_equal(
    np.asarray(last["params"]["moment"]["proj"]["kernel"]), want["moment/params/moment/proj/kernel"]
  )


def test_bad_flags_fail_cleanly():
  proc = subprocess.run(
    [sys.executable, str(SCRIPT), "--steps", "0"],
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
    env=env(),
    cwd=ROOT,
  )
  assert proc.returncode == 2 and "--steps" in proc.stderr
