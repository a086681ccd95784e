"""moment_jax: a memory-lean second-order moment head for token models in JAX/Flax."""

from moment_jax.linen import MomentHead
from moment_jax.nnx import MomentHead as NNXMomentHead
from moment_jax.nnx import linen_to_nnx, nnx_to_linen
from moment_jax.ops import (feature_size, grid_graph, moment_features, normalize_graph,
                            second_moment, sqrtm_newton_schulz, tensor_sketch_moment,
                            triu_vector)
from moment_jax.precision import NAMED_POLICIES, Policy, get_policy, parse_policy
from moment_jax.presets import PRESET_NAMES, PRESETS, preset

__version__ = "0.1.0"

__all__ = [
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
