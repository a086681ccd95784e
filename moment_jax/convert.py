"""PyTorch <-> Flax weights of the moment head, without needing torch.

`torch_to_flax` turns a state_dict of `moment_jax.torch_reference.MomentHead`
(or of the original PyTorch design, which has the same keys) into the
`variables` of the Linen `moment_jax.MomentHead`; `flax_to_torch` goes back.
Values may be torch tensors, NumPy arrays (from `.npz` or `.safetensors`) or
JAX arrays; torch is imported only for `flax_to_torch(..., as_torch=True)`.

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
running variance than to Flax's (`running_mean` agrees). We keep Flax's convention (the Linen head is Flax's
own BatchNorm) and pin the factor in tests/test_torch_parity.py; with the
batch sizes a head trains on the difference is small (0.4% of the increment
at n = 256).

Example:
  >>> head = moment_jax.MomentHead.from_preset("optimized")
  >>> variables = torch_to_flax(torch_model.state_dict(), head)
  >>> out = head.apply(variables, tokens, graph, train=False)
  >>> torch_model.load_state_dict(flax_to_torch(variables, head, as_torch=True))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from moment_jax.linen import MomentHead, width_from_features
from moment_jax.ops.features import feature_size

__all__ = ["expected_shapes", "flax_to_torch", "torch_to_flax"]

# The token width's place in a shape when the checkpoint gives no valid width.
_FREE = None


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


_COUNTER = "mlp.1.num_batches_tracked"


def _entries(head: MomentHead, d_in: int | None) -> list[_Entry]:
  """The key map for `head`; with `d_in=None` the token width is left free."""
  head.validate()
  d_out, width = head.d_out, head.d_reduce if head.d_reduce is not None else d_in
  f = _FREE if width is None else feature_size(width, head.use_third_order, head.sketch_dim)
  out = []
  if head.d_reduce is not None:
    out += [_Entry("reduce.weight", ("params", "reduce", "kernel"), (head.d_reduce, d_in), True),
            _Entry("reduce.bias", ("params", "reduce", "bias"), (head.d_reduce,))]
  out += [
      _Entry("mlp.0.weight", ("params", "proj", "kernel"), (d_out, f), True),
      _Entry("mlp.0.bias", ("params", "proj", "bias"), (d_out,)),
      _Entry("mlp.1.weight", ("params", "norm", "scale"), (d_out,)),
      _Entry("mlp.1.bias", ("params", "norm", "bias"), (d_out,)),
      _Entry("mlp.1.running_mean", ("batch_stats", "norm", "mean"), (d_out,)),
      _Entry("mlp.1.running_var", ("batch_stats", "norm", "var"), (d_out,)),
  ]
  if head.mlp == "double":
    out += [_Entry("mlp.4.weight", ("params", "out", "kernel"), (d_out, d_out), True),
            _Entry("mlp.4.bias", ("params", "out", "bias"), (d_out,))]
  return out


def _fmt(shape: tuple[int | None, ...], head: MomentHead) -> str:
  """A shape for messages, the free width spelled out."""
  if head.d_reduce is not None:
    free = "d_in"
  else:
    free = "D(D+1)/2" + (f"+{head.sketch_dim}" if head.use_third_order else "")
  return "(" + ", ".join(free if s is _FREE else str(s) for s in shape) + (
      ",)" if len(shape) == 1 else ")")


def _width_from_features(f: int, head: MomentHead) -> int | None:
  """The `D` with `feature_size(D) == f` under `head`'s config, or None."""
  if f - (head.sketch_dim if head.use_third_order else 0) < 1:
    return None
  d = width_from_features(f, head.use_third_order, head.sketch_dim)
  return d if d >= 1 and feature_size(d, head.use_third_order, head.sketch_dim) == f else None


def _infer_d_in(shapes: Mapping[str, tuple[int, ...]], head: MomentHead,
                d_in: int | None) -> int | None:
  """The token width: `d_in` if given, else read from the checkpoint (None if unreadable)."""
  if d_in is not None:
    if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
      raise ValueError(f"d_in: expected None or an int >= 1, got {d_in!r}")
    return d_in
  if head.d_reduce is not None:
    shape = shapes.get("reduce.weight")
    return shape[1] if shape is not None and len(shape) == 2 else None
  shape = shapes.get("mlp.0.weight")
  if shape is None or len(shape) != 2:
    return None
  return _width_from_features(shape[1], head)


def _check(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple],
           head: MomentHead, what: str, optional: tuple[str, ...] = ()) -> None:
  """Raises one `ValueError` naming every missing, unexpected or misshapen key."""
  errors = []
  for key, shape in expected.items():
    if key not in found:
      if key not in optional:
        errors.append(f"  missing {key}: expected shape {_fmt(shape, head)}")
      continue
    got = tuple(found[key])
    # A free dimension means no width could be read from this very key: it is wrong.
    if len(got) != len(shape) or any(e is None or e != g for e, g in zip(shape, got)):
      errors.append(f"  {key}: expected shape {_fmt(shape, head)}, found {got}")
  for key in found:
    if key not in expected:
      errors.append(f"  unexpected {key}: found shape {tuple(found[key])}")
  if errors:
    cfg = (f"mlp={head.mlp!r}, d_out={head.d_out}, use_third_order={head.use_third_order}, "
           f"sketch_dim={head.sketch_dim}, d_reduce={head.d_reduce}")
    raise ValueError(f"{what}: does not match the head ({cfg}); nothing was converted:\n"
                     + "\n".join(errors))


