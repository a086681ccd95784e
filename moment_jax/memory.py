"""Memory measurement: one function per figure of docs/math.md section 10.

* `residual_bytes`: what a forward saves for its backward;
* `compiled_memory`: the compiled function's `memory_analysis()` (CPU and GPU);
* `device_peak`: the device's peak bytes above what was in use, in a fresh
  process (GPU; `peak_bytes_in_use` cannot be reset within a process);
* `step_bill`: parameters, gradients, optimizer state and activations of one
  optax training step;
* `suggest_batch_size`: the largest batch whose step fits a budget.

Arguments may be arrays or `jax.ShapeDtypeStruct`s: everything except
`device_peak` works from shapes alone and allocates nothing.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from moment_jax import steps

__all__ = [
  "CompiledMemory",
  "StepBill",
  "compiled_memory",
  "device_peak",
  "head_device_peaks",
  "head_residual_bytes",
  "make_train_step",
  "nbytes",
  "residual_bytes",
  "residuals",
  "step_bill",
  "suggest_batch_size",
]

MB = 1e6


def nbytes(tree: Any) -> int:
  """Bytes of the array (or shape-struct) leaves of `tree`."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _shape_struct(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "shape"):
    return x
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _shapes(args: Any) -> Any:
  """Shape structs for the array leaves of `args` (other leaves kept)."""
  return jax.tree.map(_shape_struct, args)


def residuals(fn: Callable[..., Any], *args: Any) -> list[tuple[Any, str]]:
  """`(shape struct, provenance)` of each value `fn`'s forward saves for its backward.

  Wraps JAX's saved-residuals listing (the list that
  `jax.ad_checkpoint.print_saved_residuals` prints), traced from shapes.
  """
  from jax._src.ad_checkpoint import saved_residuals  # the list behind print_saved_residuals

  return saved_residuals(fn, *_shapes(args))


def residual_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """Bytes `fn`'s forward saves for the backward, excluding its arguments.

  Arguments (parameters, inputs) are resident anyway and are not counted;
  differentiating with respect to only some arguments is expressed by
  closing over the others.
  """
  return sum(
    nbytes(aval) for aval, why in residuals(fn, *args) if not why.startswith("from the argument")
  )


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """`memory_analysis()` of a compiled function, in bytes."""

  temp: int
  argument: int
  output: int
  alias: int
  generated_code: int

  @property
  def peak_estimate(self) -> int:
    """Arguments, outputs (less donated aliases) and temps alive at once."""
    return self.argument + self.output - self.alias + self.temp


def compiled_memory(
  fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = (), jitted: bool = False
) -> CompiledMemory:
  """Compiles `fn` for `args` (arrays or shape structs) and reads its memory analysis.

  Args:
    fn: a function, or a `jax.jit`-wrapped one with `jitted=True`.
    *args: example arguments; only shapes and dtypes are used.
    donate_argnums: arguments whose buffers the step may reuse.
  """
  f: Any = fn if jitted else jax.jit(fn, donate_argnums=donate_argnums)
  m = f.lower(*_shapes(args)).compile().memory_analysis()
  return CompiledMemory(
    temp=int(m.temp_size_in_bytes),
    argument=int(m.argument_size_in_bytes),
    output=int(m.output_size_in_bytes),
    alias=int(m.alias_size_in_bytes),
    generated_code=int(m.generated_code_size_in_bytes),
  )


# -- device peaks ----------------------------------------------------------------


def _materialize(x: Any, seed: int) -> Any:
  """A host array for a shape struct (random floats, a PRNG key, zeros otherwise)."""
  if not isinstance(x, jax.ShapeDtypeStruct):
    return np.asarray(x) if hasattr(x, "shape") else x
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key(seed)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
  return np.zeros(x.shape, x.dtype)


def _peak_worker(fn, args, queue):
  try:
    dev = jax.devices()[0]
    compiled = jax.jit(fn).lower(*_shapes(args)).compile()
    leaves, tree = jax.tree.flatten(args)
    on_device = jax.tree.unflatten(
      tree, [jax.device_put(_materialize(a, i), dev) for i, a in enumerate(leaves)]
    )
    jax.block_until_ready(on_device)
    stats = dev.memory_stats() or {}
    before = stats.get("bytes_in_use")
    if before is None:
      queue.put(("err", f"{dev.platform} reports no memory_stats()"))
      return
    peak_before = stats.get("peak_bytes_in_use", before)
    jax.block_until_ready(compiled(*on_device))
    peak = dev.memory_stats()["peak_bytes_in_use"]
    queue.put(
      (
        "ok",
        dict(
          peak=peak - before,
          before=before,
          earlier_peak=peak_before - before,
          device=dev.device_kind,
        ),
      )
    )
  except Exception as e:  # report, don't hang the parent
    queue.put(("err", f"{type(e).__name__}: {e}"))


