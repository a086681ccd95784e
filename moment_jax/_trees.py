"""Flat views of variable trees and the one checker that compares them."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax


def key_str(key: Any) -> str:
  """One `tree_flatten_with_path` key as text (`DictKey`, `GetAttrKey`, index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat(tree: Any) -> dict[str, Any]:
  """`{"a/b/c": leaf}` for every leaf of `tree`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(key_str(k) for k in path): leaf for path, leaf in leaves}


def check_entries(
  header: str,
  found: Mapping[str, Any],
  expected: Mapping[str, Any],
  *,
  matches: Callable[[Any, Any], bool] = lambda want, got: want == got,
  show: Callable[[Any], str] = str,
  show_found: Callable[[Any], str] | None = None,
  show_unexpected: Callable[[Any], str] | None = None,
  optional: tuple[str, ...] = (),
) -> None:
  """Raises one `ValueError` naming every missing, unexpected or mismatched entry.

  Args:
    header: the message's first line (what was checked against what).
    found: `{key: description}` of what was given (a shape, or shape and dtype).
    expected: `{key: description}` of what is wanted.
    matches: `matches(want, got)` is True when an entry is right.
    show: formats an expected description for the message.
    show_found: formats a found description (default `show`).
    show_unexpected: formats an unexpected entry's description (default `show_found`).
    optional: expected keys that may be missing.
  """
  show_found = show_found or show
  show_unexpected = show_unexpected or show_found
  errors = []
  for key, want in expected.items():
    if key not in found:
      if key not in optional:
        errors.append(f"  missing {key}: expected {show(want)}")
    elif not matches(want, found[key]):
      errors.append(f"  {key}: expected {show(want)}, found {show_found(found[key])}")
  errors += [
    f"  unexpected {key}: found {show_unexpected(got)}"
    for key, got in found.items()
    if key not in expected
  ]
  if errors:
    raise ValueError(header + "\n" + "\n".join(errors))
