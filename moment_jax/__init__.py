"""moment_jax: a memory-lean second-order moment head for token models in JAX/Flax.

The public surface is what `__all__` lists here and in each public module
(`ops`, `linen`, `nnx`, `config`, `precision`, `presets`, `remat`, `memory`,
`sharding`, `convert`, `torch_reference`); names with a leading underscore
and modules whose name starts with one may change without notice.
"""

from moment_jax._version import __version__ as __version__
from moment_jax.config import HeadConfig
from moment_jax.linen import MomentHead
from moment_jax.nnx import MomentHead as NNXMomentHead
from moment_jax.nnx import linen_to_nnx, nnx_to_linen
from moment_jax.ops import (
  feature_size,
  grid_graph,
  moment_features,
  normalize_graph,
  second_moment,
  sqrtm_newton_schulz,
  tensor_sketch_moment,
  triu_vector,
)
from moment_jax.precision import NAMED_POLICIES, Policy, get_policy, parse_policy
from moment_jax.presets import PRESET_NAMES, PRESETS, preset

__all__ = [
  "HeadConfig",
  "MomentHead",
  "NNXMomentHead",
  "NAMED_POLICIES",
  "PRESETS",
  "PRESET_NAMES",
  "Policy",
  "feature_size",
  "get_policy",
  "grid_graph",
  "linen_to_nnx",
  "moment_features",
  "nnx_to_linen",
  "normalize_graph",
  "parse_policy",
  "preset",
  "second_moment",
  "sqrtm_newton_schulz",
  "tensor_sketch_moment",
  "triu_vector",
]
