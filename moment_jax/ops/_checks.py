"""Input validation for the moment pipeline.

Shape checks run at trace time on static shapes, so a bad call fails with a
`ValueError` before anything reaches XLA. Value checks (signs, finiteness,
empty masks) need the data: on concrete arrays they raise `ValueError` at
once; on traced arrays they run as a host callback whose `ValueError` surfaces
as the runtime error of the jitted call.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def check_int(name: str, value: Any, low: int = 1, allow_none: bool = False) -> None:
  """Raises `ValueError` unless `value` is an int `>= low` (or None, if allowed).

  A bool is refused although it is an int: `d_out=True` is a mistake, not 1.
  """
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    none = "None or " if allow_none else ""
    raise ValueError(f"{name}: expected {none}an int >= {low}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
  """Raises `ValueError` unless `value` is one of `choices`, listing them."""
  choices = tuple(choices)
  if value not in choices:
    raise ValueError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def check_tokens(tokens: Any, name: str = "tokens") -> None:
  """Raises `ValueError` unless `tokens` is a floating `[batch, tokens, dim]` array."""
  shape = np.shape(tokens)
  if len(shape) != 3:
    raise ValueError(f"{name}: expected rank 3 [batch, tokens, dim], got shape {shape}")
  if not jnp.issubdtype(jnp.result_type(tokens), jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype, got {jnp.result_type(tokens)}")
  if shape[1] < 1 or shape[2] < 1:
    raise ValueError(f"{name}: expected at least one token and one channel, got shape {shape}")


def check_graph(graph: Any, batch: int, tokens: int) -> None:
  """Raises `ValueError` unless `graph` is `[tokens, tokens]` or `[batch, tokens, tokens]`."""
  shape = np.shape(graph)
  if shape not in ((tokens, tokens), (batch, tokens, tokens)):
    raise ValueError(
      f"graph: expected shape ({tokens}, {tokens}) or "
      f"({batch}, {tokens}, {tokens}) for tokens of shape "
      f"({batch}, {tokens}, ...), got {shape}"
    )


def check_mask(mask: Any, batch: int, tokens: int) -> None:
  """Raises `ValueError` unless `mask` is `[batch, tokens]`."""
  shape = np.shape(mask)
  if shape != (batch, tokens):
    raise ValueError(f"mask: expected shape ({batch}, {tokens}), got {shape}")


def check_inputs(tokens: Any, graph: Any = None, mask: Any = None) -> None:
  """Shape checks of the pipeline's three inputs (static, trace-time)."""
  check_tokens(tokens)
  batch, n, _ = np.shape(tokens)
  if graph is not None:
    check_graph(graph, batch, n)
  if mask is not None:
    check_mask(mask, batch, n)


CHECK_MODES = ("callback", "checkify")


def check_mode(values: bool | str | None) -> str | None:
  """`check_values` as a mode: None (off), "callback" (`True` too) or "checkify".

  * "callback": traced values are reduced on the device and checked on the
    host by `jax.debug.callback`; a failure is the jitted call's runtime
    error (a small device-to-host sync per check).
  * "checkify": `jax.experimental.checkify.check`s, no host sync; wrap the
    step in `checkify.checkify(step)` and call `err.throw()` (or inspect
    `err.get()`). Without the wrapper, jit refuses to trace the checks.
  """
  if values is None or values is False:
    return None
  if values is True:
    return "callback"
  if values in CHECK_MODES:
    return values
  raise ValueError(f"check_values: expected a bool, 'callback' or 'checkify', got {values!r}")


def check_call(
  tokens: Any, graph: Any = None, mask: Any = None, values: bool | str | None = False
) -> None:
  """Everything checked on a call: shapes always; with `values` (a
  `check_mode`) the opt-in value checks, else only the graph's signs when it
  is concrete."""
  check_inputs(tokens, graph, mask)
  mode = check_mode(values)
  if mode is not None:
    check_values(tokens, graph, mask, mode=mode)
  else:
    check_graph_weights(graph)


