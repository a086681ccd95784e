"""Pure functions of the moment pipeline (docs/math.md sections 1-7)."""

from moment_jax import _deprecated
from moment_jax.ops._checks import check_inputs, check_values
from moment_jax.ops.chunk import map_samples
from moment_jax.ops.features import feature_size, moment_features
from moment_jax.ops.gram import gram_sqrtm, token_gram, use_token_space
from moment_jax.ops.graph import center_graph, grid_graph, normalize_graph, propagate
from moment_jax.ops.moment import center, centered_moment, second_moment, token_count
from moment_jax.ops.project import contraction_pieces, project, project_chunked, split_matmul
from moment_jax.ops.sketch import count_sketch, power_normalize, sketch_hashes, tensor_sketch_moment
from moment_jax.ops.sqrtm import (
  coupled_step,
  matrix_sqrt,
  newton_schulz_step,
  sqrtm_eigh,
  sqrtm_newton_schulz,
)
from moment_jax.ops.triu import triu_flat_indices, triu_size, triu_vector

__all__ = [
  "center",
  "center_graph",
  "centered_moment",
  "check_inputs",
  "check_values",
  "count_sketch",
  "coupled_step",
  "feature_size",
  "gram_sqrtm",
  "grid_graph",
  "matrix_sqrt",
  "moment_features",
  "map_samples",
  "newton_schulz_step",
  "normalize_graph",
  "power_normalize",
  "project",
  "project_chunked",
  "propagate",
  "second_moment",
  "sketch_hashes",
  "split_matmul",
  "contraction_pieces",
  "sqrtm_eigh",
  "sqrtm_newton_schulz",
  "tensor_sketch_moment",
  "token_count",
  "token_gram",
  "triu_flat_indices",
  "triu_size",
  "triu_vector",
  "use_token_space",
]


def _checks_module():
  from moment_jax.ops import _checks

  return _checks


__getattr__ = _deprecated.module_getattr(
  __name__, {"checks": (_checks_module, "moment_jax.ops.check_inputs / check_values")}
)
