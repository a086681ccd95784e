"""Training-step builders shared by the CLI, the memory tools and benchmarks.

Models never import this module; it imports the model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["count_params", "make_grad_step", "make_loss", "variable_shapes"]


def make_loss(head: Any, graph: Any = None) -> Callable[..., Any]:
  """`loss(params, batch_stats, tokens, key) -> (loss, new_batch_stats)`.

  A training-mode forward (batch statistics, dropout from `key`) with a
  mean-square loss on the output: a stand-in for any loss on the head.
  """

  def loss(params, batch_stats, tokens, key):
    out, updates = head.apply(
      {"params": params, "batch_stats": batch_stats},
      tokens,
      graph,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    return jnp.mean(jnp.square(out.astype(jnp.float32))), updates["batch_stats"]

  return loss


def make_grad_step(head: Any, graph: Any = None, token_grad: bool = True) -> Callable[..., Any]:
  """Jitted `(params, batch_stats, tokens, key) -> ((loss, stats), grads)`.

  `grads` is `(d_params, d_tokens)` with `token_grad` (a backbone below the
  head), else `d_params` alone.
  """
  argnums = (0, 2) if token_grad else 0
  return jax.jit(jax.value_and_grad(make_loss(head, graph), argnums=argnums, has_aux=True))


def variable_shapes(
  head: Any, tokens_shape: tuple[int, ...], graph: Any = None, dtype: Any = jnp.float32
) -> Any:
  """Shapes of the head's variables via `jax.eval_shape` (nothing allocated)."""
  tokens = jax.ShapeDtypeStruct(tokens_shape, dtype)
  return jax.eval_shape(lambda t: head.init(jax.random.key(0), t, graph, train=False), tokens)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or shape structs."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))
