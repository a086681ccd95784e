"""`moment-jax convert` and the file API under it (`moment_jax.convert`): PyTorch weights
files <-> orbax checkpoint directories with the head's configuration beside them.

Round trips are bit-identical (compared as bytes, dtypes and key order too):
conversion only transposes. The converted head matches the PyTorch reference
in evaluation mode to 1e-5 relative error per sample, the same bound and the
same reason as tests/test_torch_parity.py (two float32 evaluations of one
formula, ~1e-6 apart; sketch_dim=64 at D=8 so every sketch bucket is reached).
Heads are small (D=8, d_out=16, sketch_dim=16) so each case runs in well under
a second or two on CPU.
"""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from moment_jax import PRESET_NAMES, HeadConfig, MomentHead, cli, convert, grid_graph
from moment_jax.convert import expected_shapes, flax_to_torch, torch_to_flax

D = 8
SMALL = dict(d_out=16, sketch_dim=16)
SMALL_ARGS = ["--set", "d_out=16", "--set", "sketch_dim=16"]
FORMATS = (".pt", ".safetensors", ".npz")


def random_state(cfg, d_in=D, seed=0, counter=7):
  """A NumPy state_dict of the PyTorch head of `cfg`, random values, BatchNorm counter set."""
  rng = np.random.default_rng(seed)
  sd = {k: rng.normal(size=s).astype(np.float32) for k, s in expected_shapes(cfg, d_in).items()}
  sd["mlp.1.running_var"] = rng.uniform(0.5, 2, size=cfg.d_out).astype(np.float32)
  sd["mlp.1.num_batches_tracked"] = np.asarray(counter, np.int64)
  return sd


def need(fmt):
  """Skips a case whose format's library is missing (torch, safetensors: optional extras)."""
  if fmt in (".pt", ".pth"):
    pytest.importorskip("torch")
  if fmt == ".safetensors":
    pytest.importorskip("safetensors")


def write(path, sd):
  """`sd` written by the format's own library (not by moment_jax)."""
  path = str(path)
  if path.endswith(".npz"):
    np.savez(path, **sd)
  elif path.endswith(".safetensors"):
    from safetensors.numpy import save_file

    save_file(sd, path)
  else:
    import torch

    torch.save({k: torch.from_numpy(np.array(v, order="C")) for k, v in sd.items()}, path)


def read(path):
  """The file read back by the format's own library, as NumPy, key order kept."""
  path = str(path)
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return load_file(path)
  import torch

  return {k: v.numpy() for k, v in torch.load(path, weights_only=True).items()}


