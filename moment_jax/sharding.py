"""Data and model parallelism with `jax.sharding`: a ("data", "model") mesh,
the batch split over "data", and the head's projection laid out by a rules
table (STYLE habit 17): the projection's arrays carry logical axis names
(`moment_jax.ops.project`), `head_rules(layout)` maps them to mesh axes, and
XLA's SPMD partitioner inserts the collectives the constraints call for.

Layouts of the projection kernel `[F, d_out]` (151M entries for the optimized
preset at D=768) and of its Adam moments:

* "replicated": plain data parallelism. Every device holds the whole kernel
  and both moments, and every step all-reduces its `[F, d_out]` gradient.
* "columns": split by output column over "model" (`HEAD_RULES`), whole over
  "data": the same all-reduce, over the data axis, of a `1/model` slice.
* "rows": split by row (F) over "data" (and by column over "model"). The
  per-sample features move instead of the gradient: an all-to-all turns the
  batch-split `[B/n, F]` into F-split `[B, F/n]`, each device multiplies by
  its row block, the `[B, d_out]` partial products are reduce-scattered back
  to the batch shards; the backward pass mirrors it, and each device updates
  its own rows. The recommended layout for data parallelism on 2 or more
  devices (docs/scaling.md has the numbers).

Example (a training step; `state`, `train_step` and `batch` are yours)::

  mesh = make_mesh(data=8)                            # 8 devices
  rules = head_rules("rows")
  shardings = tree_shardings(state, mesh, rules)      # params and optimizer state
  step = layout_jit(train_step, mesh, rules,          # traced under the layout
                    in_shardings=(shardings, batch_sharding(mesh)),
                    out_shardings=(shardings, replicated(mesh)))
  state, loss = step(jax.device_put(state, shardings), batch)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterator, Literal, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from moment_jax._trees import key_str
from moment_jax.ops import _checks
from moment_jax.ops.project import BATCH, KERNEL_AXES, PROJ_BATCH, PROJ_IN, PROJ_OUT, mesh_spec

__all__ = [
  "AXES",
  "HEAD_RULES",
  "KINDS",
  "LAYOUTS",
  "Collective",
  "HeadRules",
  "Layout",
  "batch_sharding",
  "bytes_per_device",
  "collectives",
  "head_rules",
  "layout_jit",
  "make_mesh",
  "parse_mesh",
  "partition_specs",
  "path_str",
  "replicated",
  "tree_shardings",
  "use_layout",
  "wire_bytes",
]

AXES: tuple[str, str] = ("data", "model")
Layout = Literal["replicated", "columns", "rows"]
LAYOUTS: tuple[str, ...] = ("replicated", "columns", "rows")
PathRules = Sequence[tuple[str, P]]
LogicalRules = tuple[tuple[str, str | None], ...]

# Logical axis -> mesh axis, per layout. "batch" is where the rest of the
# model splits the batch; "proj_batch" and "proj_in" are where the features
# meet the kernel: with "rows" the batch is whole there and F is split.
_LOGICAL: dict[str, LogicalRules] = {
  "replicated": ((BATCH, "data"), (PROJ_BATCH, "data"), (PROJ_IN, None), (PROJ_OUT, None)),
  "columns": ((BATCH, "data"), (PROJ_BATCH, "data"), (PROJ_IN, None), (PROJ_OUT, "model")),
  "rows": ((BATCH, "data"), (PROJ_BATCH, None), (PROJ_IN, "data"), (PROJ_OUT, "model")),
}
# The kernel's path in a variable tree (Linen `params`, NNX state, optax
# state: the regex also matches Adam's mu and nu copies of it).
_KERNEL_PATH = r"(^|/)proj/kernel(/value)?$"


@dataclasses.dataclass(frozen=True)
class HeadRules:
  """One layout of the head's projection, as both tables derived from one.

  Attributes:
    layout: its name, one of `LAYOUTS`.
    logical: `(logical axis, mesh axis or None)` pairs for
      `flax.linen.logical_axis_rules`: they place the projection's
      activations (`ops.project`'s constraints).
    params: `(path regex, PartitionSpec)` pairs for `tree_shardings`: the
      kernel's spec is its logical axes `ops.KERNEL_AXES` under `logical`.
  """

  layout: str
  logical: LogicalRules
  params: tuple[tuple[str, P], ...]


def head_rules(layout: Layout) -> HeadRules:
  """The rules of `layout`: "replicated", "columns" or "rows" (see the module docstring).

  Example:
    >>> rules = head_rules("rows")
    >>> rules.params[0][1] == P("data", "model"), dict(rules.logical)["proj_in"]
    (True, 'data')
  """
  _checks.check_choice("layout", layout, LAYOUTS)
  logical = _LOGICAL[layout]
  spec = mesh_spec(KERNEL_AXES, logical)
  params = () if all(a is None for a in spec) else ((_KERNEL_PATH, spec),)
  return HeadRules(layout, logical, params)


# The kernel split by output column over "model": the "columns" layout's path rules.
HEAD_RULES: tuple[tuple[str, P], ...] = head_rules("columns").params


@contextlib.contextmanager
def use_layout(mesh: Mesh, rules: HeadRules | Layout) -> Iterator[None]:
  """Activates `rules`' logical constraints on `mesh` (`jax.set_mesh` and
  `flax.linen.logical_axis_rules`).

  Trace the step inside: a jitted function keeps the layout of the context
  it was traced (first called or lowered) in, so build one per layout.
  """
  rules = head_rules(rules) if isinstance(rules, str) else rules
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules.logical):
    yield


def layout_jit(
  fn: Callable[..., Any], mesh: Mesh, rules: HeadRules | Layout, **jit_kwargs: Any
) -> Callable[..., Any]:
  """`jax.jit(fn, **jit_kwargs)`, called inside `use_layout(mesh, rules)` every
  time, so whichever call traces it sees the layout's constraints."""
  jitted = jax.jit(fn, **jit_kwargs)

  @functools.wraps(fn)
  def call(*args: Any, **kwargs: Any) -> Any:
    with use_layout(mesh, rules):
      return jitted(*args, **kwargs)

  return call


