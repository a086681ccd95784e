"""The examples check their optional dependencies before any training."""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_digits_example():
  spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while it loads
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize(
  "missing,args",
  [
    ("matplotlib", []),
    ("sklearn", ["--out", ""]),
    ("orbax", ["--out", "", "--ckpt-dir", "unused"]),
  ],
)
def test_digits_names_missing_dependencies_before_training(monkeypatch, capsys, missing, args):
  digits = load_digits_example()
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name.split(".")[0] == missing else real(name, *a),
  )
  # Training never starts: loading the data or building a step would be a bug here.
  monkeypatch.setattr(digits, "load_digits", lambda: pytest.fail("trained without a dependency"))
  with pytest.raises(SystemExit) as e:
    digits.main(args)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "missing optional dependencies" in err and 'pip install -e ".[examples]"' in err
  assert missing in err or (missing == "orbax" and "orbax.checkpoint" in err)


def test_digits_default_figure_goes_to_the_ignored_out_dir(capsys):
  digits = load_digits_example()
  with pytest.raises(SystemExit):
    digits.main(["--help"])
  assert "(default: out/digits.png)" in " ".join(capsys.readouterr().out.split())
  assert "/out/" in (ROOT / ".gitignore").read_text().split()
