"""PyTorch <-> Flax weights of the moment head, and the files that hold them.

`torch_to_flax` turns a state_dict of `moment_jax.torch_reference.MomentHead`
(or of the original PyTorch design, which has the same keys) into the
`variables` of the Linen `moment_jax.MomentHead`; `flax_to_torch` goes back.
Values may be torch tensors, NumPy arrays (from `.npz` or `.safetensors`) or
JAX arrays; torch is imported only for `.pt` files and `as_torch=True`. Each
function takes the head or its `moment_jax.HeadConfig`.

Key map (`F = D (D + 1) / 2 (+ sketch_dim)`, `D` the token width, or
`d_reduce` when set):

| PyTorch key | shape | Flax leaf | shape |
|---|---|---|---|
| `reduce.weight` (`d_reduce`) | `[d_reduce, d_in]` | `params/reduce/kernel` | `[d_in, d_reduce]` |
| `reduce.bias` | `[d_reduce]` | `params/reduce/bias` | `[d_reduce]` |
| `mlp.0.weight` | `[d_out, F]` | `params/proj/kernel` | `[F, d_out]` |
| `mlp.0.bias` | `[d_out]` | `params/proj/bias` | `[d_out]` |
| `mlp.1.weight` | `[d_out]` | `params/norm/scale` | `[d_out]` |
| `mlp.1.bias` | `[d_out]` | `params/norm/bias` | `[d_out]` |
| `mlp.1.running_mean` | `[d_out]` | `batch_stats/norm/mean` | `[d_out]` |
| `mlp.1.running_var` | `[d_out]` | `batch_stats/norm/var` | `[d_out]` |
| `mlp.1.num_batches_tracked` | `[]` int64 | (none) | |
| `mlp.4.weight` (double MLP) | `[d_out, d_out]` | `params/out/kernel` | `[d_out, d_out]` |
| `mlp.4.bias` | `[d_out]` | `params/out/bias` | `[d_out]` |

Linear weights are transposed (`(out, in)` <-> `(in, out)`); nothing else
changes, so a round trip is bit-identical. Every other key, a missing key or
a wrong shape raises one `ValueError` that lists every offending key with the
expected and the found shape: a checkpoint loads whole or not at all.
`mlp.1.num_batches_tracked` has no Flax counterpart: `torch_to_flax` accepts
it or its absence (old checkpoints) and drops it; `flax_to_torch` writes the
value you pass (default 0), so `load_state_dict(strict=True)` accepts the
result. The counter only matters to PyTorch's `momentum=None` (cumulative
average), which this head never uses.

Running variance: after a training step PyTorch updates `running_var` with
the unbiased batch variance (`n / (n - 1)` times the biased one, `n` the
batch size), Flax's BatchNorm with the biased one; normalisation in the step
itself uses the biased variance in both. So converted heads agree (to
float32 round-off) in evaluation mode and in a training step's outputs and
gradients, while each step adds `0.1 var_batch / (n - 1)` more to PyTorch's
running variance than to Flax's (`running_mean` agrees). We keep Flax's
convention (the Linen head is Flax's own BatchNorm) and pin the factor in
tests/test_torch_parity.py; with the batch sizes a head trains on the
difference is small (0.4% of the increment at n = 256).

Files (what `moment-jax convert` runs):

* `load_torch_checkpoint(path, head)`: the variables from a `.pt`/`.pth`/`.bin`
  file (read with `torch.load(weights_only=True)` only: a file that pickles
  anything but tensors and containers is refused), a `.safetensors` file (the
  `safetensors` package, no torch) or an `.npz` (no pickles).
  `save_torch_checkpoint(path, variables, head)` writes them back in any of
  those formats, for `load_state_dict(strict=True)`.
* `save(path, variables, head)`: an orbax checkpoint directory holding
  `{"params", "batch_stats"}` and, beside them, `moment_jax.json` with the
  head's configuration and token width. `load(path)` gives back
  `(config, variables)` and refuses a head whose configuration differs;
  `orbax.checkpoint.StandardCheckpointer().restore(path)` gives the variables.
  `load(path, head, prefix=...)` also reads a training checkpoint (a train
  state with `params` and `batch_stats`, e.g. `{"params": {"moment": ...}}`).

Every write goes to a temporary directory beside the destination and is
renamed into place when complete: a failure leaves no partial file or
directory. An existing destination is refused unless `overwrite=True`.

Example:
  >>> import tempfile, os
  >>> cfg = HeadConfig.from_preset("optimized", d_out=8)
  >>> sd = {k: np.ones(s, np.float32) for k, s in expected_shapes(cfg, 6).items()}
  >>> variables = torch_to_flax(sd, cfg)
  >>> variables["params"]["proj"]["kernel"].shape
  (21, 8)
  >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
  >>> save(path, variables, cfg, preset="optimized")
  >>> config, restored = load(path)
  >>> config == cfg, sorted(flax_to_torch(restored, config))[:2]
  (True, ['mlp.0.bias', 'mlp.0.weight'])
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
from typing import Any, Callable, Mapping, cast

import jax
import jax.numpy as jnp
import numpy as np

from moment_jax import _trees
from moment_jax._version import __version__
from moment_jax.config import FIELDS, HeadConfig
from moment_jax.linen import MomentHead
from moment_jax.ops._checks import check_int
from moment_jax.precision import NAMED_POLICIES, Policy, get_policy

__all__ = [
  "CONFIG_FILE",
  "expected_shapes",
  "flax_to_torch",
  "load",
  "load_torch_checkpoint",
  "metadata",
  "read_state_dict",
  "save",
  "save_torch_checkpoint",
  "token_width",
  "torch_to_flax",
]

CONFIG_FILE = "moment_jax.json"
"""The file beside the orbax items that holds the head's configuration."""
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
FILE_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors", ".npz")
# Keys under which training scripts keep the state_dict (unwrapped when alone).
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module")
# Fields that choose how the head runs, not what its weights mean: a head
# loading a checkpoint may set them differently from the stored configuration.
RUNTIME_FIELDS = (
  "isqrt_space",
  "dtype",
  "param_dtype",
  "precision",
  "policy",
  "remat_policy",
  "use_kernels",
  "fused_adamw",
  "isqrt_chunk",
  "check_values",
  "dropout_rate",
)

