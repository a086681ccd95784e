"""Accuracy of the square root against the float64 `eigh` root.

Run from the repository root (one call; on a GPU for the tf32 rows):

  PYTHONPATH=. python benchmarks/accuracy.py --out out/
  PYTHONPATH=. python benchmarks/accuracy.py --dim 64 --tokens 16 --vit-steps 20  # CPU smoke run

For three token families at N=196, D=768:

* gaussian: i.i.d. N(0, 1) tokens;
* lowrank: rank-16 tokens with a decaying spectrum plus 0.05 noise;
* vit: tokens of the digits example's ViT backbone (examples/digits.py,
  width D, images resized to 28x28, 2x2 patches: 196 tokens), trained here
  with its moment head for --vit-steps steps; held-out images.

it computes the moment as the head does (centring and `centered_moment` in
the policy's moment dtype) and its square root for K = 1..10 Newton–Schulz
iterations, both normalisations and the precision policies float32 (highest),
tf32 (GPU only: XLA:CPU has no TF32) and bfloat16, plus the float32 `eigh`
root. The error of a sample is ||S - S64||_F / ||S64||_F, with S64 the
float64 `eigh` root of the float64 moment; the tables give the mean over
--batch samples. A second scan runs K up to 40 and reports, per family,
policy, normalisation and loop form (Z-only or coupled Y, Z), the best K and
the first K whose error is over twice the best or not finite ("diverges").
With --cost it also times the forward square root of a [64, D, D] batch
of moments (median of synchronised runs) for Newton–Schulz at K = 3, 5, 10
and for `eigh`, in float32 at highest precision. Prints the tables and
writes accuracy.json under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moment_jax.ops import center, centered_moment, sqrtm_eigh, sqrtm_newton_schulz
from moment_jax.ops.sqrtm import Z_ONLY_MAX_ITERATIONS
from moment_jax.precision import get_policy

FAMILIES = ("gaussian", "lowrank", "vit")
POLICIES = ("float32", "tf32", "bfloat16")
NORMS = ("trace", "frobenius")
EPS = 1e-5


def load_digits_example():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "digits.py")
  spec = importlib.util.spec_from_file_location("digits_example", path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["digits_example"] = mod
  spec.loader.exec_module(mod)
  return mod


def vit_tokens(batch: int, tokens: int, dim: int, steps: int, seed: int) -> np.ndarray:
  """`[batch, tokens, dim]` backbone tokens of held-out digits after training."""
  digits = load_digits_example()
  side = int(round(tokens**0.5))
  if side * side != tokens:
    raise ValueError(f"--tokens: the vit family needs a square count, got {tokens}")
  cfg = dataclasses.replace(
    digits.Config(),
    width=dim,
    image_size=2 * side,
    patch=2,
    steps=steps,
    eval_every=steps,
    warmup=max(1, steps // 10),
    seed=seed,
  )
  data = digits.load_digits()
  state, history = digits.train("moment", cfg, data, progress=False)
  model = digits.DigitsViT("moment", cfg)
  _, inter = model.apply(
    {"params": state["params"], "batch_stats": state["batch_stats"]},
    jnp.asarray(data[2][:batch]),
    train=False,
    capture_intermediates=lambda m, _: m.name == "norm",
  )
  print(
    f"vit: digits backbone width {dim}, {tokens} tokens, {steps} steps, held-out "
    f"accuracy {history['test_accuracy'][-1]:.4f}",
    flush=True,
  )
  return np.asarray(inter["intermediates"]["norm"]["__call__"][0], np.float32)


def make_tokens(
  family: str, batch: int, tokens: int, dim: int, seed: int, vit_steps: int
) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if family == "gaussian":
    return rng.standard_normal((batch, tokens, dim)).astype(np.float32)
  if family == "lowrank":
    rank = min(16, dim)
    coef = rng.standard_normal((batch, tokens, rank)) * (0.7 ** np.arange(rank))
    basis = rng.standard_normal((batch, rank, dim)) / np.sqrt(dim)
    noise = 0.05 * rng.standard_normal((batch, tokens, dim))
    return (coef @ basis * np.sqrt(dim) + noise).astype(np.float32)
  if family == "vit":
    return vit_tokens(batch, tokens, dim, vit_steps, seed)
  raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")


def reference_roots(x: np.ndarray) -> np.ndarray:
  """float64 `eigh` roots of docs/math.md's moment of `x` `[batch, tokens, dim]`."""
  h = x.astype(np.float64)
  hc = h - h.mean(1, keepdims=True)
  m = np.einsum("bnd,bne->bde", hc, hc) / h.shape[1] + EPS * np.eye(h.shape[-1])
  w, v = np.linalg.eigh(m)
  return (v * np.sqrt(np.maximum(w, 0))[:, None, :]) @ np.swapaxes(v, -1, -2)


