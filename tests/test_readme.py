"""Every ```python block of README.md runs as written, top to bottom, in one namespace."""

import os
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text):
  """The bodies of the README's ```python fenced blocks, in order."""
  return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
  assert len(python_blocks(README.read_text())) >= 4


@pytest.mark.slow
def test_readme_snippets_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # snippets that write files write them here
  namespace = {"__name__": "__readme__"}
  for i, block in enumerate(python_blocks(README.read_text())):
    try:
      exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    except Exception as e:  # name the block that failed, with its first line
      first = block.strip().splitlines()[0]
      raise AssertionError(f"README python block {i} ({first!r}) failed: {e!r}") from e
  assert os.getcwd() == str(tmp_path)
