import os
import sys

# Tests compare float32 JAX against float64 NumPy: pin full f32 matmuls so a
# GPU run does not silently use TF32.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
sys.path.insert(0, os.path.dirname(__file__))