def device_peak(fn: Callable[..., Any], *args: Any, timeout: float = 600.0) -> dict[str, Any]:
  """Peak device bytes of one call of jitted `fn` above the bytes in use before it.

  Runs in a fresh (spawned) process, since a process's `peak_bytes_in_use`
  cannot be reset: the process compiles first (autotuning off, so it
  allocates nothing that could set the peak), then places the arguments,
  built on the host from their shapes, then runs `fn` once. `fn` and `args`
  must be picklable (a module-level function, `functools.partial`, a Flax
  module). Returns `peak` (bytes above `before`), `before`, `earlier_peak`
  (any higher mark set before the call; 0 unless something leaked) and the
  device name.

  Raises:
    RuntimeError: the backend reports no memory statistics (e.g. CPU), or
      the measurement failed.
  """
  ctx = multiprocessing.get_context("spawn")
  queue = ctx.Queue()
  env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  flags = os.environ.get("XLA_FLAGS", "")
  if "autotune_level" not in flags:
    env["XLA_FLAGS"] = (flags + " --xla_gpu_autotune_level=0").strip()
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    proc = ctx.Process(target=_peak_worker, args=(fn, args, queue))
    proc.start()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  try:
    status, value = queue.get(timeout=timeout)
  finally:
    proc.join(timeout=30)
    if proc.is_alive():
      proc.kill()
  if status != "ok":
    raise RuntimeError(f"device_peak: {value}")
  return value


# -- the whole bill of a training step ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepBill:
  """Bytes of one optax training step of a head (see `step_bill`)."""

  params: int
  batch_stats: int
  grads: int
  opt_state: int
  inputs: int
  activations: int

  @property
  def total(self) -> int:
    return (
      self.params + self.batch_stats + self.grads + self.opt_state + self.inputs + self.activations
    )

  def as_mb(self) -> dict[str, float]:
    d = {k: v / MB for k, v in dataclasses.asdict(self).items()}
    d["total"] = self.total / MB
    return d


def make_train_step(
  head: Any, optimizer: Any, graph: Any = None, token_grad: bool = True
) -> Callable[..., Any]:
  """Jitted optax step `(params, opt_state, batch_stats, tokens, key) -> (params,
  opt_state, batch_stats, loss[, d_tokens])`, donating params and optimizer state."""
  import optax

  grad_fn = jax.value_and_grad(
    steps.make_loss(head, graph), argnums=(0, 2) if token_grad else 0, has_aux=True
  )

  def step(params, opt_state, batch_stats, tokens, key):
    (loss, stats), grads = grad_fn(params, batch_stats, tokens, key)
    g_params = grads[0] if token_grad else grads
    updates, opt_state = optimizer.update(g_params, opt_state, params)
    params = optax.apply_updates(params, updates)
    if token_grad:
      return params, opt_state, stats, loss, grads[1]
    return params, opt_state, stats, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def step_bill(
  head: Any,
  batch_shape: tuple[int, int, int],
  optimizer: Any,
  graph: Any = None,
  token_grad: bool = True,
  dtype: Any = jnp.float32,
) -> StepBill:
  """Parameters, gradients, optimizer state, inputs and activations of one step.

  From compiled analysis of `make_train_step` (nothing is allocated):
  activations are the step's temp bytes; gradients are the size of the
  parameters (held at once by the update); inputs are the tokens and, with
  `token_grad`, their gradient.
  """
  shapes = steps.variable_shapes(head, batch_shape, graph, dtype)
  params, stats = shapes["params"], shapes.get("batch_stats", {})
  opt_state = jax.eval_shape(optimizer.init, params)
  tokens = jax.ShapeDtypeStruct(batch_shape, dtype)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  mem = compiled_memory(
    make_train_step(head, optimizer, graph, token_grad),
    params,
    opt_state,
    stats,
    tokens,
    key,
    jitted=True,
  )
  return StepBill(
    params=nbytes(params),
    batch_stats=nbytes(stats),
    grads=nbytes(params),
    opt_state=nbytes(opt_state),
    inputs=nbytes(tokens) * (2 if token_grad else 1),
    activations=mem.temp,
  )


