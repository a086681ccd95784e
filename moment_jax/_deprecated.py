"""Old names that still resolve, with a `DeprecationWarning` naming the new one."""

from __future__ import annotations

import warnings
from typing import Any, Callable


def module_getattr(module: str, old: dict[str, tuple[Callable[[], Any], str]]) -> Any:
  """A module `__getattr__` serving `old[name] = (make_value, replacement)`."""

  def __getattr__(name: str) -> Any:
    if name not in old:
      raise AttributeError(f"module {module!r} has no attribute {name!r}")
    make, instead = old[name]
    warnings.warn(f"{module}.{name} is deprecated; use {instead}", DeprecationWarning, stacklevel=2)
    return make()

  return __getattr__
