"""Data and model parallelism with `jax.sharding`: a ("data", "model") mesh,
the batch split over "data" and chosen weights split over "model" by rules on
their paths. Model-agnostic; XLA's SPMD partitioner inserts the collectives.

Example:
  >>> mesh = make_mesh(data=2, model=4)                  # 8 devices
  >>> shardings = tree_shardings(state, mesh, HEAD_RULES)  # params and optimizer state
  >>> state = jax.device_put(state, shardings)
  >>> step = jax.jit(train_step, in_shardings=(shardings, replicated(mesh)),
  ...                out_shardings=(shardings, replicated(mesh)))
  >>> # inside train_step: x = jax.lax.with_sharding_constraint(x, batch_sharding(mesh))
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES: tuple[str, str] = ("data", "model")

# The head's projection kernel `[F, d_out]` (151M entries for the optimized
# preset at D=768) split by output column: each device of the "model" axis
# holds `[F, d_out / model]`. The rule is a regex on the leaf's path, so it
# also matches the kernel's copies in the optimizer state (Adam's mu and nu).
HEAD_RULES: tuple[tuple[str, P], ...] = ((r"(^|/)proj/kernel$", P(None, "model")),)


def parse_mesh(spec: str) -> tuple[int, int]:
  """`"2x4"` -> `(2, 4)`: the sizes of the "data" and "model" axes."""
  m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", spec)
  if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    raise ValueError(f"mesh: expected 'DATAxMODEL' with positive sizes, e.g. '2x4', got {spec!r}")
  return int(m.group(1)), int(m.group(2))


def make_mesh(data: int | None = None, model: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` of shape `[data, model]` with axes ("data", "model").

  Args:
    data: size of the "data" axis; default: all devices over `model`.
    model: size of the "model" axis.
    devices: devices to use (default `jax.devices()`); the first
      `data * model` are taken.
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(model, bool) or not isinstance(model, int) or model < 1:
    raise ValueError(f"model: expected an int >= 1, got {model!r}")
  if data is None:
    data = len(devices) // model
  if isinstance(data, bool) or not isinstance(data, int) or data < 1:
    raise ValueError(f"data: expected an int >= 1, got {data!r}")
  if data * model > len(devices):
    raise ValueError(
        f"mesh: {data}x{model} needs {data * model} devices, {len(devices)} available "
        f"(on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  return jax.make_mesh((data, model), AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:data * model])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data", the rest replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def path_str(path: Sequence[Any]) -> str:
  """`tree_flatten_with_path` keys as `"a/b/0/c"`."""
  def one(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(one(k) for k in path)


def partition_specs(tree: Any, rules: Sequence[tuple[str, P]]) -> Any:
  """A `PartitionSpec` per leaf: the first rule whose regex `re.search`es the
  leaf's path (`path_str`), else replicated (`P()`)."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def spec_of(path, _):
    name = path_str(path)
    return next((spec for pattern, spec in compiled if pattern.search(name)), P())

  return jax.tree_util.tree_map_with_path(spec_of, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = HEAD_RULES) -> Any:
  """`NamedSharding`s for every leaf of `tree` (arrays or shape structs).

  Raises `ValueError` when a rule names more axes than a leaf has, or a
  split dimension is not divisible by its mesh axes' size.
  """
  def sharding(path, leaf, spec):
    shape = getattr(leaf, "shape", ())
    if len(spec) > len(shape):
      raise ValueError(f"{path_str(path)}: spec {spec} has more entries than shape {shape}")
    for dim, axes in zip(shape, spec):
      if axes is None:
        continue
      size = 1
      for a in (axes if isinstance(axes, tuple) else (axes,)):
        size *= mesh.shape[a]
      if dim % size:
        raise ValueError(
            f"{path_str(path)}: dimension {dim} of shape {shape} is not divisible by "
            f"mesh axes {axes} of size {size}")
    return NamedSharding(mesh, spec)

  specs = partition_specs(tree, rules)
  return jax.tree_util.tree_map_with_path(sharding, tree, specs)
