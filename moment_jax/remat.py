"""Rematerialisation (gradient checkpointing) policies for the feature pipeline."""

from __future__ import annotations

from typing import Any, Callable

import jax

__all__ = ["CHECKPOINT_NAMES", "PIPELINE_POLICIES", "resolve_remat"]

# Policies that trade recomputation for memory in the moment pipeline itself.
PIPELINE_POLICIES = ("isqrt", "features")
# Factories of jax.checkpoint_policies that take checkpoint names; the other
# factories (offloading, combining policies) need arguments a string cannot
# carry: pass the policy they build as a callable.
_NAMED_FACTORIES = (
  "save_only_these_names",
  "save_any_names_but_these",
  "save_anything_except_these_names",
)
_OTHER_FACTORIES = (
  "offload_dot_with_no_batch_dims",
  "save_and_offload_only_these_names",
  "save_from_both_policies",
)
CHECKPOINT_NAMES = ("moment", "sqrtm", "features")


def _jax_policy_names() -> list[str]:
  return sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))


def resolve_remat(
  policy: str | Callable[..., Any] | None,
) -> tuple[bool, Callable[..., Any] | None]:
  """Resolves a `remat_policy` value.

  Args:
    policy: `None` (no recomputation); `"isqrt"` (the Newton–Schulz loop is
      recomputed in the backward pass, with a checkpointed loop body);
      `"features"` (everything before the Dense layer is recomputed; only
      the inputs are kept; the recomputed loop is checkpointed as with
      `"isqrt"`); a name of `jax.checkpoint_policies`, optionally
      with checkpoint names for the name-based factories, e.g.
      `"save_only_these_names:moment,sqrtm"`; or a policy callable.

  Returns:
    `(remat_isqrt, checkpoint_policy)`: whether the square root is recomputed
    with a checkpointed body, and the policy for `jax.checkpoint` around the
    whole pipeline (`None`: no checkpoint around it).
  """
  if policy is None:
    return False, None
  if callable(policy):
    return False, policy
  if not isinstance(policy, str):
    raise ValueError(f"remat_policy: expected None, a str or a callable, got {policy!r}")
  if policy == "isqrt":
    return True, None
  if policy == "features":
    # Recompute everything; inside that recomputation the loop is rematted
    # too, so a chunk's backward holds one matrix per iteration.
    return True, jax.checkpoint_policies.nothing_saveable
  name, _, args = policy.partition(":")
  valid = _jax_policy_names()
  if name not in valid:
    raise ValueError(
      f"remat_policy: unknown policy {policy!r}; valid values are None, "
      f"{', '.join(repr(p) for p in PIPELINE_POLICIES)}, a callable, or a name of "
      f"jax.checkpoint_policies: {', '.join(valid)}"
    )
  fn = getattr(jax.checkpoint_policies, name)
  if name in _OTHER_FACTORIES:
    raise ValueError(
      f"remat_policy: {name!r} builds a policy from arguments; pass "
      f"jax.checkpoint_policies.{name}(...) itself as remat_policy"
    )
  if name in _NAMED_FACTORIES:
    names = [a.strip() for a in args.split(",") if a.strip()]
    bad = [n for n in names if n not in CHECKPOINT_NAMES]
    if bad:
      raise ValueError(
        f"remat_policy: unknown checkpoint names {bad} in {policy!r}; "
        f"the pipeline tags {', '.join(CHECKPOINT_NAMES)}"
      )
    return False, fn(*names)
  if args:
    raise ValueError(f"remat_policy: {name!r} takes no names, got {policy!r}")
  return False, fn