def assert_bit_identical(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    assert got[k].tobytes() == want[k].tobytes(), k


def run(capsys, *argv):
  """`moment-jax convert ...` in-process: `(exit status, stdout, stderr)`."""
  rc = cli.main(["convert", *map(str, argv)])
  out = capsys.readouterr()
  return rc, out.out, out.err


def leftovers(directory):
  return [p for p in os.listdir(directory) if p.startswith(".tmp-")]


def assert_clean_failure(rc, err, dst, one_line=True):
  assert rc == 2
  assert err.startswith("moment-jax convert: error: ") and "Traceback" not in err, err
  if one_line:
    assert err.count("\n") == 1, err
  assert not os.path.lexists(dst)
  assert leftovers(os.path.dirname(str(dst))) == []


# -- Round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_round_trip_is_bit_identical(tmp_path, capsys, name, fmt):
  need(fmt)
  cfg = HeadConfig.from_preset(name, **SMALL)
  sd = random_state(cfg, seed=PRESET_NAMES.index(name))
  write(tmp_path / f"head{fmt}", sd)
  rc, out, err = run(
    capsys, tmp_path / f"head{fmt}", tmp_path / "ckpt", "--preset", name, *SMALL_ARGS
  )
  assert rc == 0, err
  assert "wrote" in out and "d_in=8" in out
  config, variables = convert.load(tmp_path / "ckpt")
  assert config == cfg
  chex.assert_trees_all_equal(variables, torch_to_flax(sd, cfg))
  rc, _, err = run(capsys, tmp_path / "ckpt", tmp_path / f"back{fmt}")
  assert rc == 0, err
  back = read(tmp_path / f"back{fmt}")
  assert_bit_identical(back, sd)
  if fmt != ".safetensors":  # the format sorts its keys; order never matters to PyTorch
    assert list(back) == list(sd)  # state_dict order
  assert leftovers(tmp_path) == []


def test_bfloat16_safetensors_round_trip_without_torch(tmp_path, capsys):
  pytest.importorskip("safetensors")
  cfg = HeadConfig.from_preset("performance", **SMALL, param_dtype="bfloat16")
  sd = flax_to_torch(torch_to_flax(random_state(cfg), cfg), cfg, num_batches_tracked=3)
  assert sd["mlp.0.weight"].dtype == jax.numpy.bfloat16
  write(tmp_path / "head.safetensors", sd)
  assert (
    run(
      capsys,
      tmp_path / "head.safetensors",
      tmp_path / "ckpt",
      "--preset",
      "performance",
      *SMALL_ARGS,
      "--set",
      "param_dtype=bfloat16",
    )[0]
    == 0
  )
  assert run(capsys, tmp_path / "ckpt", tmp_path / "back.safetensors")[0] == 0
  assert_bit_identical(read(tmp_path / "back.safetensors"), sd)
  rc, _, err = run(capsys, tmp_path / "ckpt", tmp_path / "back.npz")
  assert_clean_failure(rc, err, tmp_path / "back.npz")
  assert ".npz cannot hold bfloat16" in err


def test_orbax_checkpoint_restores_with_plain_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  cfg = HeadConfig.from_preset("optimized", **SMALL)
  variables = torch_to_flax(random_state(cfg), cfg)
  convert.save(tmp_path / "ckpt", variables, cfg, preset="optimized")
  chex.assert_trees_all_equal(ocp.StandardCheckpointer().restore(str(tmp_path / "ckpt")), variables)


# -- Parity and strict loading in PyTorch -------------------------------------------------


def randomize(th, x, graph, mask, seed):
  """BatchNorm affine and running statistics on the scale of the projections, so the
  outputs are O(1) and sensitive to the features (as tests/test_torch_parity.py)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    y = th.mlp[0](th.features(torch.as_tensor(x), torch.as_tensor(graph), torch.as_tensor(mask)))
    mean, std = y.mean(0), y.std(0) + 1e-6
    bn = th.mlp[1]
    bn.running_mean.copy_(mean + 0.5 * std * torch.randn(y.shape[1:], generator=gen))
    bn.running_var.copy_(std**2 * (0.5 + 1.5 * torch.rand(y.shape[1:], generator=gen)))
    bn.weight.copy_(0.5 + torch.rand(y.shape[1:], generator=gen))
    bn.bias.copy_(0.3 * torch.randn(y.shape[1:], generator=gen))
    bn.num_batches_tracked.fill_(11)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_converted_head_matches_pytorch(tmp_path, capsys, name):
  torch = pytest.importorskip("torch")
  from moment_jax.torch_reference import MomentHead as TorchHead

  torch.set_float32_matmul_precision("highest")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 9, D)).astype(np.float32)
  graph, mask = grid_graph(3, 3), np.ones((4, 9), bool)
  mask[1, -3:] = False
  torch.manual_seed(0)
  th = TorchHead.from_preset(name, D, sketch_dim=64)
  randomize(th, x, graph, mask, seed=1)
  torch.save(th.state_dict(), tmp_path / "head.pt")
  assert (
    run(
      capsys, tmp_path / "head.pt", tmp_path / "ckpt", "--preset", name, "--set", "sketch_dim=64"
    )[0]
    == 0
  )
  # precision is a runtime field: the loading head may choose its own.
  cfg, variables = convert.load(
    tmp_path / "ckpt", MomentHead.from_preset(name, sketch_dim=64, precision="highest")
  )
  out = np.asarray(
    MomentHead.from_config(cfg).apply(variables, x, graph, mask, train=False), np.float64
  )
  with torch.no_grad():
    ref = th.eval()(torch.as_tensor(x), torch.as_tensor(graph), torch.as_tensor(mask))
  ref = ref.numpy().astype(np.float64)
  err = np.max(np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1))
  assert err < 1e-5, err
  # ... and back: PyTorch loads it with strict=True, every tensor as it was.
  for fmt in (".pt", ".safetensors"):
    need(fmt)
    assert run(capsys, tmp_path / "ckpt", tmp_path / f"back{fmt}")[0] == 0
    fresh = TorchHead.from_preset(name, D, sketch_dim=64)
    fresh.load_state_dict(read(tmp_path / f"back{fmt}"), strict=True)
    for k, a in th.state_dict().items():
      assert torch.equal(fresh.state_dict()[k], a), (fmt, k)


# -- Refusals and clean failures ---------------------------------------------------------


class _Evil:
  """Unpickling this runs a shell command: `torch.load(weights_only=True)` must not."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _Custom:
  pass


@pytest.mark.parametrize("payload", ["os.system", "custom class"])
def test_pickle_of_other_objects_is_refused_and_nothing_written(tmp_path, capsys, payload):
  torch = pytest.importorskip("torch")
  marker = tmp_path / "pwned"
  obj = _Evil(marker) if payload == "os.system" else _Custom()
  torch.save({"mlp.0.weight": torch.zeros(2, 2), "evil": obj}, tmp_path / "head.pt")
  rc, out, err = run(capsys, tmp_path / "head.pt", tmp_path / "ckpt", "--preset", "optimized")
  assert_clean_failure(rc, err, tmp_path / "ckpt")
  assert "refused: the file pickles objects other than tensors" in err
  assert (
    ("posix.system" in err or "nt.system" in err) if payload == "os.system" else "_Custom" in err
  )
  assert not marker.exists() and out == ""
  with pytest.raises(ValueError, match="refused"):
    convert.load_torch_checkpoint(tmp_path / "head.pt", HeadConfig())


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file_fails_cleanly(tmp_path, capsys, fmt):
  need(fmt)
  write(tmp_path / f"full{fmt}", random_state(HeadConfig.from_preset("optimized", **SMALL)))
  data = (tmp_path / f"full{fmt}").read_bytes()
  (tmp_path / f"head{fmt}").write_bytes(data[: len(data) // 2])
  rc, _, err = run(
    capsys, tmp_path / f"head{fmt}", tmp_path / "ckpt", "--preset", "optimized", *SMALL_ARGS
  )
  assert_clean_failure(rc, err, tmp_path / "ckpt")
  assert f"head{fmt}: not a" in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_file_that_is_no_checkpoint_gets_one_line(tmp_path, capsys, fmt):
  need(fmt)
  (tmp_path / f"notes{fmt}").write_text("shopping list: eggs, flour\n" * 20)
  rc, _, err = run(capsys, tmp_path / f"notes{fmt}", tmp_path / "ckpt", "--preset", "optimized")
  assert_clean_failure(rc, err, tmp_path / "ckpt")
  rc, _, err = run(capsys, tmp_path / "absent.pt", tmp_path / "ckpt", "--preset", "optimized")
  assert_clean_failure(rc, err, tmp_path / "ckpt")
  assert "absent.pt: no such file or directory" in err
  (tmp_path / "head.txt").write_text("x")
  rc, _, err = run(capsys, tmp_path / "head.txt", tmp_path / "ckpt", "--preset", "optimized")
  assert_clean_failure(rc, err, tmp_path / "ckpt")
  assert "expected a file ending in .pt, .pth, .bin, .safetensors, .npz" in err


def test_wrong_preset_lists_every_offending_key(tmp_path, capsys):
  write(tmp_path / "head.npz", random_state(HeadConfig.from_preset("original", **SMALL)))
  rc, _, err = run(
    capsys, tmp_path / "head.npz", tmp_path / "ckpt", "--preset", "optimized", "--set", "d_out=16"
  )
  assert_clean_failure(rc, err, tmp_path / "ckpt", one_line=False)
  assert "nothing was converted" in err
  assert "mlp.0.weight: expected shape (16, D(D+1)/2), found (16, 52)" in err
  assert "unexpected mlp.4.weight: found shape (16, 16)" in err
  assert "unexpected mlp.4.bias: found shape (16,)" in err
  assert err.count("\n") == 4  # the header and those three


def test_existing_dst_is_refused_unless_overwrite(tmp_path, capsys):
  cfg = HeadConfig.from_preset("memory", **SMALL)
  write(tmp_path / "a.npz", random_state(cfg, seed=1))
  write(tmp_path / "b.npz", random_state(cfg, seed=2))
  args = ("--preset", "memory", *SMALL_ARGS)
  assert run(capsys, tmp_path / "a.npz", tmp_path / "ckpt", *args)[0] == 0
  rc, _, err = run(capsys, tmp_path / "b.npz", tmp_path / "ckpt", *args)
  assert rc == 2 and "ckpt: exists; pass --overwrite to replace it" in err
  chex.assert_trees_all_equal(
    convert.load(tmp_path / "ckpt")[1], torch_to_flax(random_state(cfg, seed=1), cfg)
  )
  assert run(capsys, tmp_path / "b.npz", tmp_path / "ckpt", *args, "--overwrite")[0] == 0
  chex.assert_trees_all_equal(
    convert.load(tmp_path / "ckpt")[1], torch_to_flax(random_state(cfg, seed=2), cfg)
  )
  # The reverse direction too, and a directory that is not a checkpoint is never replaced.
  assert run(capsys, tmp_path / "ckpt", tmp_path / "back.npz")[0] == 0
  assert run(capsys, tmp_path / "ckpt", tmp_path / "back.npz")[0] == 2
  assert run(capsys, tmp_path / "ckpt", tmp_path / "back.npz", "--overwrite")[0] == 0
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "notes.txt").write_text("keep me")
  rc, _, err = run(capsys, tmp_path / "a.npz", tmp_path / "docs", *args, "--overwrite")
  assert rc == 2 and "not a checkpoint; refusing to replace it" in err
  assert (tmp_path / "docs" / "notes.txt").read_text() == "keep me"
  assert leftovers(tmp_path) == []


def test_a_failed_write_leaves_no_partial_dst(tmp_path, capsys, monkeypatch):
  """The config file is written after orbax's items: failing there leaves a half-built
  checkpoint in the temporary directory only, and an old DST as it was."""
  cfg = HeadConfig.from_preset("optimized", **SMALL)
  write(tmp_path / "head.npz", random_state(cfg))
  args = (tmp_path / "head.npz", tmp_path / "ckpt", "--preset", "optimized", *SMALL_ARGS)

  def broken_dump(*_, **__):
    raise OSError("disk full")

  monkeypatch.setattr(convert.json, "dump", broken_dump)
  rc, _, err = run(capsys, *args)
  assert_clean_failure(rc, err, tmp_path / "ckpt")
  assert "disk full" in err
  monkeypatch.undo()
  assert run(capsys, *args)[0] == 0
  before = (tmp_path / "ckpt" / convert.CONFIG_FILE).read_text()
  monkeypatch.setattr(convert.json, "dump", broken_dump)
  assert run(capsys, *args, "--set", "dropout_rate=0.2", "--overwrite")[0] == 2
  assert (tmp_path / "ckpt" / convert.CONFIG_FILE).read_text() == before
  assert leftovers(tmp_path) == []


# -- The stored configuration --------------------------------------------------------------


def test_configuration_is_stored_and_checked(tmp_path, capsys):
  cfg = HeadConfig.from_preset("performance", **SMALL, isqrt_normalization="frobenius")
  write(tmp_path / "head.npz", random_state(cfg))
  assert (
    run(
      capsys,
      tmp_path / "head.npz",
      tmp_path / "ckpt",
      "--preset",
      "performance",
      *SMALL_ARGS,
      "--set",
      "isqrt_normalization=frobenius",
    )[0]
    == 0
  )
  meta = json.loads((tmp_path / "ckpt" / convert.CONFIG_FILE).read_text())
  assert meta["preset"] == "performance" and meta["d_in"] == D
  assert meta["overrides"] == {"d_out": 16, "sketch_dim": 16, "isqrt_normalization": "frobenius"}
  assert meta["num_batches_tracked"] == 7 and meta["format_version"] == 1
  assert convert.load(tmp_path / "ckpt")[0] == cfg
  with pytest.raises(ValueError) as e:
    convert.load(tmp_path / "ckpt", HeadConfig.from_preset("performance", **SMALL))
  assert "isqrt_normalization: expected 'frobenius', found 'trace'" in str(e.value)
  assert str(e.value).count("\n") == 1
  # Fields that only choose how the head runs may differ; the given ones are returned.
  runtime = MomentHead(**cfg.asdict()).clone(
    remat_policy="features", isqrt_chunk=2, dropout_rate=0.0
  )
  got, _ = convert.load(tmp_path / "ckpt", runtime)
  assert got == runtime.config
  rc, _, err = run(
    capsys, tmp_path / "ckpt", tmp_path / "back.npz", "--preset", "performance", *SMALL_ARGS
  )
  assert rc == 2 and "isqrt_normalization: expected 'frobenius', found 'trace'" in err
  assert not (tmp_path / "back.npz").exists()


def test_unstorable_fields_are_refused(tmp_path):
  cfg = HeadConfig.from_preset("optimized", **SMALL)
  v = torch_to_flax(random_state(cfg), cfg)
  import dataclasses

  with pytest.raises(ValueError, match="remat_policy: .* cannot be stored in moment_jax.json"):
    convert.save(
      tmp_path / "ckpt",
      v,
      dataclasses.replace(cfg, remat_policy=jax.checkpoint_policies.dots_saveable),
    )
  assert not (tmp_path / "ckpt").exists()
  from moment_jax import parse_policy

  policy = parse_policy("params=float32,compute=bfloat16,output=float32,moment=float32")
  convert.save(tmp_path / "ckpt", v, dataclasses.replace(cfg, policy=policy))
  assert convert.load(tmp_path / "ckpt")[0].resolved_policy() == policy


def test_d_in_is_inferred_or_checked(tmp_path, capsys):
  cfg = HeadConfig.from_preset("original", **SMALL, d_reduce=4)
  write(tmp_path / "head.npz", random_state(cfg, d_in=12))
  args = ("--preset", "original", *SMALL_ARGS, "--set", "d_reduce=4")
  rc, _, err = run(capsys, tmp_path / "head.npz", tmp_path / "ckpt", *args, "--d-in", "10")
  assert rc == 2 and "reduce.weight: expected shape (4, 10), found (4, 12)" in err
  assert run(capsys, tmp_path / "head.npz", tmp_path / "ckpt", *args)[0] == 0
  assert convert.metadata(tmp_path / "ckpt")["d_in"] == 12
  assert run(capsys, tmp_path / "ckpt", tmp_path / "back.npz", "--d-in", "12")[0] == 0
  rc, _, err = run(capsys, tmp_path / "ckpt", tmp_path / "back2.npz", "--d-in", "10")
  assert rc == 2 and "--d-in: 10, but the weights" in err


def test_set_values_and_bad_options(tmp_path, capsys):
  write(tmp_path / "head.npz", random_state(HeadConfig.from_preset("optimized", **SMALL)))
  src, dst = tmp_path / "head.npz", tmp_path / "ckpt"
  for argv, msg in [
    (
      ["--preset", "optimized", "--set", "colour=red"],
      "--set: unknown field 'colour'; valid fields are d_out, use_third_order",
    ),
    (["--preset", "optimized", "--set", "d_out"], "--set: expected key=value, got 'd_out'"),
    (["--preset", "optimized", "--set", "d_out=0"], "d_out: expected an int >= 1, got 0"),
    (["--set", "d_out=16"], "--set changes a preset's configuration: give --preset too"),
    ([], "--preset is required for a PyTorch checkpoint"),
  ]:
    rc, _, err = run(capsys, src, dst, *argv)
    assert rc == 2 and msg in err, (argv, err)
    assert not dst.exists()
  rc, _, err = run(capsys, src, tmp_path / "ckpt.safetensors", "--preset", "optimized")
  assert rc == 2 and "converts to an orbax checkpoint directory" in err
  assert cli.main(["convert", str(src), str(dst), "--d-in", "0"]) == 2  # argparse
  assert "--d-in: expected an int >= 1, got '0'" in capsys.readouterr().err
  # JSON values: numbers, booleans, null; anything else is a string.
  args = [
    "--preset",
    "optimized",
    *SMALL_ARGS,
    "--set",
    "eps=1e-4",
    "--set",
    "policy=bfloat16",
    "--set",
    "isqrt_chunk=null",
    "--set",
    "check_values=false",
  ]
  assert run(capsys, src, dst, *args)[0] == 0
  cfg = convert.load(dst)[0]
  assert (cfg.eps, cfg.policy, cfg.isqrt_chunk, cfg.check_values) == (1e-4, "bfloat16", None, False)


# -- Inside larger models ------------------------------------------------------------------


def test_prefix_and_wrapped_training_checkpoints(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  cfg = HeadConfig.from_preset("optimized", **SMALL)
  sd = random_state(cfg)
  model = {
    "backbone.weight": np.ones((3, 3), np.float32),
    **{f"head.{k}": v for k, v in sd.items()},
  }
  ckpt = {
    "state_dict": {k: torch.from_numpy(v) for k, v in model.items()},
    "epoch": 3,
    "optimizer": {"lr": 0.1},
  }
  torch.save(ckpt, tmp_path / "train.pt")
  args = ("--preset", "optimized", *SMALL_ARGS)
  for i, prefix in enumerate(["head.", "state_dict.head."]):
    assert (
      run(capsys, tmp_path / "train.pt", tmp_path / f"ckpt{i}", *args, "--prefix", prefix)[0] == 0
    )
    chex.assert_trees_all_equal(convert.load(tmp_path / f"ckpt{i}")[1], torch_to_flax(sd, cfg))
  rc, _, err = run(capsys, tmp_path / "train.pt", tmp_path / "ckpt9", *args)
  assert rc == 2 and "unexpected backbone.weight" in err and "unexpected head.mlp.0.bias" in err
  rc, _, err = run(capsys, tmp_path / "train.pt", tmp_path / "ckpt9", *args, "--prefix", "neck.")
  assert rc == 2 and "no key starts with prefix 'state_dict.neck.'" in err


def test_reverse_from_a_training_checkpoint(tmp_path, capsys):
  """A CheckpointManager step as examples/digits.py writes it: a `state` item (params,
  batch_stats, opt_state, step) and a `history` JSON item; the head is `params/moment`."""
  ocp = pytest.importorskip("orbax.checkpoint")
  import optax

  cfg = HeadConfig.from_preset("optimized", **SMALL)
  sd = random_state(cfg)
  head_vars = torch_to_flax(sd, cfg)
  params = {"moment": head_vars["params"], "embed": {"kernel": jax.numpy.ones((3, 8))}}
  state = {
    "params": params,
    "batch_stats": {"moment": head_vars["batch_stats"]},
    "opt_state": optax.adamw(1e-3).init(params),
    "step": jax.numpy.asarray(10),
  }
  with ocp.CheckpointManager(str(tmp_path / "run")) as mngr:
    mngr.save(
      10,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave({"loss": [1.0]})
      ),
    )
    mngr.wait_until_finished()
  src, args = tmp_path / "run" / "10", ("--preset", "optimized", *SMALL_ARGS)
  rc, _, err = run(capsys, src, tmp_path / "head.npz")
  assert rc == 2 and "has no moment_jax.json" in err and "--preset" in err
  rc, _, err = run(capsys, src, tmp_path / "head.npz", *args)
  assert rc == 2 and "unexpected params/embed/kernel: found shape (3, 8)" in err
  rc, _, err = run(capsys, tmp_path / "run", tmp_path / "head.npz", *args, "--prefix", "moment")
  assert rc == 2 and "holds the checkpoint steps 10; point at one of them" in err
  assert run(capsys, src, tmp_path / "head.npz", *args, "--prefix", "moment")[0] == 0
  back = read(tmp_path / "head.npz")
  assert_bit_identical(
    {k: v for k, v in back.items() if k != "mlp.1.num_batches_tracked"},
    {k: v for k, v in sd.items() if k != "mlp.1.num_batches_tracked"},
  )
  assert back["mlp.1.num_batches_tracked"] == 0  # a Flax training run keeps no counter


# -- The README section and the installed command -----------------------------------------


@pytest.mark.slow
def test_command_line_exit_status_and_no_traceback(tmp_path):
  """`python -m moment_jax convert` in a fresh process (the installed command's path)."""
  write(tmp_path / "head.npz", random_state(HeadConfig.from_preset("memory", **SMALL)))
  (tmp_path / "bad.npz").write_bytes(b"\x00" * 64)

  def convert_cli(*argv):
    return subprocess.run(
      [sys.executable, "-m", "moment_jax", "convert", *map(str, argv)],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )

  r = convert_cli(tmp_path / "bad.npz", tmp_path / "ckpt", "--preset", "memory")
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("moment-jax convert: error: ")
  r = convert_cli(tmp_path / "head.npz", tmp_path / "ckpt", "--preset", "memory", *SMALL_ARGS)
  assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