def parse_mesh(spec: str) -> tuple[int, int]:
  """`"2x4"` -> `(2, 4)`: the sizes of the "data" and "model" axes."""
  m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", spec)
  if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
    raise ValueError(f"mesh: expected 'DATAxMODEL' with positive sizes, e.g. '2x4', got {spec!r}")
  return int(m.group(1)), int(m.group(2))


def make_mesh(
  data: int | None = None, model: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
  """A `Mesh` of shape `[data, model]` with axes ("data", "model").

  Args:
    data: size of the "data" axis; default: all devices over `model`.
    model: size of the "model" axis.
    devices: devices to use (default `jax.devices()`); the first
      `data * model` are taken.
  """
  devices = list(jax.devices() if devices is None else devices)
  _checks.check_int("model", model)
  if data is None:
    data = len(devices) // model
  _checks.check_int("data", data)
  if data * model > len(devices):
    raise ValueError(
      f"mesh: {data}x{model} needs {data * model} devices, {len(devices)} available "
      f"(on CPU, simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
    )
  return jax.make_mesh(
    (data, model), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[: data * model]
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over "data", the rest replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device."""
  return NamedSharding(mesh, P())


def path_str(path: Sequence[Any]) -> str:
  """`tree_flatten_with_path` keys as `"a/b/0/c"`."""
  return "/".join(key_str(k) for k in path)


def _path_rules(rules: PathRules | HeadRules) -> PathRules:
  return rules.params if isinstance(rules, HeadRules) else rules


def partition_specs(tree: Any, rules: PathRules | HeadRules) -> Any:
  """A `PartitionSpec` per leaf: the first rule whose regex `re.search`es the
  leaf's path (`path_str`), else replicated (`P()`)."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in _path_rules(rules)]

  def spec_of(path, _):
    name = path_str(path)
    return next((spec for pattern, spec in compiled if pattern.search(name)), P())

  return jax.tree_util.tree_map_with_path(spec_of, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: PathRules | HeadRules = HEAD_RULES) -> Any:
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
      size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
      if dim % size:
        raise ValueError(
          f"{path_str(path)}: dimension {dim} of shape {shape} is not divisible by "
          f"mesh axes {axes} of size {size}"
        )
    return NamedSharding(mesh, spec)

  specs = partition_specs(tree, rules)
  return jax.tree_util.tree_map_with_path(sharding, tree, specs)


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """The bytes of `tree`'s shards (arrays or shape structs, placed by
  `shardings`) on the device that holds the most."""
  per: collections.Counter[int] = collections.Counter()
  for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    size = math.prod(sh.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    for index in sh.devices_indices_map(leaf.shape):
      per[index.id] += size
  return max(per.values(), default=0)


# -- reading collectives back from compiled HLO ---------------------------------

KINDS: tuple[str, ...] = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "collective-permute",
)
# Bytes each device sends per byte of `Collective.bytes`, with ring algorithms on n devices.
_WIRE = {
  "all-reduce": lambda n: 2 * (n - 1) / n,
  "all-gather": lambda n: (n - 1) / n,
  "reduce-scatter": lambda n: (n - 1) / n,
  "all-to-all": lambda n: (n - 1) / n,
  "collective-permute": lambda n: 1.0,
}
_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][a-z\-]*)\(")
_CALLEES = re.compile(
  r"\b(calls|body|condition|to_apply|true_computation|false_computation)"
  r"=%?([\w.\-]+)"
)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program, per device.

  Attributes:
    kind: one of `KINDS`.
    bytes: the array it is about: the reduced array (all-reduce), the
      gathered result (all-gather), the array before scattering
      (reduce-scatter), the exchanged buffer (all-to-all, collective-permute).
    group: devices taking part together.
    count: times it runs per call (the trip counts of the loops around it).
    text: its HLO instruction, shortened.
  """

  kind: str
  bytes: int
  group: int
  count: int
  text: str

  @property
  def wire(self) -> float:
    """Bytes each device sends over all `count` runs, by ring algorithms."""
    return _WIRE[self.kind](self.group) * self.bytes * self.count if self.group > 1 else 0.0


def _array_bytes(shape: str) -> list[int]:
  return [
    math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype]
    for dtype, dims in _ARRAY.findall(shape)
    if dtype in _DTYPE_BYTES
  ]


def _group_size(line: str, devices: int) -> int:
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)  # iota: [groups, size]
  if m:
    return int(m.group(1).split(",")[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    sizes = {k.strip("' "): int(v) for k, v in (a.split("=") for a in m.group(1).split(","))}
    return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
  return devices


def collectives(hlo_text: str, devices: int) -> list[Collective]:
  """The collectives of a compiled program's HLO text (`compiled.as_text()`).

  Counts each one as many times as the loops around it run (`while` loops'
  `known_trip_count`; once where XLA does not know it), through fusions,
  calls and conditionals. Asynchronous `*-start` forms count once.

  Args:
    hlo_text: the optimised HLO module, as text.
    devices: devices of the program, the group of a collective whose
      replica groups are empty.
  """
  bodies: dict[str, list[str]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and not line[:1].isspace() and "=" not in line.split("{")[0].split("(")[0]:
      current = m.group(2)
      bodies[current] = []
      entry = current if m.group(1) else entry
    elif current is not None and line.strip() == "}":
      current = None
    elif current is not None:
      bodies[current].append(line)

  calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  found: dict[str, list[tuple[str, int, int, str]]] = collections.defaultdict(list)
  for name, lines in bodies.items():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m is None:
        continue
      shape, op = m.group(1), m.group(2)
      if op.endswith("-done") or op == "async-update":
        continue
      trips = re.search(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', line)
      loop = int(trips.group(1)) if op == "while" and trips else 1
      for key, callee in _CALLEES.findall(line):
        calls[name].append((callee, loop if key in ("body", "condition") else 1))
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      for callee in branches.group(1).split(",") if branches else ():
        calls[name].append((callee.strip().lstrip("%"), 1))
      kind = op.removesuffix("-start")
      if kind not in KINDS:
        continue
      sizes = _array_bytes(shape)
      if op.endswith("-start") and kind == "all-gather":  # (operands..., results...)
        sizes = sizes[len(sizes) // 2 :]
      elif op.endswith("-start") and kind == "collective-permute":  # (operand, result, ...)
        sizes = sizes[:1]
      group = _group_size(line, devices)
      size = sum(sizes) * (group if kind == "reduce-scatter" else 1)
      found[name].append((kind, size, group, line.strip()[:240]))

  order: list[str] = []  # post-order: every computation after those it calls

  def visit(name: str) -> None:
    if name in seen:
      return
    seen.add(name)
    for callee, _ in calls.get(name, ()):
      if callee in bodies:
        visit(callee)
    order.append(name)

  seen: set[str] = set()
  visit(entry)
  runs: collections.Counter[str] = collections.Counter({entry: 1})
  for name in reversed(order):
    for callee, loop in calls.get(name, ()):
      runs[callee] += runs[name] * loop
  return [
    Collective(kind, size, group, runs[name], text)
    for name, items in found.items()
    for kind, size, group, text in items
    if runs[name]
  ]


def wire_bytes(ops: Sequence[Collective]) -> float:
  """Bytes each device sends per call, summed over `ops` (ring algorithms)."""
  return sum(op.wire for op in ops)
