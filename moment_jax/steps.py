"""Training-step builders shared by the CLI, the memory tools and benchmarks.

Models never import this module; it imports the model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ["count_params", "make_fit_step", "make_grad_step", "make_loss", "variable_shapes"]


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


def make_fit_step(
  head: Any,
  tx: Any,
  graph: Any = None,
  batch_sharding: Any = None,
  token_grads: bool = False,
) -> Callable[..., Any]:
  """`(state, tokens, targets, key) -> (state, loss[, d_tokens])`: one optimizer
  step on the mean-square distance of the training-mode output to `targets`.

  `state` is `{"params", "batch_stats", "opt_state"}`, `tx` an optax
  transformation, `key` draws the dropout. `batch_sharding` constrains the
  tokens (the batch split over the data axis); with `token_grads` the step
  also returns the tokens' gradient, as when a backbone trains below the head.
  Used by the sharding benchmarks and tests.
  """

  def loss_fn(params, tokens, batch_stats, targets, key):
    if batch_sharding is not None:
      tokens = jax.lax.with_sharding_constraint(tokens, batch_sharding)
    out, updates = head.apply(
      {"params": params, "batch_stats": batch_stats},
      tokens,
      graph,
      train=True,
      rngs={"dropout": key},
      mutable=["batch_stats"],
    )
    loss = jnp.mean(jnp.square(out.astype(jnp.float32) - targets))
    return loss, updates["batch_stats"]

  argnums = (0, 1) if token_grads else 0

  def step(state, tokens, targets, key):
    (loss, stats), grads = jax.value_and_grad(loss_fn, argnums, has_aux=True)(
      state["params"], tokens, state["batch_stats"], targets, key
    )
    d_params, d_tokens = grads if token_grads else (grads, None)
    updates, opt_state = tx.update(d_params, state["opt_state"], state["params"])
    new = dict(
      params=optax.apply_updates(state["params"], updates), batch_stats=stats, opt_state=opt_state
    )
    return (new, loss, d_tokens) if token_grads else (new, loss)

  return step
