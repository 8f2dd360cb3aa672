"""Sharding: the rules give the intended parameter layout, meshes are built as
configured, and on 8 simulated CPU devices one sharded training step equals
the single-device step (dense over data×fsdp×tensor; MoE with experts split
over `expert`: the default dropless dispatch, ragged, gather and capacity).

The multi-device checks run once, in a subprocess (`python -m
tests.test_sharding`) with XLA_FLAGS=--xla_force_host_platform_device_count=8,
so this pytest process keeps its single device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nitp_jax import config as config_lib
from nitp_jax import jitted
from nitp_jax import model as model_lib
from nitp_jax import sharding
from tests.helpers import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Opt level 0: compiles ~2x faster; both sides of every comparison use it.
XLA_FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
FE = ("fsdp", "expert")

# Parameter path suffix -> its mesh spec (scanned layers lead with None).
EXPECTED = {
    "backbone/embed": P("tensor", FE),
    "backbone/final_norm/scale": P(FE),
    "attn/q": P(None, FE, "tensor", None),
    "attn/k": P(None, FE, "tensor", None),
    "attn/v": P(None, FE, "tensor", None),
    "attn/o": P(None, "tensor", None, FE),
    "attn_norm/scale": P(None, FE),
    "ffn_norm/scale": P(None, FE),
    "mlp/gate": P(None, FE, "tensor"),
    "mlp/up": P(None, FE, "tensor"),
    "mlp/down": P(None, "tensor", FE),
    "moe/router": P(None, FE, None),
    "moe/gate": P(None, "expert", "fsdp", "tensor"),
    "moe/up": P(None, "expert", "fsdp", "tensor"),
    "moe/down": P(None, "expert", "tensor", "fsdp"),
    "moe/shared/gate": P(None, FE, "tensor"),
    "moe/shared/up": P(None, FE, "tensor"),
    "moe/shared/down": P(None, "tensor", FE),
    "projector/mlp/gate": P(FE, "tensor"),
    "projector/mlp/up": P(FE, "tensor"),
    "projector/mlp/down": P("tensor", FE),
}


def _expected_spec(path: str) -> P:
  matches = [k for k in EXPECTED if path.endswith(k)]
  assert matches, f"no expected spec for {path}"
  return EXPECTED[max(matches, key=len)]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_parameter_shardings_follow_the_rules(moe):
  specs = sharding.param_specs(*model_lib.abstract_params(small_config(moe=moe)))
  for path, (shape, spec) in specs.items():
    assert spec == _expected_spec(path), path
    assert len(spec) == len(shape), path
  assert any("moe/gate" in p for p in specs) == moe


def test_rules_shard_batch_embed_heads_mlp_experts():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  rules = sharding.LOGICAL_RULES
  to_mesh = lambda *axes: nn.logical_to_mesh_axes(axes, rules)
  rows = ("data", "fsdp", "expert")
  assert to_mesh("activation_batch", "activation_length", "activation_embed") == P(
      rows, None, None)
  assert to_mesh("activation_batch", "activation_length", "activation_heads",
                 "activation_head_dim") == P(rows, None, "tensor", None)
  assert to_mesh("activation_batch", "activation_length", "activation_mlp") == P(
      rows, None, "tensor")
  assert to_mesh("activation_batch", "activation_length", "activation_vocab") == P(
      rows, None, "tensor")
  assert to_mesh("activation_experts", "activation_expert_batch", None, None) == P(
      "expert", ("data", "fsdp"), None, None)
  assert to_mesh("embed", "mlp") == P(("fsdp", "expert"), "tensor")  # dense weights
  assert to_mesh("expert", "embed", "mlp") == P("expert", "fsdp", "tensor")  # experts'


def _mesh_cfg(**sizes):
  cfg = config_lib.base_config().mesh
  for k, v in sizes.items():
    cfg[k] = v
  return cfg


def test_mesh_shape_fills_one_axis_and_multiplies_dcn():
  assert sharding.mesh_shape(_mesh_cfg(data=-1, fsdp=2), 8) == (4, 2, 1, 1)
  assert sharding.mesh_shape(_mesh_cfg(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2, 1)
  assert sharding.mesh_shape(_mesh_cfg(data=1, fsdp=-1, dcn_data=2), 8) == (2, 4, 1, 1)
  with pytest.raises(config_lib.ConfigError, match="needs 4 devices per slice but 8"):
    sharding.mesh_shape(_mesh_cfg(data=2, fsdp=2), 8)
  with pytest.raises(config_lib.ConfigError, match="does not divide the 8 devices"):
    sharding.mesh_shape(_mesh_cfg(data=-1, dcn_data=3), 8)


def test_config_rejects_bad_mesh_values():
  cfg = config_lib.base_config()
  cfg.mesh.dcn_expert = 0
  with pytest.raises(config_lib.ConfigError, match=r"mesh.dcn_expert=0"):
    config_lib.validate(cfg)
  cfg = config_lib.base_config()
  cfg.mesh.fsdp = -1
  with pytest.raises(config_lib.ConfigError, match="at most one axis may be -1"):
    config_lib.validate(cfg)


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What the mesh utilities read from a device (no tuple: numpy would unpack it)."""
  id: int
  process_index: int
  slice_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_hybrid_grid_puts_slices_on_the_dcn_axis():
  # 2 slices x 4 devices, listed interleaved: the grid must group by slice.
  devices = [FakeDevice(i, i // 2, i % 2) for i in range(8)]
  grid = sharding.device_grid(_mesh_cfg(data=1, fsdp=-1, dcn_data=2), devices)
  assert grid.shape == (2, 4, 1, 1)
  assert [{d.slice_index for d in row.flat} for row in grid] == [{0}, {1}]
  # Devices all in one slice: processes are the granules (GPU nodes).
  devices = [FakeDevice(i, i // 4, 0) for i in range(8)]
  grid = sharding.device_grid(_mesh_cfg(data=1, fsdp=2, tensor=2, dcn_fsdp=2), devices)
  assert grid.shape == (1, 4, 2, 1)
  assert [d.process_index for d in grid.flat] == [0, 0, 0, 0, 1, 1, 1, 1]
  with pytest.raises(config_lib.ConfigError, match="span 2 processes"):
    sharding.device_grid(_mesh_cfg(data=-1, dcn_data=4), devices)


# ---- 8 simulated devices (subprocess) ----


@pytest.fixture(scope="module")
def eight_devices() -> dict:
  env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "tests.test_sharding"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["dense", "moe_dropless", "moe_gather", "moe_capacity",
                                  "moe_ragged", "moe_bias"])
def test_sharded_step_matches_single_device(eight_devices, case):
  r = eight_devices[case]
  assert r["devices"] == 8, r
  assert r["loss"] == pytest.approx(r["loss_single"], rel=1e-5), r
  assert r["grad_norm"] == pytest.approx(r["grad_norm_single"], rel=1e-4), r
  assert r["param_change"] > 1e-4 and r["param_diff"] < 1e-2 * r["param_change"], r
  assert r["opt_diff"] < 1e-6, r


def test_sharded_layouts(eight_devices):
  dense, moe = eight_devices["dense"], eight_devices["moe_capacity"]
  assert dense["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
  assert moe["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}
  assert dense["embed_spec"] == [["tensor"], ["fsdp"]]  # expert=1 drops out of the spec
  assert moe["embed_spec"] == [["tensor"], ["fsdp", "expert"]]
  assert moe["expert_gate_spec"] == [[], ["expert"], ["fsdp"], ["tensor"]]
  # The activation constraints are in the program, and GSPMD moves tokens
  # to their experts with all-to-alls, whether the slots are filled by
  # one-hot einsums or by gathers.
  assert dense["constraints"] > 0 and moe["constraints"] > 0
  assert moe["all_to_all"] > 0 and eight_devices["moe_gather"]["all_to_all"] > 0
  # dropless (and ragged) run under shard_map: outputs reduce-scattered home.
  assert eight_devices["moe_dropless"]["reduce_scatter"] > 0
  assert eight_devices["moe_ragged"]["reduce_scatter"] > 0


def test_mesh_checks_name_the_problem(eight_devices):
  errors = eight_devices["errors"]
  assert "global_batch=6" in errors["batch"] and "8 batch shards" in errors["batch"]
  assert "backbone/embed" in errors["vocab"] and "does not divide 97" in errors["vocab"]
  assert "/moe/" in errors["experts"] and "does not divide 6" in errors["experts"]


# ---- compile_check: will it fit ----


def compile_check(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  return subprocess.run([sys.executable, "-m", "nitp_jax.compile_check", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def test_compile_check_reports_per_device_bytes():
  overrides = ("--config.model.d_model=64", "--config.model.num_layers=2",
               "--config.model.vocab_size=512", "--config.model.moe.expert_ffn=32",
               "--config.model.moe.shared_expert_ffn=32", "--config.model.ffn_dim=128")
  out = compile_check("--config=configs/tiny.py:moe", "--mesh=fsdp=2,tensor=2,expert=2",
                      "--batch=8", "--seq_len=32", *overrides)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8 and report["compiled"]
  assert report["dispatch"] == "dropless"  # the default, under shard_map (expert=2)
  assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2, "expert": 2}
  cfg = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny.py:moe"))
  for flag in overrides:
    key, value = flag.removeprefix("--config.").split("=")
    section = cfg
    for part in key.split(".")[:-1]:
      section = section[part]
    section[key.split(".")[-1]] = int(value)
  sizes = {"fsdp": 2, "tensor": 2, "expert": 2}
  expected = sum(
      4 * np.prod(shape) // np.prod([sizes[a] for e in spec if e
                                     for a in ((e,) if isinstance(e, str) else e)])
      for shape, spec in sharding.param_specs(*model_lib.abstract_params(cfg)).values())
  assert report["param_bytes_per_device"] == expected
  assert 2 * expected <= report["opt_state_bytes_per_device"] <= 2 * expected + 64
  assert report["temp_bytes_per_device"] > 0
  assert report["total_bytes_per_device"] == (
      report["argument_bytes_per_device"] + report["output_bytes_per_device"]
      - report["alias_bytes_per_device"] + report["temp_bytes_per_device"])


def test_compile_check_rejects_a_mesh_that_does_not_fit():
  out = compile_check("--config=configs/tiny.py", "--mesh=data=3", "--compile=false")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      "error: config.train.global_batch=8 / microbatches=1 = 8 rows must be divisible by the "
      "3 batch shards (mesh data*fsdp*expert)")


# ---- what the subprocess runs ----


def _random_state(cfg, optimizer):
  """A train state with random weights, built without compiling init."""
  import jax  # pylint: disable=import-outside-toplevel
  from nitp_jax import step as step_lib  # pylint: disable=import-outside-toplevel
  abstract = jax.eval_shape(lambda: step_lib.init_state(cfg, optimizer, jax.random.key(0)))
  rng = np.random.default_rng(0)

  def leaf(path, a):
    if path[0].key != "params" or not np.issubdtype(a.dtype, np.floating):
      return np.zeros(a.shape, a.dtype)
    if path[-1].key == "scale":
      return np.ones(a.shape, a.dtype)
    return (0.05 * rng.standard_normal(a.shape)).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _spec(array) -> list[list[str]]:
  return [[] if e is None else ([e] if isinstance(e, str) else list(e))
          for e in array.sharding.spec]


def _compare(cfg, mesh_sizes: dict, reference=None) -> tuple[dict, tuple]:
  """One step on one device (or `reference`) and on the 8-device mesh."""
  import jax  # pylint: disable=import-outside-toplevel
  from nitp_jax import optim  # pylint: disable=import-outside-toplevel
  from nitp_jax import step as step_lib  # pylint: disable=import-outside-toplevel
  from tests.helpers import max_abs_diff, packed_batch  # pylint: disable=import-outside-toplevel

  optimizer = optim.make_optimizer(cfg.train)
  state = _random_state(cfg, optimizer)
  batch = {k: np.asarray(v) for k, v in packed_batch(8, 16, cfg.model.vocab_size).items()}
  if reference is None:
    reference = jax.jit(step_lib.make_train_step(cfg, optimizer))(state, batch)
  ref_state, ref_metrics = jax.device_get(reference)

  for k, v in mesh_sizes.items():
    cfg.mesh[k] = v
  steps = jitted.build(cfg, jitted.mesh_for_config(cfg))  # what training runs
  mesh = steps.mesh
  args = (jax.device_put(state, steps.state_shardings), sharding.global_batch(batch, mesh))
  lowered = steps.train.lower(*args)
  compiled = lowered.compile()
  new_state, metrics = compiled(*args)
  params = new_state["params"]["backbone"]
  result = {
      "devices": mesh.size, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "loss": float(metrics["loss"]), "loss_single": float(ref_metrics["loss"]),
      "grad_norm": float(metrics["grad_norm"]),
      "grad_norm_single": float(ref_metrics["grad_norm"]),
      "param_diff": max_abs_diff(jax.device_get(new_state["params"]), ref_state["params"]),
      "param_change": max_abs_diff(ref_state["params"], state["params"]),
      "opt_diff": max_abs_diff(jax.device_get(new_state["opt_state"]), ref_state["opt_state"]),
      "embed_spec": _spec(params["embed"]),
      "constraints": lowered.as_text().count("sharding_constraint"),
      "all_to_all": compiled.as_text().count("all-to-all("),
      "reduce_scatter": lowered.as_text().count("reduce_scatter"),
  }
  moe = [v for v in params.values() if isinstance(v, dict) and "moe" in v]
  if moe:
    result["expert_gate_spec"] = _spec(moe[0]["moe"]["gate"])
  return result, reference


def _error(cfg, **mesh_sizes) -> str:
  for k, v in mesh_sizes.items():
    cfg.mesh[k] = v
  try:
    jitted.mesh_for_config(cfg)
  except config_lib.ConfigError as e:
    return str(e)
  return ""


def _moe_config(num_experts: int = 8):
  cfg = small_config(moe=True)
  cfg.model.vocab_size = 96
  cfg.model.moe.num_experts = num_experts
  cfg.model.moe.capacity_factor = 4.0  # = experts / top_k: no drops, so capacity == dropless
  return cfg


def main() -> None:
  import jax  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8, jax.devices()
  results = {}
  dense = small_config()
  dense.model.vocab_size = 96  # divisible by tensor=2
  results["dense"], _ = _compare(dense, dict(data=2, fsdp=2, tensor=2, expert=1))
  layout = dict(data=1, fsdp=2, tensor=2, expert=2)
  reference = None
  for dispatch in ("dropless", "gather", "capacity", "ragged"):
    cfg = _moe_config()
    assert cfg.model.moe.dispatch == "dropless"  # the default
    cfg.model.moe.dispatch = dispatch
    results[f"moe_{dispatch}"], reference = _compare(cfg, layout, reference)
  bias = _moe_config()  # aux-free router bias: replicated, updated from global loads
  bias.model.moe.bias_update_rate = 1e-2
  results["moe_bias"], _ = _compare(bias, layout)
  small = small_config()
  small.train.global_batch = 6
  results["errors"] = {
      "batch": _error(small, data=-1),
      "vocab": _error(small_config(), data=1, tensor=2, fsdp=4),
      "experts": _error(_moe_config(num_experts=6), data=2, expert=4),
  }
  print(json.dumps(results))


if __name__ == "__main__":
  main()