def moment(x: jax.Array, policy) -> jax.Array:
  """The head's moment: tokens in the compute dtype, moment in the moment dtype."""
  h = x.astype(policy.compute_dtype).astype(policy.moment_dtype)
  hc, n = center(h, None, dtype=policy.moment_dtype)
  return centered_moment(hc, n, EPS, precision=policy.matmul, accumulate=policy.moment_dtype)


def rel_errors(s: jax.Array, ref: np.ndarray) -> np.ndarray:
  s = np.asarray(s.astype(jnp.float32), np.float64)
  with np.errstate(all="ignore"):
    return np.linalg.norm(s - ref, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))


def summary(errs: np.ndarray) -> float:
  return float(np.mean(errs)) if np.all(np.isfinite(errs)) else float("nan")


@jax.jit
def _eigh_root(m):
  return sqrtm_eigh(m)


def root_fn(k: int, norm: str, policy_name: str, coupled: bool | None):
  policy = get_policy(policy_name)

  @jax.jit
  def fn(x):
    m = moment(x, policy)
    return sqrtm_newton_schulz(
      m,
      k,
      normalization=norm,
      dtype=policy.moment_dtype,
      precision=policy.matmul,
      coupled=coupled,
      stability_check=False,
    )  # the scan measures divergence

  return fn


def cost(dim: int, batch: int = 64, reps: int = 10) -> list[dict]:
  """Forward time of each root on `[batch, dim, dim]` moments, float32 highest."""
  x = jnp.asarray(make_tokens("gaussian", batch, 196, dim, 0, 0))
  m = jax.block_until_ready(moment(x, get_policy("float32")))
  fns = {
    f"newton_schulz K={k}": jax.jit(lambda a, k=k: sqrtm_newton_schulz(a, k, precision="highest"))
    for k in (3, 5, 10)
  }
  fns["eigh"] = _eigh_root
  rows = []
  for name, fn in fns.items():
    jax.block_until_ready(fn(m))
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(fn(m))
      times.append(time.perf_counter() - t)
    rows.append({"root": name, "batch": batch, "ms": 1e3 * statistics.median(times)})
  return rows


def divergence(ks: list[int], errs: list[float]) -> dict:
  """Best K and the first K after it with error > 2x best or not finite."""
  finite = [(e, k) for k, e in zip(ks, errs) if np.isfinite(e)]
  if not finite:
    return {"best_k": None, "best_error": None, "diverges_at": ks[0]}
  best_e, best_k = min(finite)
  bad = [k for k, e in zip(ks, errs) if k > best_k and (not np.isfinite(e) or e > 2 * best_e)]
  return {"best_k": best_k, "best_error": best_e, "diverges_at": bad[0] if bad else None}


