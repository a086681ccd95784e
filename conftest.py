"""Doctest namespace: the names the docstring examples use without importing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
  import moment_jax
  from moment_jax import ops

  doctest_namespace.update(
    jax=jax, jnp=jnp, np=np, nnx=nnx, moment_jax=moment_jax, ops=ops, grid_graph=ops.grid_graph
  )
