"""moment_jax.convert: PyTorch <-> Flax weights, strict shapes, NumPy without torch."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moment_jax import MomentHead, feature_size
from moment_jax.convert import expected_shapes, flax_to_torch, torch_to_flax

D = 6
CONFIGS = {
  "single": dict(d_out=8),
  "double": dict(d_out=8, mlp="double"),
  "third": dict(d_out=8, use_third_order=True, sketch_dim=16),
  "reduce": dict(d_out=8, mlp="double", d_reduce=4),
}


def random_state(head, d_in=D, seed=0, counter=3):
  """A NumPy state_dict of the PyTorch head matching `head`, random values."""
  rng = np.random.default_rng(seed)
  sd = {k: rng.normal(size=s).astype(np.float32) for k, s in expected_shapes(head, d_in).items()}
  sd["mlp.1.running_var"] = rng.uniform(0.5, 2, size=head.d_out).astype(np.float32)
  sd["mlp.1.num_batches_tracked"] = np.asarray(counter, np.int64)
  return sd


def message(excinfo):
  return str(excinfo.value)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_torch_to_flax_gives_the_linen_tree(cfg):
  head = MomentHead(**cfg, precision="highest")
  sd = random_state(head)
  v = torch_to_flax(sd, head)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, D)), jnp.float32)
  shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), x, train=False))
  chex.assert_trees_all_equal_shapes_and_dtypes(v, shapes)
  np.testing.assert_array_equal(v["params"]["proj"]["kernel"], sd["mlp.0.weight"].T)
  np.testing.assert_array_equal(v["params"]["norm"]["scale"], sd["mlp.1.weight"])
  np.testing.assert_array_equal(v["batch_stats"]["norm"]["var"], sd["mlp.1.running_var"])
  if "d_reduce" in cfg:
    np.testing.assert_array_equal(v["params"]["reduce"]["kernel"], sd["reduce.weight"].T)
  chex.assert_tree_all_finite(head.apply(v, x, train=False))


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_round_trips_are_bit_identical(cfg):
  head = MomentHead(**cfg)
  sd = random_state(head, counter=7)
  back = flax_to_torch(torch_to_flax(sd, head), head, num_batches_tracked=7)
  assert list(back) == list(expected_shapes(head, D))  # state_dict order
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].flags.c_contiguous, k
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  v = torch_to_flax(sd, head)
  chex.assert_trees_all_equal(torch_to_flax(flax_to_torch(v, head), head), v)


def test_npz_round_trip(tmp_path):
  head = MomentHead(**CONFIGS["double"])
  sd = random_state(head)
  np.savez(tmp_path / "head.npz", **flax_to_torch(torch_to_flax(sd, head), head))
  loaded = dict(np.load(tmp_path / "head.npz"))
  chex.assert_trees_all_equal(torch_to_flax(loaded, head), torch_to_flax(sd, head))


def test_width_read_from_checkpoint_or_given():
  head = MomentHead(**CONFIGS["third"])
  sd = random_state(head, d_in=10)
  assert sd["mlp.0.weight"].shape == (8, feature_size(10, True, 16))
  assert torch_to_flax(sd, head)["params"]["proj"]["kernel"].shape[0] == 55 + 16
  torch_to_flax(sd, head, d_in=10)
  with pytest.raises(
    ValueError, match=r"mlp\.0\.weight: expected shape \(8, 37\), found \(8, 71\)"
  ):
    torch_to_flax(sd, head, d_in=6)
  with pytest.raises(ValueError, match="d_in: expected None or an int >= 1, got 0"):
    torch_to_flax(sd, head, d_in=0)
  sd["mlp.0.weight"] = np.zeros((8, 70), np.float32)  # 70 - 16 is no D (D + 1) / 2
  with pytest.raises(
    ValueError,
    match=r"mlp\.0\.weight: expected shape \(8, D\(D\+1\)/2\+16\), "
    r"found \(8, 70\)",
  ):
    torch_to_flax(sd, head)


def test_refuses_missing_unexpected_and_misshapen_keys_all_at_once():
  head = MomentHead(**CONFIGS["single"])
  sd = random_state(head)
  del sd["mlp.1.running_var"]
  sd["mlp.9.weight"] = np.zeros((2, 2), np.float32)
  sd["mlp.1.bias"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError) as e:
    torch_to_flax(sd, head)
  msg = message(e)
  assert "nothing was converted" in msg
  assert "missing mlp.1.running_var: expected shape (8,)" in msg
  assert "unexpected mlp.9.weight: found shape (2, 2)" in msg
  assert "mlp.1.bias: expected shape (8,), found (7,)" in msg
  assert msg.count("\n") == 3  # exactly those three, each on its line


def test_refuses_a_checkpoint_of_the_other_mlp():
  single, double = MomentHead(**CONFIGS["single"]), MomentHead(**CONFIGS["double"])
  with pytest.raises(ValueError) as e:
    torch_to_flax(random_state(double), single)
  assert "unexpected mlp.4.weight: found shape (8, 8)" in message(e)
  assert "unexpected mlp.4.bias: found shape (8,)" in message(e)
  with pytest.raises(ValueError) as e:
    torch_to_flax(random_state(single), double)
  assert "missing mlp.4.weight: expected shape (8, 8)" in message(e)
  assert "missing mlp.4.bias: expected shape (8,)" in message(e)
  with pytest.raises(
    ValueError, match=r"mlp\.0\.weight: expected shape \(8, 21\), found \(8, 37\)"
  ):
    torch_to_flax(random_state(MomentHead(**CONFIGS["third"])), single, d_in=D)


def test_refuses_non_floating_values_and_bad_counters():
  head = MomentHead(**CONFIGS["single"])
  sd = random_state(head)
  sd["mlp.0.bias"] = np.zeros(8, np.int32)
  with pytest.raises(ValueError, match=r"mlp\.0\.bias: expected a floating dtype, found int32"):
    torch_to_flax(sd, head)
  sd = random_state(head)
  sd["mlp.1.num_batches_tracked"] = np.zeros(2, np.int64)
  with pytest.raises(
    ValueError,
    match=r"mlp\.1\.num_batches_tracked: expected shape \(\), "
    r"found \(2,\)",
  ):
    torch_to_flax(sd, head)
  with pytest.raises(ValueError, match="num_batches_tracked: expected an int >= 0, got -1"):
    flax_to_torch(torch_to_flax(random_state(head), head), head, num_batches_tracked=-1)
  with pytest.raises(ValueError, match="mlp: expected one of single, double, got 'triple'"):
    torch_to_flax(sd, MomentHead(mlp="triple"))


def test_counter_is_optional_when_reading():
  head = MomentHead(**CONFIGS["single"])
  sd = random_state(head)
  del sd["mlp.1.num_batches_tracked"]  # checkpoints older than PyTorch 0.4.1
  chex.assert_trees_all_equal(torch_to_flax(sd, head), torch_to_flax(random_state(head), head))


def test_flax_to_torch_refuses_bad_variables():
  head = MomentHead(**CONFIGS["double"])
  v = torch_to_flax(random_state(head), head)
  del v["params"]["out"]
  v["batch_stats"]["norm"]["var"] = jnp.zeros(3)
  v["intermediates"] = {"x": jnp.zeros(2)}
  with pytest.raises(ValueError) as e:
    flax_to_torch(v, head)
  msg = message(e)
  assert "missing params/out/kernel: expected shape (8, 8)" in msg
  assert "missing params/out/bias: expected shape (8,)" in msg
  assert "batch_stats/norm/var: expected shape (8,), found (3,)" in msg
  assert "unexpected intermediates/x: found shape (2,)" in msg


def test_prefix_selects_a_head_inside_a_model():
  head = MomentHead(**CONFIGS["single"])
  sd = random_state(head)
  model = {
    "backbone.weight": np.zeros((3, 3), np.float32),
    **{"head." + k: a for k, a in sd.items()},
  }
  v = torch_to_flax(model, head, prefix="head.")
  chex.assert_trees_all_equal(v, torch_to_flax(sd, head))
  assert set(flax_to_torch(v, head, prefix="head.")) == {"head." + k for k in sd}
  with pytest.raises(ValueError, match="unexpected backbone.weight"):
    torch_to_flax(model, head)


def test_parameter_dtypes_follow_the_head():
  head = MomentHead(**CONFIGS["single"], param_dtype=jnp.bfloat16)
  v = torch_to_flax(random_state(head), head)
  assert v["params"]["proj"]["kernel"].dtype == jnp.bfloat16
  assert v["batch_stats"]["norm"]["mean"].dtype == jnp.float32  # as Flax keeps them
  sd = flax_to_torch(v, head)
  assert sd["mlp.0.weight"].dtype == jnp.bfloat16 and sd["mlp.1.running_mean"].dtype == np.float32


def run_python(code):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )


def test_works_without_torch():
  """`import moment_jax` never imports torch; convert runs with torch unimportable."""
  r = run_python("""
      import sys
      import moment_jax, moment_jax.convert
      assert "torch" not in sys.modules, "import moment_jax imported torch"
      sys.modules["torch"] = None  # from here on `import torch` fails
      import numpy as np
      from moment_jax import MomentHead
      from moment_jax.convert import expected_shapes, flax_to_torch, torch_to_flax
      head = MomentHead(d_out=4)
      sd = {k: np.ones(s, np.float32) for k, s in expected_shapes(head, 5).items()}
      sd["mlp.1.num_batches_tracked"] = np.asarray(0, np.int64)
      back = flax_to_torch(torch_to_flax(sd, head), head)
      assert all(np.array_equal(back[k], sd[k]) for k in sd)
      import os, tempfile
      from moment_jax.convert import load_torch_checkpoint, save_torch_checkpoint
      tmp = tempfile.mkdtemp()
      np.savez(os.path.join(tmp, "head.npz"), **sd)
      v = load_torch_checkpoint(os.path.join(tmp, "head.npz"), head)
      open(os.path.join(tmp, "head.pt"), "wb").close()
      save_torch_checkpoint(os.path.join(tmp, "back.npz"), v, head)
      for call in (lambda: flax_to_torch(v, head, as_torch=True),
                   lambda: save_torch_checkpoint(os.path.join(tmp, "back.pt"), v, head),
                   lambda: load_torch_checkpoint(os.path.join(tmp, "head.pt"), head)):
        try:
          call()
        except ImportError as e:
          assert "torch" in str(e)
        else:
          raise AssertionError("expected an ImportError")
      assert sorted(os.listdir(tmp)) == ["back.npz", "head.npz", "head.pt"]
      print("ok")
  """)
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# -- With torch ------------------------------------------------------------------


@pytest.fixture(name="torch")
def torch_fixture():
  return pytest.importorskip("torch")


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_expected_shapes_are_the_torch_state_dict(torch, cfg):
  from moment_jax.torch_reference import MomentHead as TorchHead

  th = TorchHead(D, **cfg)
  assert {k: tuple(a.shape) for k, a in th.state_dict().items()} == expected_shapes(
    MomentHead(**cfg), D
  )
  assert list(th.state_dict()) == list(expected_shapes(MomentHead(**cfg), D))


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_torch_round_trip_and_strict_load(torch, cfg):
  from moment_jax.torch_reference import MomentHead as TorchHead

  torch.manual_seed(0)
  th = TorchHead(D, **cfg)
  with torch.no_grad():
    th.mlp[1].running_mean.normal_()
    th.mlp[1].running_var.uniform_(0.5, 2)
    th.mlp[1].num_batches_tracked.fill_(5)
  sd = th.state_dict()
  head = MomentHead(**cfg)
  v = torch_to_flax(sd, head)
  back = flax_to_torch(v, head, as_torch=True, num_batches_tracked=5)
  assert list(back) == list(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
  fresh = TorchHead(D, **cfg)
  fresh.load_state_dict(back, strict=True)
  fresh.load_state_dict(flax_to_torch(v, head), strict=True)  # NumPy values too
  for k, a in fresh.state_dict().items():
    assert torch.equal(a, sd[k]) or k.endswith("num_batches_tracked"), k


def test_conversions_copy_not_alias(torch):
  """Updating the torch weights in place (an optimizer step) leaves the Flax
  variables alone, and the other way round."""
  from moment_jax.torch_reference import MomentHead as TorchHead

  th = TorchHead(D, d_out=8)
  head = MomentHead(d_out=8)
  v = torch_to_flax(th.state_dict(), head)
  before = jax.tree.map(np.array, v)
  with torch.no_grad():
    for p in th.parameters():
      p.add_(1.0)
    th.mlp[1].running_var.add_(1.0)
  chex.assert_trees_all_equal(v, before)
  back = flax_to_torch(v, head, as_torch=True)
  back["mlp.0.bias"].add_(1.0)
  back2 = flax_to_torch(v, head)
  back2["mlp.1.running_mean"] += 1.0
  chex.assert_trees_all_equal(v, before)


def test_bfloat16_torch_tensors(torch):
  from moment_jax.torch_reference import MomentHead as TorchHead

  th = TorchHead(D, d_out=8).to(torch.bfloat16)
  head = MomentHead(d_out=8, param_dtype=jnp.bfloat16)
  v = torch_to_flax(th.state_dict(), head)
  assert v["params"]["proj"]["kernel"].dtype == jnp.bfloat16
  back = flax_to_torch(v, head, as_torch=True, num_batches_tracked=0)
  assert back["mlp.0.weight"].dtype == torch.bfloat16
  assert torch.equal(back["mlp.0.weight"], th.mlp[0].weight.detach())


def test_unreadable_widths_are_reported():
  third = MomentHead(**CONFIGS["third"])
  sd = random_state(third)
  sd["mlp.0.weight"] = np.zeros((8, 10), np.float32)  # fewer features than the sketch alone
  with pytest.raises(
    ValueError,
    match=r"mlp\.0\.weight: expected shape \(8, D\(D\+1\)/2\+16\), "
    r"found \(8, 10\)",
  ):
    torch_to_flax(sd, third)
  reduce = MomentHead(**CONFIGS["reduce"])
  sd = random_state(reduce)
  del sd["reduce.weight"]
  with pytest.raises(ValueError) as e:
    torch_to_flax(sd, reduce)
  assert "missing reduce.weight: expected shape (4, d_in)" in message(e)
  assert message(e).count("\n") == 1  # mlp.0.weight is still (8, 10) = (d_out, 4 * 5 / 2)