def fmt(e: float) -> str:
  return "   nan" if not np.isfinite(e) else (f"{e:6.3f}" if e >= 0.01 else f"{e:6.0e}")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--families", nargs="*", choices=FAMILIES, default=list(FAMILIES))
  p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--tokens", type=int, default=196)
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--iterations", type=int, nargs="+", default=list(range(1, 11)))
  p.add_argument(
    "--scan",
    type=int,
    nargs="*",
    default=[12, 15, 20, 25, 30, 40],
    help="extra K for the divergence scan",
  )
  p.add_argument("--vit-steps", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cost", action="store_true", help="also time each root (forward)")
  p.add_argument("--out", default=os.environ.get("OUT"))
  a = p.parse_args(argv)

  backend = jax.default_backend()
  policies = [q for q in a.policies if q != "tf32" or backend == "gpu"]
  if len(policies) < len(a.policies):
    print("tf32: skipped (XLA:CPU computes DEFAULT-precision float32 products in float32)")
  dev = jax.devices()[0]
  print(
    f"device: {getattr(dev, 'device_kind', dev.platform)}; jax {jax.__version__}; "
    f"{time.strftime('%Y-%m-%d')}; N={a.tokens}, D={a.dim}, {a.batch} samples per family"
  )
  t0 = time.perf_counter()

  table, scan, eigh_rows = [], [], []
  all_ks = sorted(set(a.iterations) | set(a.scan))
  for fam in a.families:
    x = make_tokens(fam, a.batch, a.tokens, a.dim, a.seed, a.vit_steps)
    ref = reference_roots(x)
    xj = jnp.asarray(x)
    m32 = moment(xj, get_policy("float32"))
    eigh_rows.append({"family": fam, "error": summary(rel_errors(_eigh_root(m32), ref))})
    for pol in policies:
      for norm in NORMS:
        forms = {"auto": None, "z-only": False, "coupled": True}
        curves = {}
        for form, coupled in forms.items():
          ks = all_ks if form != "auto" else sorted(a.iterations)
          errs = [summary(rel_errors(root_fn(k, norm, pol, coupled)(xj), ref)) for k in ks]
          curves[form] = (ks, errs)
        ks, errs = curves["auto"]
        table.append(
          {"family": fam, "policy": pol, "normalization": norm, "errors": dict(zip(ks, errs))}
        )
        for form in ("z-only", "coupled"):
          ks, errs = curves[form]
          scan.append(
            {
              "family": fam,
              "policy": pol,
              "normalization": norm,
              "form": form,
              "errors": dict(zip(ks, errs)),
              **divergence(ks, errs),
            }
          )
    print(f"{fam}: done ({time.perf_counter() - t0:.0f} s)", flush=True)

  ks = sorted(a.iterations)
  print(
    f"\nrelative error ||S - S64||_F / ||S64||_F, mean of {a.batch} samples "
    f"(loop carries Z alone up to K={Z_ONLY_MAX_ITERATIONS}, Y and Z beyond)"
  )
  print(f"{'family':9} {'policy':9} {'norm':9} " + " ".join(f"{'K=' + str(k):>6}" for k in ks))
  for r in table:
    print(
      f"{r['family']:9} {r['policy']:9} {r['normalization']:9} "
      + " ".join(fmt(r["errors"][k]) for k in ks)
    )
  print("\nfloat32 eigh root: " + ", ".join(f"{r['family']} {r['error']:.1e}" for r in eigh_rows))
  print(
    f"\ndivergence scan, K in {all_ks}: best K (error) and the first K with error > 2x "
    "best or not finite"
  )
  print(
    f"{'family':9} {'policy':9} {'norm':9} {'form':8} {'best K':>6} {'error':>8} {'diverges':>8}"
  )
  for r in scan:
    be = "-" if r["best_error"] is None else f"{r['best_error']:.1e}"
    print(
      f"{r['family']:9} {r['policy']:9} {r['normalization']:9} {r['form']:8} "
      f"{str(r['best_k']):>6} {be:>8} {str(r['diverges_at'] or '-'):>8}"
    )
  costs = cost(a.dim) if a.cost else []
  if costs:
    print(f"\nforward cost, [64, {a.dim}, {a.dim}] float32 moments, highest precision")
    for r in costs:
      print(f"  {r['root']:18} {r['ms']:9.2f} ms")
  print(f"total {time.perf_counter() - t0:.0f} s")

  if a.out:
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "accuracy.json")
    with open(path, "w") as f:
      json.dump(
        {
          "device": str(getattr(dev, "device_kind", dev.platform)),
          "backend": backend,
          "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d"),
          "args": vars(a),
          "table": table,
          "scan": scan,
          "eigh_float32": eigh_rows,
          "cost": costs,
        },
        f,
        indent=1,
      )
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