def _is_concrete(*xs: Any) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _value_stats(tokens, graph, mask, xp=jnp) -> dict[str, Any]:
  """Small reductions of the inputs that the value checks need."""
  stats = {}
  if tokens is not None:
    stats["tokens_bad"] = xp.sum(~xp.isfinite(tokens))
  if graph is not None:
    stats["graph_min"] = xp.min(xp.where(xp.isnan(graph), 0, graph))
    stats["graph_bad"] = xp.sum(~xp.isfinite(graph))
  if mask is not None:
    stats["mask_empty"] = ~xp.any(mask, axis=-1)
  return stats


_MESSAGES = {
  "tokens_bad": "tokens: expected finite values, found {} NaN/Inf entries",
  "graph_min": "graph: expected non-negative edge weights, found minimum {}",
  "graph_bad": "graph: expected finite edge weights, found {} NaN/Inf entries",
  "mask_empty": (
    "mask: every sample needs at least one valid (True) token; rows {} are all padding"
  ),
}


def _failed(key: str, value: Any) -> bool:
  return (
    bool(np.any(value))
    if key == "mask_empty"
    else (float(value) < 0 if key == "graph_min" else int(value) > 0)
  )


def _value_errors(stats: dict[str, Any]) -> list[str]:
  """Messages for the failed checks in `_value_stats` output (host values)."""
  errors = []
  for key, value in stats.items():
    value = np.asarray(value)
    if _failed(key, value):
      shown = np.flatnonzero(value).tolist()[:8] if key == "mask_empty" else value.item()
      errors.append(_MESSAGES[key].format(shown))
  return errors


def _raise_if(errors: list[str]) -> None:
  if errors:
    raise ValueError("; ".join(errors))


def check_graph_weights(graph: Any) -> None:
  """Raises `ValueError` for negative weights when `graph` is concrete.

  Cheap on host arrays; traced graphs are only checked by `check_values`.
  """
  if graph is not None and _is_concrete(graph):
    g = np.asarray(graph)
    _raise_if(_value_errors({"graph_min": np.min(np.where(np.isnan(g), 0, g))}))


def check_values(tokens: Any, graph: Any = None, mask: Any = None, mode: str = "callback") -> None:
  """Opt-in value checks: finite tokens, non-negative finite graph, no empty
  mask row.

  Concrete inputs raise `ValueError` here. Traced inputs are reduced on the
  device and checked when the computation runs, by `mode` (see `check_mode`).
  """
  if _is_concrete(tokens, graph, mask):
    _raise_if(
      _value_errors(
        _value_stats(
          None if tokens is None else np.asarray(tokens),
          None if graph is None else np.asarray(graph),
          None if mask is None else np.asarray(mask),
          xp=np,
        )
      )
    )
    return
  stats = _value_stats(tokens, graph, mask)
  if mode == "checkify":
    from jax.experimental import checkify

    for key, value in stats.items():
      ok = (
        ~jnp.any(value) if key == "mask_empty" else value >= 0 if key == "graph_min" else value == 0
      )
      arg = jnp.argmax(value) if key == "mask_empty" else value
      msg = _MESSAGES[key].replace("rows {}", "row {} and maybe others")
      checkify.check(ok, msg, arg)
    return
  jax.debug.callback(lambda st: _raise_if(_value_errors(st)), stats)


STAGES = {
  "propagation": "the graph-propagated tokens",
  "moment": "the second moment (the tokens' Gram matrix in token space)",
  "sqrtm": "the matrix square root",
  "features": "the moment features",
  "output": "the head's output",
}


def check_finite(x: jax.Array, stage: str, mode: str | None) -> jax.Array:
  """Checks that stage `stage` (a key of `STAGES`) produced finite values.

  Returns `x` unchanged; with `mode=None` nothing is added to the program.
  The message names the stage and the count of non-finite entries.
  """
  if mode is None:
    return x
  msg = f"{stage}: {{}} non-finite entries in {STAGES[stage]} (of {x.size} in this batch or chunk)"
  bad = jnp.sum(~jnp.isfinite(x))
  if mode == "checkify":
    from jax.experimental import checkify

    checkify.check(bad == 0, msg, bad)
  else:

    def host(b):
      if int(b):
        raise ValueError(msg.format(int(b)))

    jax.debug.callback(host, bad)
  return x