# The token width's place in a shape when the checkpoint gives no valid width.
_FREE = None
_COUNTER = "mlp.1.num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class _Entry:
  torch_key: str
  flax_path: tuple[str, ...]
  torch_shape: tuple[int | None, ...]
  transpose: bool = False

  @property
  def flax_shape(self) -> tuple[int | None, ...]:
    return self.torch_shape[::-1] if self.transpose else self.torch_shape

  @property
  def flax_key(self) -> str:
    return "/".join(self.flax_path)


def _as_config(head: MomentHead | HeadConfig) -> HeadConfig:
  """The validated `HeadConfig` of a Linen head or of a config itself."""
  if isinstance(head, HeadConfig):
    cfg = head
  elif isinstance(head, MomentHead):
    cfg = head.config
  else:
    raise ValueError(
      f"head: expected a moment_jax.MomentHead (Linen) or a HeadConfig, got "
      f"{type(head).__name__} (for the NNX head pass its .config and use linen_to_nnx)"
    )
  cfg.validate()
  return cfg


def _entries(cfg: HeadConfig, d_in: int | None) -> list[_Entry]:
  """The key map for `cfg`; with `d_in=None` the token width is left free."""
  width = cfg.d_reduce if cfg.d_reduce is not None else d_in
  f = _FREE if width is None else cfg.feature_size(width)
  d_out, out = cfg.d_out, []
  if cfg.d_reduce is not None:
    out += [
      _Entry("reduce.weight", ("params", "reduce", "kernel"), (cfg.d_reduce, d_in), True),
      _Entry("reduce.bias", ("params", "reduce", "bias"), (cfg.d_reduce,)),
    ]
  out += [
    _Entry("mlp.0.weight", ("params", "proj", "kernel"), (d_out, f), True),
    _Entry("mlp.0.bias", ("params", "proj", "bias"), (d_out,)),
    _Entry("mlp.1.weight", ("params", "norm", "scale"), (d_out,)),
    _Entry("mlp.1.bias", ("params", "norm", "bias"), (d_out,)),
    _Entry("mlp.1.running_mean", ("batch_stats", "norm", "mean"), (d_out,)),
    _Entry("mlp.1.running_var", ("batch_stats", "norm", "var"), (d_out,)),
  ]
  if cfg.mlp == "double":
    out += [
      _Entry("mlp.4.weight", ("params", "out", "kernel"), (d_out, d_out), True),
      _Entry("mlp.4.bias", ("params", "out", "bias"), (d_out,)),
    ]
  return out


def _fmt(shape: tuple[int | None, ...], cfg: HeadConfig) -> str:
  """A shape for messages, the free width spelled out."""
  if cfg.d_reduce is not None:
    free = "d_in"
  else:
    free = "D(D+1)/2" + (f"+{cfg.sketch_dim}" if cfg.use_third_order else "")
  return (
    "("
    + ", ".join(free if s is _FREE else str(s) for s in shape)
    + (",)" if len(shape) == 1 else ")")
  )


def _infer_d_in(
  shapes: Mapping[str, tuple[int, ...]], cfg: HeadConfig, d_in: int | None
) -> int | None:
  """The token width: `d_in` if given, else read from the state_dict (None if unreadable)."""
  check_int("d_in", d_in, allow_none=True)
  if d_in is not None:
    return d_in
  key, axis = ("reduce.weight", 1) if cfg.d_reduce is not None else ("mlp.0.weight", 1)
  return _width(shapes.get(key), axis, cfg)


def _width(shape: tuple[int, ...] | None, axis: int, cfg: HeadConfig) -> int | None:
  """`d_in` read off `shape[axis]` of the reduce kernel (with `d_reduce`) or of the
  projection weight (`F` features), or None if the shape gives none."""
  if shape is None or len(shape) != 2:
    return None
  return shape[axis] if cfg.d_reduce is not None else cfg.width_from_features(shape[axis])


def _config_text(cfg: HeadConfig) -> str:
  return (
    f"mlp={cfg.mlp!r}, d_out={cfg.d_out}, use_third_order={cfg.use_third_order}, "
    f"sketch_dim={cfg.sketch_dim}, d_reduce={cfg.d_reduce}"
  )


