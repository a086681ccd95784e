"""HeadConfig: the one configuration both heads, the converter and the reference read."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from moment_jax import PRESET_NAMES, HeadConfig, MomentHead, preset
from moment_jax import config as config_mod
from moment_jax.nnx import MomentHead as NNXHead
from moment_jax.torch_reference import MomentHead as TorchHead


def test_linen_fields_are_the_config_fields():
  """The Linen head keeps HeadConfig's fields flat, with the same names,
  order and defaults: the config is their one source of truth."""
  linen = [
    (f.name, f.default) for f in dataclasses.fields(MomentHead) if f.name not in ("parent", "name")
  ]
  config = [(f.name, f.default) for f in dataclasses.fields(HeadConfig)]
  assert linen == config
  assert config_mod.FIELDS == tuple(name for name, _ in config)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_presets_and_round_trips(name):
  cfg = HeadConfig.from_preset(name, d_out=8)
  assert cfg.d_out == 8
  assert {k: getattr(cfg, k) for k in preset(name) if k != "d_out"} == {
    k: v for k, v in preset(name).items() if k != "d_out"
  }
  linen = MomentHead.from_config(cfg)
  assert linen.config == cfg
  assert MomentHead.from_preset(name, d_out=8).config == cfg
  model = NNXHead(12, cfg, rngs=nnx.Rngs(0))
  assert model.config == cfg and model.d_out == 8 and model.mlp == cfg.mlp
  assert NNXHead.from_preset(name, 12, d_out=8, rngs=nnx.Rngs(0)).config == cfg


def test_feature_widths():
  cfg = HeadConfig(use_third_order=True, sketch_dim=16)
  assert cfg.feature_size(8) == 36 + 16
  assert cfg.width_from_features(36 + 16) == 8
  assert cfg.width_from_features(37 + 16) is None  # no width has 37 triangle entries
  assert cfg.width_from_features(10) is None
  assert HeadConfig(d_reduce=4).feature_size(768) == 10


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf"), True, "1e-5"])
def test_eps_must_be_positive(eps):
  # eps=0 with constant tokens makes the moment's trace zero: 0/0 in Newton–Schulz.
  with pytest.raises(ValueError, match=r"eps: expected a float > 0, got"):
    HeadConfig(eps=eps).validate()
  with pytest.raises(ValueError, match=r"eps: expected a float > 0"):
    MomentHead(eps=eps).init(jax.random.key(0), jnp.ones((2, 4, 3)), train=False)
  with pytest.raises(ValueError, match=r"eps: expected a float > 0"):
    NNXHead(3, eps=eps, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"eps: expected a float > 0"):
    TorchHead(3, eps=eps)


@pytest.mark.parametrize(
  "field,value", [("dtype", jnp.bfloat16), ("param_dtype", jnp.bfloat16), ("precision", "highest")]
)
def test_policy_with_dtype_fields_is_refused(field, value):
  with pytest.raises(ValueError, match=rf"policy: 'bfloat16' .* cannot be combined with {field}="):
    HeadConfig(policy="bfloat16", **{field: value}).validate()
  with pytest.raises(ValueError, match=rf"cannot be combined with {field}="):
    NNXHead(3, policy="bfloat16", rngs=nnx.Rngs(0), **{field: value})
  # Either alone is fine.
  HeadConfig(policy="bfloat16").validate()
  HeadConfig(**{field: value}).validate()


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(d_out=True), r"d_out: expected an int >= 1, got True"),
    (dict(d_reduce=0), r"d_reduce: expected None or an int >= 1, got 0"),
    (dict(isqrt_chunk=0), r"isqrt_chunk: expected None or an int >= 1, got 0"),
    (dict(sketch_seed=-1), r"sketch_seed: expected an int >= 0, got -1"),
    (dict(dropout_rate=True), r"dropout_rate: expected a value in \[0, 1\)"),
    (dict(mlp="triple"), r"mlp: expected one of single, double, got 'triple'"),
    (dict(isqrt_space="gram"), r"isqrt_space: expected one of auto, channel, token"),
    (dict(check_values="always"), r"check_values: expected a bool, 'callback' or 'checkify'"),
  ],
)
def test_bad_fields_named(kwargs, match):
  with pytest.raises(ValueError, match=match):
    HeadConfig(**kwargs).validate()


def test_nnx_rejects_unknown_fields():
  with pytest.raises(TypeError, match=r"unknown fields \['d_outt'\]"):
    NNXHead(3, d_outt=4, rngs=nnx.Rngs(0))


def test_config_is_frozen_and_hashable():
  cfg = HeadConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.d_out = 3  # type: ignore[misc]
  assert hash(cfg) == hash(HeadConfig())


@pytest.mark.slow
def test_nnx_does_not_import_linen():
  """nnx.py reaches the configuration and the pipeline without moment_jax.linen."""
  # Importing the package imports both heads: put an empty package in its place
  # (find_spec of the top-level name does not import it), then import nnx.py.
  code = (
    "import importlib, importlib.util, sys, types; "
    "root = importlib.util.find_spec('moment_jax').submodule_search_locations[0]; "
    "pkg = types.ModuleType('moment_jax'); pkg.__path__ = [root]; "
    "sys.modules['moment_jax'] = pkg; importlib.import_module('moment_jax.nnx'); "
    "print(sorted(m for m in sys.modules if m.startswith('moment_jax')))"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert "'moment_jax.config'" in out.stdout  # the fake package did load nnx.py's imports
  assert "'moment_jax.linen'" not in out.stdout, out.stdout


@pytest.mark.parametrize(
  "module,name",
  [
    ("moment_jax.linen", "MLPS"),
    ("moment_jax.linen", "check_head_config"),
    ("moment_jax.linen", "width_from_features"),
    ("moment_jax.presets", "SEED_MEMORY_MB"),
    ("moment_jax.ops", "checks"),
  ],
)
def test_old_names_still_resolve_with_a_warning(module, name):
  import importlib

  with pytest.warns(DeprecationWarning, match=rf"{module}\.{name} is deprecated; use "):
    value = getattr(importlib.import_module(module), name)
  assert value is not None
  with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
    _ = importlib.import_module(module).no_such_name


def test_old_linen_helpers_behave_as_before():
  import warnings

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from moment_jax.linen import check_head_config, width_from_features
  assert width_from_features(36 + 16, True, 16) == 8
  with pytest.raises(ValueError, match=r"d_out: expected an int >= 1, got 0"):
    check_head_config(0, "single", 0.1, None)
