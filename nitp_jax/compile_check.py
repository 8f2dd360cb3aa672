"""Will it fit? Lower (and compile) the sharded train step for a target
device count on simulated CPU devices, without allocating the model, and
print what one device holds as one JSON line.

  python -m nitp_jax.compile_check --config=configs/moe_9b.py \
      --mesh=data=1,fsdp=8,expert=8 --compile=false
  python -m nitp_jax.compile_check --config=configs/moe_9b.py --devices=64 \
      --batch=64 --seq_len=2048

--mesh sets config.mesh (axes not named are 1; dcn_* factors allowed);
--devices=N keeps the config's mesh and fills its -1 axis for N devices.
--batch / --seq_len (or any --config.x.y=...) shrink the step for a quick
check. Reported: per-device bytes of parameters and optimizer state (exact,
from the shardings) and, when compiled, the step's temporaries, arguments
and outputs from XLA's memory analysis. CPU's temporaries are an upper
bound for an accelerator's (moe_1p9b, batch 8 x 2048 on one device: 33.6 GB
on CPU, 11.3 GB compiled for an H200, whose real peak matched its analysis
to 0.4%). Without --mesh/--devices it compiles for the machine's own devices.
"""

from __future__ import annotations

import os
import re
import sys

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def parse_mesh(spec: str) -> dict[str, int]:
  """'data=1,fsdp=8' -> {'data': 1, 'fsdp': 8} (no validation of names)."""
  out = {}
  for item in filter(None, spec.split(",")):
    name, _, value = item.partition("=")
    if not re.fullmatch(r"-?\d+", value.strip()):
      raise ValueError(f"--mesh item {item!r} is not AXIS=SIZE")
    out[name.strip()] = int(value)
  return out


def devices_from_argv(argv: list[str]) -> int | None:
  """Simulated devices the command line asks for (None: not decidable)."""
  values = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
  if values.get("devices"):
    return int(values["devices"])
  if values.get("mesh"):
    sizes = parse_mesh(values["mesh"]).values()
    if all(s > 0 for s in sizes):
      n = 1
      for s in sizes:
        n *= s
      return n
  return None


def _simulate_devices(argv: list[str]) -> None:
  """Before jax is imported: N CPU devices (any accelerator is ignored)."""
  n = devices_from_argv(argv)
  if n:
    os.environ["JAX_PLATFORMS"] = "cpu"
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    os.environ["XLA_FLAGS"] = " ".join(kept + [f"{DEVICE_FLAG}={n}"])


if __name__ == "__main__":
  _simulate_devices(sys.argv[1:])

# pylint: disable=wrong-import-position
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from nitp_jax import cli  # noqa: E402
from nitp_jax import config as config_lib  # noqa: E402
from nitp_jax import optim  # noqa: E402
from nitp_jax import sharding  # noqa: E402
from nitp_jax import step as step_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/moe_9b.py.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. data=1,fsdp=8,tensor=1,expert=8 "
                            "(axes not named are 1; dcn_data=2 etc. for multi-slice).")
_DEVICES = flags.DEFINE_integer("devices", None, "Device count; the config's mesh fills its "
                                "-1 axis (default: the --mesh product).")
_BATCH = flags.DEFINE_integer("batch", None, "Override train.global_batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Override train.seq_len.")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile too (slow for big models on CPU); "
                             "false reports lowering-only numbers.")