def _to_numpy(x: Any) -> np.ndarray:
  """A NumPy view of a torch tensor, JAX or NumPy array (torch not imported)."""
  if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":  # NumPy has no bf16: widen exactly
      return x.float().numpy().astype(jnp.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _check_floating(arrays: Mapping[str, np.ndarray], what: str) -> None:
  bad = [f"  {k}: expected a floating dtype, found {a.dtype}" for k, a in arrays.items()
         if not jnp.issubdtype(a.dtype, jnp.floating)]
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


def expected_shapes(head: MomentHead, d_in: int) -> dict[str, tuple[int, ...]]:
  """The state_dict keys and shapes of a PyTorch head matching `head` at width `d_in`.

  Args:
    head: the Linen head (its `mlp`, `d_out`, `use_third_order`,
      `sketch_dim` and `d_reduce` matter).
    d_in: token width `D`.

  Returns:
    `{torch key: shape}` in the order of `torch_reference.MomentHead.state_dict()`,
    `mlp.1.num_batches_tracked` included as `()`.
  """
  if isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
    raise ValueError(f"d_in: expected an int >= 1, got {d_in!r}")
  entries = _entries(head, d_in)
  shapes = {e.torch_key: e.torch_shape for e in entries}
  shapes[_COUNTER] = ()
  return {k: shapes[k] for k in _torch_order(entries)}


def torch_to_flax(state_dict: Mapping[str, Any], head: MomentHead, *,
                  d_in: int | None = None, prefix: str = "") -> dict[str, Any]:
  """Flax `variables` of `head` from a PyTorch moment-head state_dict.

  Args:
    state_dict: `{key: tensor or array}` as in the module docstring's table;
      torch tensors, NumPy or JAX arrays (e.g. `dict(numpy.load("head.npz"))`).
    head: the Linen `moment_jax.MomentHead` the variables are for; its
      parameter dtype (`param_dtype` or `policy`) is the dtype of `params`.
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
  arrays = {k[len(prefix):]: _to_numpy(v) for k, v in state_dict.items()
            if k.startswith(prefix)}
  shapes = {k: a.shape for k, a in arrays.items()}
  entries = _entries(head, _infer_d_in(shapes, head, d_in))
  expected = {e.torch_key: e.torch_shape for e in entries}
  expected[_COUNTER] = ()
  _check(shapes, expected, head, "state_dict", optional=(_COUNTER,))
  arrays.pop(_COUNTER, None)
  _check_floating(arrays, "state_dict")
  param_dtype = head.resolved_policy().param_dtype
  variables: dict[str, Any] = {}
  for e in entries:
    a = arrays[e.torch_key]
    a = a.T if e.transpose else a
    dtype = param_dtype if e.flax_path[0] == "params" else jnp.float32
    node = variables
    for name in e.flax_path[:-1]:
      node = node.setdefault(name, {})
    # A copy: JAX on CPU may alias a NumPy buffer, which here can be a torch
    # tensor's storage that an optimizer later updates in place.
    node[e.flax_path[-1]] = jnp.array(a, dtype=dtype, copy=True)
  return variables


def _flatten(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, (*path, str(k))))
    else:
      out["/".join((*path, str(k)))] = v
  return out


def flax_to_torch(variables: Mapping[str, Any], head: MomentHead, *, as_torch: bool = False,
                  num_batches_tracked: int = 0, prefix: str = "") -> dict[str, Any]:
  """A PyTorch moment-head state_dict from the Flax `variables` of `head`.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of the Linen head
      (NumPy or JAX arrays); the token width is read from it.
    head: the Linen `moment_jax.MomentHead` they belong to.
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
  leaves = {k: _to_numpy(v) for k, v in _flatten(variables).items()}
  shapes = {k: a.shape for k, a in leaves.items()}
  d_in = None
  if head.d_reduce is not None:
    shape = shapes.get("params/reduce/kernel")
    d_in = shape[0] if shape is not None and len(shape) == 2 else None
  else:
    shape = shapes.get("params/proj/kernel")
    if shape is not None and len(shape) == 2:
      d_in = _width_from_features(shape[0], head)
  entries = _entries(head, d_in)
  _check(shapes, {e.flax_key: e.flax_shape for e in entries}, head, "variables")
  _check_floating(leaves, "variables")
  if isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked, int) \
      or num_batches_tracked < 0:
    raise ValueError(
        f"num_batches_tracked: expected an int >= 0, got {num_batches_tracked!r}")
  out = {e.torch_key: np.array(leaves[e.flax_key].T if e.transpose else leaves[e.flax_key],
                               order="C", copy=True) for e in entries}
  out[_COUNTER] = np.asarray(num_batches_tracked, np.int64)
  out = {prefix + k: out[k] for k in _torch_order(entries)}
  if as_torch:
    import torch  # pylint: disable=import-outside-toplevel
    out = {k: (torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
               if v.dtype == jnp.bfloat16 else torch.from_numpy(v)) for k, v in out.items()}
  return out
