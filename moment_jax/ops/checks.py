"""Input validation for the moment pipeline.

Shape checks run at trace time on static shapes, so a bad call fails with a
`ValueError` before anything reaches XLA. Value checks (signs, finiteness,
empty masks) need the data: on concrete arrays they raise `ValueError` at
once; on traced arrays they run as a host callback whose `ValueError` surfaces
as the runtime error of the jitted call.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_tokens(tokens: Any, name: str = "tokens") -> None:
  """Raises `ValueError` unless `tokens` is a floating `[batch, tokens, dim]` array."""
  shape = np.shape(tokens)
  if len(shape) != 3:
    raise ValueError(
        f"{name}: expected rank 3 [batch, tokens, dim], got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.floating):
    raise ValueError(
        f"{name}: expected a floating dtype, got {jnp.result_type(tokens)}")
  if shape[1] < 1 or shape[2] < 1:
    raise ValueError(
        f"{name}: expected at least one token and one channel, got shape {shape}")


def check_graph(graph: Any, batch: int, tokens: int) -> None:
  """Raises `ValueError` unless `graph` is `[tokens, tokens]` or `[batch, tokens, tokens]`."""
  shape = np.shape(graph)
  if shape not in ((tokens, tokens), (batch, tokens, tokens)):
    raise ValueError(
        f"graph: expected shape ({tokens}, {tokens}) or "
        f"({batch}, {tokens}, {tokens}) for tokens of shape "
        f"({batch}, {tokens}, ...), got {shape}")


def check_mask(mask: Any, batch: int, tokens: int) -> None:
  """Raises `ValueError` unless `mask` is `[batch, tokens]`."""
  shape = np.shape(mask)
  if shape != (batch, tokens):
    raise ValueError(
        f"mask: expected shape ({batch}, {tokens}), got {shape}")


def check_inputs(tokens: Any, graph: Any = None, mask: Any = None) -> None:
  """Shape checks of the pipeline's three inputs (static, trace-time)."""
  check_tokens(tokens)
  batch, n, _ = np.shape(tokens)
  if graph is not None:
    check_graph(graph, batch, n)
  if mask is not None:
    check_mask(mask, batch, n)


def check_call(tokens: Any, graph: Any = None, mask: Any = None,
               values: bool = False) -> None:
  """Everything checked on a call: shapes always; with `values` the opt-in
  value checks, else only the graph's signs when it is concrete."""
  check_inputs(tokens, graph, mask)
  if values:
    check_values(tokens, graph, mask)
  else:
    check_graph_weights(graph)


def _is_concrete(*xs: Any) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _value_errors(tokens, graph, mask) -> list[str]:
  """Host-side value checks on NumPy arrays; returns the error messages."""
  errors = []
  if tokens is not None and not np.all(np.isfinite(tokens)):
    bad = int(np.size(tokens) - np.count_nonzero(np.isfinite(tokens)))
    errors.append(f"tokens: expected finite values, found {bad} NaN/Inf entries")
  if graph is not None:
    g = np.asarray(graph)
    if np.any(g < 0):
      errors.append(
          f"graph: expected non-negative edge weights, found minimum {g.min()!r}")
    if not np.all(np.isfinite(g)):
      errors.append("graph: expected finite edge weights, found NaN/Inf")
  if mask is not None:
    empty = np.flatnonzero(~np.any(np.asarray(mask), axis=-1))
    if empty.size:
      errors.append(
          f"mask: every sample needs at least one valid (True) token; "
          f"rows {empty.tolist()[:8]} are all padding")
  return errors


def _raise_if(errors: list[str]) -> None:
  if errors:
    raise ValueError("; ".join(errors))


def check_graph_weights(graph: Any) -> None:
  """Raises `ValueError` for negative weights when `graph` is concrete.

  Cheap on host arrays; traced graphs are only checked by `check_values`.
  """
  if graph is not None and _is_concrete(graph):
    _raise_if(_value_errors(None, graph, None))


def check_values(tokens: Any, graph: Any = None, mask: Any = None) -> None:
  """Opt-in value checks: finite tokens, non-negative graph, no empty mask row.

  Concrete inputs raise `ValueError` here. Traced inputs are checked on the
  host when the computation runs, and the `ValueError` comes back as the
  call's runtime error (a device-to-host sync: keep it out of hot loops).
  """
  if _is_concrete(tokens, graph, mask):
    _raise_if(_value_errors(
        None if tokens is None else np.asarray(tokens),
        graph, mask))
    return

  def host_check(t, g, m):
    _raise_if(_value_errors(t, g, m))

  jax.debug.callback(host_check, tokens, graph, mask)
