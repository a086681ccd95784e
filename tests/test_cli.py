"""The `moment-jax` command at small sizes (the full size is in README's report)."""

import json
import subprocess
import sys

from moment_jax import cli


def test_report_small(tmp_path, capsys):
  path = tmp_path / "r.json"
  assert (
    cli.main(["report", "--batch", "2", "--tokens", "16", "--dim", "8", "--json", str(path)]) == 0
  )
  out = capsys.readouterr().out
  for name in ("original", "optimized", "balanced", "memory", "performance"):
    assert name in out
  rows = json.loads(path.read_text())["rows"]
  assert [r["preset"] for r in rows] == [
    "original",
    "optimized",
    "balanced",
    "memory",
    "performance",
  ]
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
  r = subprocess.run(
    [sys.executable, "-m", "moment_jax", "report", "--preset", "nope"],
    capture_output=True,
    text=True,
  )
  assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
  assert cli.main(["report", "--batch", "0"]) == 2


def test_every_option_has_help_with_its_default_and_choices():
  import argparse

  from moment_jax import NAMED_POLICIES, PRESET_NAMES

  sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
  assert set(sub.choices) == {"report", "memory", "convert"}
  for name, parser in sub.choices.items():
    text = parser.format_help()
    formatter = parser._get_formatter()
    for action in parser._actions:
      if isinstance(action, argparse._HelpAction):
        continue
      assert action.help, (name, action.dest)
      if action.option_strings:  # the formatter appends the default unless the help states it
        assert "(default:" in formatter._get_help_string(action), (name, action.dest)
      if action.choices:
        assert all(c in action.help for c in action.choices), (name, action.dest)
    assert "(default: 4)" in text or name == "convert"
  policy = next(a for a in sub.choices["memory"]._actions if a.dest == "policy")
  assert all(p in policy.help for p in NAMED_POLICIES) and "key=value" in policy.help
  assert all(p in sub.choices["convert"].format_help() for p in PRESET_NAMES)


def test_bad_option_values_name_the_option(capsys):
  assert cli.main(["memory", "--policy", "float64"]) == 2
  assert "argument --policy: policy: unknown name 'float64'" in capsys.readouterr().err
  assert cli.main(["memory", "--remat", "sometimes"]) == 2
  assert "argument --remat: remat_policy: unknown policy 'sometimes'" in capsys.readouterr().err
  assert cli.main(["report", "--tokens", "-3"]) == 2
  assert "argument --tokens: expected an int >= 1, got '-3'" in capsys.readouterr().err