def suggest_batch_size(
  head: Any,
  tokens_shape: tuple[int, int],
  budget_bytes: int,
  optimizer: Any = None,
  graph: Any = None,
  token_grad: bool = True,
  max_batch: int = 1 << 16,
) -> int:
  """The largest batch whose training step's bill fits `budget_bytes` (0 if none).

  The JAX answer to "if total_memory < 8e9: batch_size = 2": doubling, then
  bisection, over compiled analyses of the step (about 2 log2(B) compiles).

  Args:
    head: the head.
    tokens_shape: `(tokens, dim)` of one sample.
    budget_bytes: memory available for the step.
    optimizer: optax optimizer (default `optax.adamw(1e-3)`).
    graph: the graph passed to the head.
    token_grad: the step also returns the tokens' gradient.
    max_batch: upper end of the search.
  """
  import optax

  optimizer = optimizer if optimizer is not None else optax.adamw(1e-3)
  if budget_bytes <= 0:
    raise ValueError(f"budget_bytes: expected a positive byte count, got {budget_bytes!r}")
  fits = lambda b: (
    step_bill(head, (b, *tokens_shape), optimizer, graph, token_grad).total <= budget_bytes
  )
  if not fits(1):
    return 0
  lo, hi = 1, 2
  while hi <= max_batch and fits(hi):
    lo, hi = hi, hi * 2
  hi = min(hi, max_batch + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo


def head_residual_bytes(
  head: Any,
  batch_shape: tuple[int, int, int],
  graph: Any = None,
  token_grad: bool = True,
  dtype: Any = jnp.float32,
) -> int:
  """`residual_bytes` of a head's training-mode forward (loss of `steps.make_loss`).

  Without `token_grad` the tokens are a constant of the differentiation (the
  seed's scenario: the head alone, with no backbone below it).
  """
  shapes = steps.variable_shapes(head, batch_shape, graph, dtype)
  loss = steps.make_loss(head, graph)

  def fwd(params, batch_stats, tokens):
    if not token_grad:
      tokens = jax.lax.stop_gradient(tokens)
    return loss(params, batch_stats, tokens, jax.random.key(0))[0]

  return residual_bytes(
    fwd, shapes["params"], shapes["batch_stats"], jax.ShapeDtypeStruct(batch_shape, dtype)
  )


# -- device-peak scenarios (module-level, so a spawned process can unpickle them) --


def forward_fn(head: Any, graph: Any = None, token_grad: bool = True) -> Callable[..., Any]:
  """`(params, batch_stats, tokens, key) -> (loss, vjp)`: a training-mode forward that
  keeps what its backward needs (the JAX analogue of a PyTorch forward that keeps
  its autograd graph). Its device peak is docs/math.md's *forward activations*."""
  return _Forward(head, graph, token_grad)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity for jit
class _Forward:
  head: Any
  graph: Any
  token_grad: bool

  def __call__(self, params, batch_stats, tokens, key):
    loss = steps.make_loss(self.head, self.graph)
    if self.token_grad:
      out, vjp = jax.vjp(lambda p, t: loss(p, batch_stats, t, key)[0], params, tokens)
    else:
      out, vjp = jax.vjp(lambda p: loss(p, batch_stats, tokens, key)[0], params)
    # Return the residuals, less those that are the inputs themselves: a jit
    # output that is an input would be a copy, which no real step makes.
    inputs = {id(x) for x in jax.tree.leaves((params, batch_stats, tokens))}
    return out, [r for r in jax.tree.leaves(vjp) if id(r) not in inputs]


@dataclasses.dataclass(frozen=True, eq=False)
class _GradStep:
  head: Any
  graph: Any
  token_grad: bool

  def __call__(self, params, batch_stats, tokens, key):
    return steps.make_grad_step(self.head, self.graph, self.token_grad)(
      params, batch_stats, tokens, key
    )


def grad_step_fn(head: Any, graph: Any = None, token_grad: bool = True) -> Callable[..., Any]:
  """Picklable `steps.make_grad_step`; its device peak, less the gradients it
  returns, is docs/math.md's *step activations*."""
  return _GradStep(head, graph, token_grad)


def head_device_peaks(
  head: Any, batch_shape: tuple[int, int, int], graph: Any = None, token_grad: bool = True
) -> dict[str, Any]:
  """Forward and step activations of a head on the default GPU, in bytes.

  forward: peak of `forward_fn` above parameters and inputs; step: peak of the
  gradient step above them, minus the gradients (parameters' and, with
  `token_grad`, the tokens') that any step must return.
  """
  shapes = steps.variable_shapes(head, batch_shape, graph)
  args = (
    shapes["params"],
    shapes["batch_stats"],
    jax.ShapeDtypeStruct(batch_shape, jnp.float32),
    jax.ShapeDtypeStruct((), jax.random.key(0).dtype),
  )
  fwd = device_peak(forward_fn(head, graph, token_grad), *args)
  stp = device_peak(grad_step_fn(head, graph, token_grad), *args)
  grads = nbytes(shapes["params"]) + (nbytes(args[2]) if token_grad else 0)
  return dict(
    forward=fwd["peak"],
    step=stp["peak"] - grads,
    step_raw=stp["peak"],
    grads=grads,
    device=fwd["device"],
    earlier_peak=max(fwd["earlier_peak"], stp["earlier_peak"]),
  )