def _check_shapes(
  found: Mapping[str, tuple[int, ...]],
  expected: Mapping[str, tuple],
  cfg: HeadConfig,
  what: str,
  optional: tuple[str, ...] = (),
  outcome: str = "nothing was converted",
) -> None:
  """Raises one `ValueError` naming every missing, unexpected or misshapen key."""
  seen = {k: tuple(s) for k, s in found.items()}
  # A free dimension means no width could be read from this very key: it is wrong.
  _trees.check_entries(
    f"{what}: does not match the head ({_config_text(cfg)}); {outcome}:",
    seen,
    expected,
    matches=lambda want, got: (
      len(want) == len(got) and all(w is not None and w == g for w, g in zip(want, got))
    ),
    show=lambda want: f"shape {_fmt(want, cfg)}",
    show_found=str,
    show_unexpected=lambda got: f"shape {got}",
    optional=optional,
  )


def _to_numpy(x: Any) -> np.ndarray:
  """A NumPy view of a torch tensor, JAX or NumPy array (torch not imported)."""
  if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":  # NumPy has no bf16: widen exactly
      return x.float().numpy().astype(jnp.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _check_floating(arrays: Mapping[str, np.ndarray], what: str) -> None:
  bad = [
    f"  {k}: expected a floating dtype, found {a.dtype}"
    for k, a in arrays.items()
    if not jnp.issubdtype(a.dtype, jnp.floating)
  ]
  if bad:
    raise ValueError(f"{what}: non-floating values:\n" + "\n".join(bad))


def _torch_order(entries: list[_Entry]) -> list[str]:
  """Torch keys in `state_dict()` order (the counter follows BatchNorm's buffers)."""
  keys = []
  for e in entries:
    keys.append(e.torch_key)
    if e.torch_key == "mlp.1.running_var":
      keys.append(_COUNTER)
  return keys


def _check_variables(
  shapes: Mapping[str, tuple[int, ...]],
  cfg: HeadConfig,
  what: str,
  outcome: str = "nothing was converted",
) -> tuple[list[_Entry], int]:
  """The key map of Flax leaves `{"params/proj/kernel": shape}` and the token width."""
  d_in = _width(
    shapes.get("params/reduce/kernel" if cfg.d_reduce is not None else "params/proj/kernel"), 0, cfg
  )
  entries = _entries(cfg, d_in)
  _check_shapes(shapes, {e.flax_key: e.flax_shape for e in entries}, cfg, what, outcome=outcome)
  assert d_in is not None  # the check above fails when no width could be read
  return entries, d_in


def token_width(variables: Mapping[str, Any], head: MomentHead | HeadConfig) -> int:
  """The token width `d_in` that the Linen head's `variables` are for.

  Raises:
    ValueError: variables that do not fit `head` (every offending leaf listed).
  """
  cfg = _as_config(head)
  shapes = {k: np.shape(v) for k, v in _trees.flat(variables).items()}
  return _check_variables(shapes, cfg, "variables")[1]


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`{"a/b": x}` -> `{"a": {"b": x}}`."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def expected_shapes(head: MomentHead | HeadConfig, d_in: int) -> dict[str, tuple[int, ...]]:
  """The state_dict keys and shapes of a PyTorch head matching `head` at width `d_in`.

  Args:
    head: the Linen head or its `HeadConfig` (its `mlp`, `d_out`,
      `use_third_order`, `sketch_dim` and `d_reduce` matter).
    d_in: token width `D`.

  Returns:
    `{torch key: shape}` in the order of `torch_reference.MomentHead.state_dict()`,
    `mlp.1.num_batches_tracked` included as `()`.
  """
  check_int("d_in", d_in)
  entries = _entries(_as_config(head), d_in)
  shapes = {e.torch_key: cast(tuple[int, ...], e.torch_shape) for e in entries}  # no free width
  shapes[_COUNTER] = ()
  return {k: shapes[k] for k in _torch_order(entries)}


def torch_to_flax(
  state_dict: Mapping[str, Any],
  head: MomentHead | HeadConfig,
  *,
  d_in: int | None = None,
  prefix: str = "",
) -> dict[str, Any]:
  """Flax `variables` of `head` from a PyTorch moment-head state_dict.

  Args:
    state_dict: `{key: tensor or array}` as in the module docstring's table;
      torch tensors, NumPy or JAX arrays (e.g. `dict(numpy.load("head.npz"))`).
    head: the Linen `moment_jax.MomentHead` the variables are for, or its
      `HeadConfig`; its parameter dtype (`param_dtype` or `policy`) is the
      dtype of `params`.
    d_in: token width `D`; default: read from `reduce.weight` (with
      `d_reduce`) or from `mlp.0.weight`'s `F = D (D + 1) / 2 (+ sketch_dim)`.
    prefix: only keys starting with it are read, with it stripped (e.g.
      `"head."` for a head inside a larger model); other keys are ignored.

  Returns:
    `{"params": {...}, "batch_stats": {"norm": {"mean", "var"}}}` of JAX
    arrays: `proj/kernel` is `[F, d_out]`; batch statistics are float32 as
    Flax keeps them.

  Raises:
    ValueError: a missing, unexpected or misshapen key (all of them listed),
      a non-floating weight, or a bad `head` configuration or `d_in`.
  """
  cfg = _as_config(head)
  arrays = {k[len(prefix) :]: _to_numpy(v) for k, v in state_dict.items() if k.startswith(prefix)}
  shapes = {k: a.shape for k, a in arrays.items()}
  entries = _entries(cfg, _infer_d_in(shapes, cfg, d_in))
  expected: dict[str, tuple] = {e.torch_key: e.torch_shape for e in entries}
  expected[_COUNTER] = ()
  _check_shapes(shapes, expected, cfg, "state_dict", optional=(_COUNTER,))
  arrays.pop(_COUNTER, None)
  _check_floating(arrays, "state_dict")
  param_dtype = cfg.resolved_policy().param_dtype
  flat = {}
  for e in entries:
    a = arrays[e.torch_key]
    dtype = param_dtype if e.flax_path[0] == "params" else jnp.float32
    # A copy: JAX on CPU may alias a NumPy buffer, which here can be a torch
    # tensor's storage that an optimizer later updates in place.
    flat[e.flax_key] = jnp.array(a.T if e.transpose else a, dtype=dtype, copy=True)
  return _nest(flat)


def flax_to_torch(
  variables: Mapping[str, Any],
  head: MomentHead | HeadConfig,
  *,
  as_torch: bool = False,
  num_batches_tracked: int = 0,
  prefix: str = "",
) -> dict[str, Any]:
  """A PyTorch moment-head state_dict from the Flax `variables` of `head`.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of the Linen head
      (NumPy or JAX arrays); the token width is read from it.
    head: the Linen `moment_jax.MomentHead` they belong to, or its `HeadConfig`.
    as_torch: return torch tensors (imports torch); default NumPy arrays,
      which `torch_reference.MomentHead.load_state_dict` also accepts.
    num_batches_tracked: value of `mlp.1.num_batches_tracked` (Flax keeps
      no counter), an int64 scalar.
    prefix: prepended to every key.

  Returns:
    `{key: array}` in `state_dict()` order, weights `(out, in)`, in the
    dtypes of `variables`; C-contiguous copies, never views of them.

  Raises:
    ValueError: a missing, unexpected or misshapen leaf (all of them listed)
      or a non-floating one.
    ImportError: `as_torch=True` without torch.
  """
  cfg = _as_config(head)
  leaves = {k: _to_numpy(v) for k, v in _trees.flat(variables).items()}
  entries, _ = _check_variables({k: a.shape for k, a in leaves.items()}, cfg, "variables")
  _check_floating(leaves, "variables")
  check_int("num_batches_tracked", num_batches_tracked, low=0)
  out = {
    e.torch_key: np.array(
      leaves[e.flax_key].T if e.transpose else leaves[e.flax_key], order="C", copy=True
    )
    for e in entries
  }
  out[_COUNTER] = np.asarray(num_batches_tracked, np.int64)
  out = {prefix + k: out[k] for k in _torch_order(entries)}
  return _as_torch(out) if as_torch else out


def _as_torch(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """NumPy arrays as torch tensors (bfloat16 through float32, exactly)."""
  import torch  # pylint: disable=import-outside-toplevel

  return {
    k: (
      torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
      if v.dtype == jnp.bfloat16
      else torch.from_numpy(v)
    )
    for k, v in state.items()
  }


# -- Files: PyTorch side ----------------------------------------------------------------


def _one_line(e: BaseException) -> str:
  """An exception as one short line: its type and the first line of its text."""
  lines = str(e).strip().splitlines()
  first = lines[0].strip() if lines else ""
  return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__


def _suffix(path: str, allowed: tuple[str, ...], what: str) -> str:
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in allowed:
    raise ValueError(f"{what}: expected a file ending in {', '.join(allowed)}, got {path!r}")
  return suffix


def _torch_load(path: str) -> Any:
  """`torch.load(weights_only=True)`, its failures as one-line `ValueError`s."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
      f"{path}: reading a PyTorch file needs torch (pip install "
      f"'moment-jax[torch]'); .safetensors and .npz need no torch"
    ) from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    if "weights only" not in str(e).lower():
      raise ValueError(f"{path}: not a PyTorch checkpoint ({_one_line(e)})") from e
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    raise ValueError(
      f"{path}: refused: the file pickles objects other than tensors"
      f"{f' ({found.group(1)})' if found else ''}, and only torch.load(weights_only=True) "
      f"is used; save a plain state_dict (torch.save(model.state_dict(), path))"
    ) from e
  except Exception as e:  # torch raises many types for a bad file
    raise ValueError(f"{path}: not a PyTorch checkpoint ({_one_line(e)})") from e


def _safetensors_load(path: str) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
      f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)"
    ) from e
  try:
    return load_file(path)
  except Exception as e:  # SafetensorError and OSErrors alike
    raise ValueError(f"{path}: not a safetensors file ({_one_line(e)})") from e


def _npz_load(path: str) -> dict[str, np.ndarray]:
  try:
    archive = np.load(path, allow_pickle=False)
    if not hasattr(archive, "files"):
      raise ValueError("a single .npy array, not an .npz archive")
    with archive:
      arrays = {k: archive[k] for k in archive.files}
  except Exception as e:  # BadZipFile, EOFError, pickled objects, ...
    raise ValueError(f"{path}: not an .npz archive of arrays ({_one_line(e)})") from e
  raw = [k for k, a in arrays.items() if a.dtype.kind == "V"]
  if raw:
    raise ValueError(
      f"{path}: {', '.join(raw)} hold raw bytes ({arrays[raw[0]].dtype}), as NumPy writes "
      f"bfloat16 to .npz; it cannot be read back: use .safetensors or .pt"
    )
  return arrays


def _flatten_dotted(obj: Mapping[str, Any], path: str = "") -> dict[str, Any]:
  """Nested mappings flattened with "." (`{"model": {"w": x}}` -> `{"model.w": x}`)."""
  out: dict[str, Any] = {}
  for k, v in obj.items():
    key = f"{path}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten_dotted(v, key + "."))
    else:
      out[key] = v
  return out


def _is_array(x: Any) -> bool:
  return isinstance(x, (np.ndarray, jax.Array)) or (hasattr(x, "detach") and hasattr(x, "cpu"))


def read_state_dict(path: str | os.PathLike, prefix: str = "") -> dict[str, np.ndarray]:
  """The arrays of a PyTorch-style weights file, as NumPy, without running pickles.

  Args:
    path: `.pt`, `.pth` or `.bin` (`torch.save` output, read with
      `torch.load(map_location="cpu", weights_only=True)` only; needs torch),
      `.safetensors` (the safetensors package; no torch) or `.npz`
      (`allow_pickle=False`).
    prefix: keep the keys starting with it, stripped (`"head."` for a head
      inside a larger model). Nested dictionaries are flattened with ".", so
      `{"model": {"mlp.0.weight": w}}` has the key `model.mlp.0.weight`.
      A file whose top level holds exactly one of `state_dict`,
      `model_state_dict`, `model`, `module` as a dictionary (a training
      checkpoint: weights beside an epoch counter or an optimizer's state) is
      read from inside it, `prefix` counted from there (`"head."` and
      `"model.head."` then select the same keys).

  Returns:
    `{key: array}`; torch bfloat16 tensors become `ml_dtypes` bfloat16 arrays.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: an unknown suffix; a file that cannot be read as its suffix
      says (one line); a `.pt` that pickles other objects than tensors
      (refused, nothing run); values that are not arrays under `prefix`.
    ImportError: torch (for `.pt`) or safetensors is not installed.
  """
  path = os.fspath(path)
  suffix = _suffix(path, FILE_SUFFIXES, "path")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  if suffix in TORCH_SUFFIXES:
    obj = _torch_load(path)
  elif suffix == ".safetensors":
    obj = _safetensors_load(path)
  else:
    obj = _npz_load(path)
  if not isinstance(obj, Mapping):
    raise ValueError(
      f"{path}: expected a state_dict (a dict of tensors), found a {type(obj).__name__}"
    )
  wrapped = [w + "." for w in _WRAPPERS if isinstance(obj.get(w), Mapping)]
  if len(wrapped) == 1 and not prefix.startswith(wrapped[0]):
    prefix = wrapped[0] + prefix
  flat = _flatten_dotted(obj)
  selected = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
  if not selected:
    raise ValueError(
      f"{path}: no key starts with prefix {prefix!r} (keys: "
      f"{', '.join(list(flat)[:6])}{', ...' if len(flat) > 6 else ''})"
    )
  bad = [f"{k} ({type(v).__name__})" for k, v in selected.items() if not _is_array(v)]
  if bad:
    raise ValueError(
      f"{path}: expected tensors only, found other values under "
      f"{prefix or 'the top level'!r}: {', '.join(bad[:6])}"
      f"{', ...' if len(bad) > 6 else ''}; pass the prefix of the head's keys"
    )
  arrays = {}
  for k, v in selected.items():
    try:
      arrays[k] = _to_numpy(v)
    except Exception as e:  # sparse, quantized or meta tensors have no NumPy form
      raise ValueError(f"{path}: {k} is not a dense array ({_one_line(e)})") from e
  return arrays


def load_torch_checkpoint(
  path: str | os.PathLike,
  head: MomentHead | HeadConfig,
  *,
  prefix: str = "",
  d_in: int | None = None,
) -> dict[str, Any]:
  """The Flax `variables` of `head` from a PyTorch moment-head weights file.

  `torch_to_flax(read_state_dict(path, prefix), head, d_in=d_in)`: see those
  two for the formats, the prefix, the checks and the errors.

  Example:
    >>> import tempfile, os
    >>> cfg = HeadConfig.from_preset("memory", d_out=4)
    >>> path = os.path.join(tempfile.mkdtemp(), "head.npz")
    >>> np.savez(path, **{k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg, 5).items()})
    >>> load_torch_checkpoint(path, cfg)["params"]["proj"]["kernel"].shape
    (15, 4)
  """
  return torch_to_flax(read_state_dict(path, prefix), head, d_in=d_in)


def save_torch_checkpoint(
  path: str | os.PathLike,
  variables: Mapping[str, Any],
  head: MomentHead | HeadConfig,
  *,
  num_batches_tracked: int = 0,
  prefix: str = "",
  overwrite: bool = False,
) -> None:
  """Writes `flax_to_torch(variables, head)` as a `.pt`/`.pth`/`.bin`, `.safetensors` or
  `.npz` file that the PyTorch head loads with `load_state_dict(strict=True)`.

  Args:
    path: the file; its suffix picks the format (`.pt` needs torch,
      `.safetensors` the safetensors package; `.npz` cannot hold bfloat16).
    variables: the Linen head's `{"params", "batch_stats"}`.
    head: the Linen head or its `HeadConfig`.
    num_batches_tracked: the BatchNorm counter to write (Flax keeps none).
    prefix: prepended to every key.
    overwrite: replace an existing `path`; else an existing one is refused.

  Raises:
    ValueError: bad variables (every offending leaf listed), an unknown
      suffix, bfloat16 for `.npz`. FileExistsError: `path` exists.
  """
  path = os.fspath(path)
  suffix = _suffix(path, FILE_SUFFIXES, "path")
  _check_free(path, overwrite)
  state = flax_to_torch(variables, head, num_batches_tracked=num_batches_tracked, prefix=prefix)
  write: Callable[[str], None]
  if suffix in TORCH_SUFFIXES:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
        f"{path}: writing a PyTorch file needs torch (pip install "
        f"'moment-jax[torch]'); .safetensors and .npz need no torch"
      ) from e
    tensors = _as_torch(state)
    write = lambda p: torch.save(tensors, p)
  elif suffix == ".safetensors":
    try:
      from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
        f"{path}: writing .safetensors needs the safetensors package (pip install safetensors)"
      ) from e
    write = lambda p: save_file(state, p)
  else:
    bf16 = [k for k, a in state.items() if a.dtype == jnp.bfloat16]
    if bf16:
      raise ValueError(
        f"{path}: .npz cannot hold bfloat16 ({', '.join(bf16)}): NumPy would "
        f"write raw bytes; use .safetensors or .pt"
      )
    write = lambda p: np.savez(p, **state)
  _publish(path, overwrite, write)


# -- Files: atomic writes ---------------------------------------------------------------


def _looks_like_checkpoint(path: str) -> bool:
  """Whether directory `path` is empty or an orbax / moment_jax checkpoint."""
  names = set(os.listdir(path))
  return not names or bool(names & {CONFIG_FILE, "_METADATA", "_CHECKPOINT_METADATA"})


def _check_free(path: str, overwrite: bool) -> None:
  """Raises unless `path` is absent or may be replaced."""
  if not os.path.lexists(path):
    return
  if not overwrite:
    raise FileExistsError(f"{path}: exists; pass overwrite=True (--overwrite) to replace it")
  if os.path.isdir(path) and not os.path.islink(path) and not _looks_like_checkpoint(path):
    raise ValueError(
      f"{path}: an existing directory that is not a checkpoint; refusing to "
      f"replace it even with overwrite"
    )


def _publish(path: str, overwrite: bool, write: Callable[[str], None]) -> None:
  """Runs `write(staged)` in a temporary directory beside `path`, then renames the
  result to `path`: a failure anywhere leaves `path` as it was and no temporary files."""
  target = os.path.abspath(path)
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
  try:
    staged = os.path.join(tmp, name)
    write(staged)
    _check_free(path, overwrite)  # it may have appeared while we wrote
    if os.path.lexists(target) and (os.path.isdir(target) or os.path.isdir(staged)):
      # A directory cannot be renamed over: move the old one aside, and back on failure.
      old = os.path.join(tmp, ".old")
      os.replace(target, old)
      try:
        os.replace(staged, target)
      except BaseException:
        os.replace(old, target)
        raise
    else:
      os.replace(staged, target)  # atomic, also over an existing file
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# -- Files: orbax side ------------------------------------------------------------------


def _orbax() -> Any:
  try:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
      "orbax checkpoints need orbax-checkpoint (pip install orbax-checkpoint)"
    ) from e
  return ocp


def _policy_text(policy: Policy) -> str:
  """A name or `key=value` string that `get_policy` turns back into `policy`."""
  for name, named in NAMED_POLICIES.items():
    if named == policy:
      return name
  text = (
    f"params={policy.param_dtype.name},compute={policy.compute_dtype.name},"
    f"output={policy.output_dtype.name},moment={policy.moment_dtype.name},"
    f"matmul={getattr(policy.matmul, 'name', str(policy.matmul)).lower()}"
  )
  try:
    same = get_policy(text) == policy
  except ValueError:
    same = False
  if not same:
    raise ValueError(f"policy: {policy!r} cannot be written as a string for {CONFIG_FILE}")
  return text


def _field_json(name: str, value: Any) -> Any:
  """One `HeadConfig` field as JSON; refuses what JSON cannot hold faithfully."""
  if isinstance(value, (np.integer, np.floating, np.bool_)):
    value = value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if name in ("dtype", "param_dtype"):
    return jnp.dtype(value).name
  if name == "precision":
    if isinstance(value, (tuple, list)):
      return [_field_json(name, v) for v in value]
    if isinstance(value, jax.lax.Precision):
      return value.name.lower()
  if name == "policy" and isinstance(value, Policy):
    return _policy_text(value)
  raise ValueError(
    f"{name}: {value!r} cannot be stored in {CONFIG_FILE}; give it as a string (e.g. a "
    f"jax.checkpoint_policies name for remat_policy) or leave it at its default"
  )


def _config_json(cfg: HeadConfig, fields: tuple[str, ...] = FIELDS) -> dict[str, Any]:
  return {f: _field_json(f, getattr(cfg, f)) for f in fields}


def _config_from_json(stored: Any, where: str) -> HeadConfig:
  """The `HeadConfig` of a `config` entry of `CONFIG_FILE`; defaults stay Python's own."""
  if not isinstance(stored, Mapping):
    raise ValueError(f"{where}: 'config' must be an object, found {type(stored).__name__}")
  unknown = sorted(set(stored) - set(FIELDS))
  if unknown:
    raise ValueError(
      f"{where}: unknown configuration fields {', '.join(unknown)} (written by "
      f"a newer moment_jax?); valid fields are {', '.join(FIELDS)}"
    )
  default = HeadConfig()
  kwargs: dict[str, Any] = {}
  for name, value in stored.items():
    if value == _field_json(name, getattr(default, name)):
      continue
    if name in ("dtype", "param_dtype"):
      value = jnp.dtype(value)
    elif name == "precision" and isinstance(value, list):
      value = tuple(value)
    kwargs[name] = value
  cfg = HeadConfig(**kwargs)
  try:
    cfg.validate()
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e
  return cfg


def _check_same_config(stored: HeadConfig, given: HeadConfig, where: str) -> None:
  """Raises a `ValueError` listing every field (but `RUNTIME_FIELDS`) that differs."""
  fields = tuple(f for f in FIELDS if f not in RUNTIME_FIELDS)
  _trees.check_entries(
    f"head: its configuration differs from the one stored with the weights in {where} "
    f"(expected: stored, found: given); nothing was loaded:",
    _config_json(given, fields),
    _config_json(stored, fields),
    show=repr,
  )


def save(
  path: str | os.PathLike,
  variables: Mapping[str, Any],
  head: MomentHead | HeadConfig,
  *,
  preset: str | None = None,
  num_batches_tracked: int | None = None,
  overwrite: bool = False,
) -> None:
  """Writes `variables` as an orbax checkpoint directory with the head's configuration.

  `path` holds `{"params", "batch_stats"}` (orbax `StandardSave`) and
  `moment_jax.json`: `{"format_version", "moment_jax_version", "preset",
  "overrides", "config", "d_in", "num_batches_tracked"}`, where `config` has
  every `HeadConfig` field and `overrides` those that differ from `preset`.

  Args:
    path: the directory to create.
    variables: the Linen head's variables (other collections are refused).
    head: the Linen head or its `HeadConfig`; every field must be
      JSON-writable (a `remat_policy` callable is refused).
    preset: the preset the configuration started from, recorded for readers.
    num_batches_tracked: the PyTorch BatchNorm counter, kept for the way back.
    overwrite: replace an existing checkpoint at `path`.

  Raises:
    ValueError: bad variables (every offending leaf listed) or an unwritable field.
    FileExistsError: `path` exists and `overwrite` is False.
    ImportError: orbax-checkpoint is not installed.
  """
  path = os.fspath(path)
  cfg = _as_config(head)
  check_int("num_batches_tracked", num_batches_tracked, low=0, allow_none=True)
  _check_free(path, overwrite)
  leaves = _trees.flat(variables)
  entries, d_in = _check_variables({k: np.shape(v) for k, v in leaves.items()}, cfg, "variables")
  _check_floating(
    {k: v if hasattr(v, "dtype") else np.asarray(v) for k, v in leaves.items()}, "variables"
  )
  config = _config_json(cfg)
  base = _config_json(HeadConfig.from_preset(preset) if preset is not None else HeadConfig())
  meta = {
    "format_version": FORMAT_VERSION,
    "moment_jax_version": __version__,
    "preset": preset,
    "overrides": {k: v for k, v in config.items() if v != base[k]},
    "config": config,
    "d_in": d_in,
    "num_batches_tracked": num_batches_tracked,
  }
  tree = _nest({e.flax_key: jnp.asarray(leaves[e.flax_key]) for e in entries})
  ocp = _orbax()

  def write(staged: str) -> None:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      ckptr.save(staged, args=ocp.args.StandardSave(tree))
    with open(os.path.join(staged, CONFIG_FILE), "w") as f:
      json.dump(meta, f, indent=2)
      f.write("\n")

  _publish(path, overwrite, write)


def metadata(path: str | os.PathLike) -> dict[str, Any] | None:
  """The parsed `moment_jax.json` of checkpoint `path`, or None if it has none."""
  file = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(file):
    return None
  try:
    with open(file) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{file}: not readable JSON ({_one_line(e)})") from e
  version = meta.get("format_version") if isinstance(meta, dict) else None
  if version != FORMAT_VERSION:
    raise ValueError(f"{file}: format_version {version!r}; this moment_jax reads {FORMAT_VERSION}")
  return meta


def _pytree_dir(path: str) -> str:
  """`path` if it is an orbax PyTree checkpoint, or its one PyTree item (a step of a
  `CheckpointManager` saved with `Composite`)."""
  if not os.path.isdir(path):
    raise ValueError(f"{path}: not an orbax checkpoint directory")
  if os.path.isfile(os.path.join(path, "_METADATA")):
    return path
  subdirs = sorted(
    d
    for d in os.listdir(path)
    if os.path.isdir(os.path.join(path, d)) and "orbax-checkpoint-tmp" not in d
  )
  items = [d for d in subdirs if os.path.isfile(os.path.join(path, d, "_METADATA"))]
  if len(items) == 1:
    return os.path.join(path, items[0])
  if items:
    raise ValueError(
      f"{path}: holds several orbax items ({', '.join(items)}); point at the "
      f"one with params and batch_stats"
    )
  if subdirs and all(d.isdigit() for d in subdirs):
    raise ValueError(
      f"{path}: holds the checkpoint steps {', '.join(subdirs)}; point at one of them"
    )
  raise ValueError(f"{path}: not an orbax checkpoint (no _METADATA)")


def _restore(path: str) -> Any:
  """The whole PyTree of an orbax checkpoint, on the default device."""
  ocp = _orbax()
  item = os.path.abspath(_pytree_dir(path))  # orbax resolves relative paths elsewhere
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  try:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      meta = ckptr.metadata(item)
      item_meta = getattr(meta, "item_metadata", meta)  # StepMetadata since orbax 0.11.x
      tree = getattr(item_meta, "tree", item_meta)
      if not isinstance(tree, Mapping):
        raise ValueError("no PyTree metadata")
      # A target from the metadata: restore onto this machine's device whatever
      # the devices the checkpoint was written from.
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
      return ckptr.restore(item, args=ocp.args.StandardRestore(target))
  except Exception as e:  # orbax and tensorstore raise many types
    raise ValueError(f"{path}: cannot restore the orbax checkpoint ({_one_line(e)})") from e


def _select(tree: Any, prefix: str, path: str) -> dict[str, Any]:
  """`{"params": tree["params"][prefix], "batch_stats": ...}`; `prefix` a "/" path."""
  if not isinstance(tree, Mapping) or "params" not in tree:
    keys = ", ".join(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
    raise ValueError(
      f"{path}: expected a tree with top-level params and batch_stats (a "
      f"head's variables or a train state), found {keys}"
    )
  parts = [p for p in prefix.split("/") if p]
  out = {}
  for collection in ("params", "batch_stats"):
    node = tree.get(collection, {})
    for i, part in enumerate(parts):
      if not isinstance(node, Mapping) or part not in node:
        where = "/".join([collection, *parts[:i]])
        found = ", ".join(map(str, node)) if isinstance(node, Mapping) else "a leaf"
        raise ValueError(f"{path}: no {where}/{part} (prefix {prefix!r}); {where} holds {found}")
      node = node[part]
    out[collection] = node
  return out


def load(
  path: str | os.PathLike, head: MomentHead | HeadConfig | None = None, *, prefix: str = ""
) -> tuple[HeadConfig, dict[str, Any]]:
  """The configuration and variables of an orbax checkpoint of the head.

  Args:
    path: a directory written by `save` (or `moment-jax convert`), or a
      training checkpoint: an orbax PyTree with top-level `params` and
      `batch_stats` (a train state; other entries such as `opt_state` are
      ignored), or a `CheckpointManager` step directory with one such item.
    head: optional Linen head or `HeadConfig`. With `moment_jax.json`
      present, its fields must equal the stored ones except `RUNTIME_FIELDS`
      (remat, chunking, dtypes, precision, dropout: how the head runs, not
      what the weights mean), which come from `head`. Required without
      `moment_jax.json`.
    prefix: the head's path inside `params` and `batch_stats`, e.g.
      `"moment"` for `{"params": {"moment": {...}, "embed": ...}}`.

  Returns:
    `(config, variables)`: `head`'s configuration if given, else the stored
    one; `{"params", "batch_stats"}` of JAX arrays, `params` in the
    configuration's parameter dtype. `MomentHead.from_config(config)` is the head.

  Raises:
    ValueError: a configuration that differs (every field listed), weights
      that do not fit it (every leaf listed), a directory that is not an
      orbax checkpoint. FileNotFoundError: no `path`.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  meta = metadata(path) if os.path.isdir(path) else None
  if meta is None and head is None:
    raise ValueError(
      f"{path}: has no {CONFIG_FILE} (not written by moment_jax.convert.save "
      f"or `moment-jax convert`); give the head's configuration (head=..., "
      f"or --preset)"
    )
  stored = (
    None if meta is None else _config_from_json(meta.get("config"), os.path.join(path, CONFIG_FILE))
  )
  cfg = _as_config(head) if head is not None else stored
  assert cfg is not None
  if stored is not None and head is not None:
    _check_same_config(stored, cfg, path)
  variables = _select(_restore(path), prefix, path)
  leaves = _trees.flat(variables)
  entries, d_in = _check_variables(
    {k: np.shape(v) for k, v in leaves.items()}, cfg, path, outcome="nothing was loaded"
  )
  if meta is not None and meta.get("d_in") != d_in:
    raise ValueError(
      f"{path}: the weights are for d_in={d_in}, {CONFIG_FILE} says {meta.get('d_in')!r}"
    )
  _check_floating(leaves, path)
  param_dtype = cfg.resolved_policy().param_dtype
  return cfg, _nest(
    {
      e.flax_key: jnp.asarray(
        leaves[e.flax_key], param_dtype if e.flax_path[0] == "params" else None
      )
      for e in entries
    }
  )
