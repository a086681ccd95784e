"""Shared test helpers (not a reference: see reference.py for the float64 spec)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core


def head_grads(head, variables, tokens, graph=None, mask=None, key=0):
  """Training-mode output of `head` and the gradients of `sum(out**2)` with
  respect to its parameters and the tokens: `(out, (d_params, d_tokens))`."""

  def loss(params, t):
    out, _ = head.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      t,
      graph,
      mask,
      train=True,
      rngs={"dropout": jax.random.key(key)},
      mutable=["batch_stats"],
    )
    return jnp.sum(out**2), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
    variables["params"], tokens
  )
  return out, grads


def random_tokens(seed=0, shape=(4, 9, 8), scale=1.0):
  """Float32 standard-normal tokens `[batch, tokens, dim]`, times `scale`, from `seed`."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def equations(jaxpr):
  """Every equation of `jaxpr` and of its sub-jaxprs (pjit, custom rules, loops), depth first."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jex_core.jaxprs_in_params(eqn.params):
      yield from equations(sub)