def apply_overrides(cfg: ml_collections.ConfigDict, mesh: str, batch: int | None,
                    seq_len: int | None) -> ml_collections.ConfigDict:
  """cfg with --mesh / --batch / --seq_len applied, validated."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if mesh:
    sizes = parse_mesh(mesh)
    unknown = set(sizes) - set(cfg.mesh.keys())
    if unknown:
      raise config_lib.ConfigError(f"--mesh names unknown axes {sorted(unknown)}; "
                                   f"allowed: {', '.join(cfg.mesh.keys())}")
    for axis in sharding.MESH_AXES:
      cfg.mesh[axis] = sizes.get(axis, 1)
    for axis, size in sizes.items():
      cfg.mesh[axis] = size
  for axis in sharding.MESH_AXES:  # one simulated slice: DCN factors fold into ICI
    dcn = cfg.mesh.get(f"dcn_{axis}", 1)
    if dcn > 1 and cfg.mesh[axis] != -1:
      cfg.mesh[axis], cfg.mesh[f"dcn_{axis}"] = cfg.mesh[axis] * dcn, 1
  if batch:
    cfg.train.global_batch = batch
  if seq_len:
    cfg.train.seq_len = seq_len
    cfg.model.max_seq_len = max(cfg.model.max_seq_len, seq_len)
  return config_lib.validate(cfg)


def abstract_inputs(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, optimizer):
  """(abstract state, abstract batch, state shardings): shapes and shardings only."""
  abstract, shardings = step_lib.state_shardings(cfg, optimizer, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract, shardings)
  shape = (cfg.train.global_batch, cfg.train.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
           for k in ("tokens", "segment_ids", "positions")}
  return state, batch, shardings


def check(cfg: ml_collections.ConfigDict, compile_step: bool = True) -> dict:
  """Lower (and compile) cfg's train step on the current devices; the report."""
  mesh = sharding.mesh_for_config(cfg)
  optimizer = optim.make_optimizer(cfg.train)
  state, batch, shardings = abstract_inputs(cfg, mesh, optimizer)
  replicated = NamedSharding(mesh, P())
  step_fn = sharding.jit(step_lib.make_train_step(cfg, optimizer), mesh,
                         in_shardings=(shardings, sharding.batch_sharding(mesh)),
                         out_shardings=(shardings, replicated), donate_argnums=0)
  params = state["params"]
  report = {
      "devices": mesh.size, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch": cfg.train.global_batch, "seq_len": cfg.train.seq_len,
      "microbatches": cfg.train.microbatches,
      "params": sum(math.prod(a.shape) for a in jax.tree.leaves(params)),
      "param_bytes_per_device": sharding.per_device_bytes(params, shardings["params"]),
      "opt_state_bytes_per_device": sharding.per_device_bytes(state["opt_state"],
                                                              shardings["opt_state"]),
  }
  start = time.perf_counter()
  lowered = step_fn.lower(state, batch)
  report["lower_s"] = round(time.perf_counter() - start, 2)
  report["compiled"] = compile_step
  if cfg.model.moe.num_experts and cfg.model.moe.dispatch == "ragged":
    report["note"] = ("ragged_dot lowers to a dense masked product on CPU: temporaries "
                      "overstate TPU/GPU")
  if compile_step:
    start = time.perf_counter()
    memory = lowered.compile().memory_analysis()
    report["compile_s"] = round(time.perf_counter() - start, 2)
    report |= memory_report(memory)
  return report


def memory_report(memory) -> dict[str, int]:
  """Per-device bytes from XLA's memory analysis; total = live at the peak
  (arguments + outputs not aliased to donated arguments + temporaries)."""
  fields = {"temp_bytes_per_device": memory.temp_size_in_bytes,
            "argument_bytes_per_device": memory.argument_size_in_bytes,
            "output_bytes_per_device": memory.output_size_in_bytes,
            "alias_bytes_per_device": memory.alias_size_in_bytes,
            "code_bytes": memory.generated_code_size_in_bytes}
  fields["total_bytes_per_device"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                      - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return {k: int(v) for k, v in fields.items()}


def main(argv) -> None:
  del argv
  try:
    cfg = apply_overrides(_CONFIG.value, _MESH.value, _BATCH.value, _SEQ_LEN.value)
    wanted = _DEVICES.value or devices_from_argv([f"--mesh={_MESH.value}"])
    if wanted and wanted != jax.device_count():
      raise config_lib.ConfigError(
          f"{jax.device_count()} devices are visible but {wanted} were asked for: run as "
          f"`python -m nitp_jax.compile_check` (it sets {DEVICE_FLAG} before jax starts)")
    report = {"config": config_flags.get_config_filename(flags.FLAGS["config"])}
    report |= check(cfg, _COMPILE.value)
  except (config_lib.ConfigError, ValueError) as e:
    print(f"error: {cli.one_line(e)}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags_or_exit)
