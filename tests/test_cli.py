"""The `moment-jax` command at small sizes (the full size is in README's report)."""

import json
import subprocess
import sys

from moment_jax import cli


def test_report_small(tmp_path, capsys):
  path = tmp_path / "r.json"
  assert cli.main(["report", "--batch", "2", "--tokens", "16", "--dim", "8",
                   "--json", str(path)]) == 0
  out = capsys.readouterr().out
  for name in ("original", "optimized", "balanced", "memory", "performance"):
    assert name in out
  rows = json.loads(path.read_text())["rows"]
  assert [r["preset"] for r in rows] == ["original", "optimized", "balanced", "memory",
                                         "performance"]
  by = {r["preset"]: r for r in rows}
  assert by["optimized"]["features"] == 36 and by["original"]["features"] == 36 + 4096
  assert by["optimized"] == {**by["balanced"], "preset": "optimized"}
  assert all(r["step_temp_mb"] > 0 and r["loss"] >= 0 for r in rows)
  assert by["optimized"]["seed_mb"] == "91.18 / 56.84"


def test_report_compile_only_at_full_size(capsys):
  assert cli.main(["report", "--preset", "optimized", "--no-run"]) == 0
  out = capsys.readouterr().out
  assert "151,193,088" in out and "295,296" in out


def test_module_entry_point_and_bad_args():
  r = subprocess.run([sys.executable, "-m", "moment_jax", "report", "--preset", "nope"],
                     capture_output=True, text=True)
  assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
  assert cli.main(["report", "--batch", "0"]) == 2
