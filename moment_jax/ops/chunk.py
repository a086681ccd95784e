"""Running a per-sample function over the batch a few samples at a time."""

from __future__ import annotations

from typing import Callable

import jax

from moment_jax.ops import _checks

__all__ = ["map_samples"]


def check_chunk(chunk: int | None) -> None:
  """Validates `isqrt_chunk` (None or a static int >= 1)."""
  _checks.check_int("isqrt_chunk", chunk, allow_none=True)


def map_samples(
  fn: Callable[..., jax.Array],
  chunk: int,
  tokens: jax.Array,
  graph: jax.Array | None,
  mask: jax.Array | None,
) -> jax.Array:
  """`fn(tokens, graph, mask)` on `chunk` samples at a time (`lax.map`).

  `fn` takes a batch `[b, tokens, dim]` (with the matching graph and mask)
  and returns `[b, ...]`. A shared `[tokens, tokens]` graph is closed over,
  not sliced. The workspace of `fn` is that of `chunk` samples whatever the
  batch; pair it with `jax.checkpoint` on `fn` to bound the residuals too.
  """
  shared = graph is not None and graph.ndim == 2
  xs = (tokens, None if shared else graph, mask)

  def one(x):
    t, g, m = x
    g = graph if shared else (None if g is None else g[None])
    return fn(t[None], g, None if m is None else m[None])[0]

  return jax.lax.map(one, xs, batch_size=chunk)
