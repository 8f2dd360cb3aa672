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

import json
import math
import re
import time

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from nitp_jax import cli
from nitp_jax import config as config_lib
from nitp_jax import fit
from nitp_jax import jitted
from nitp_jax import sharding
from nitp_jax.errors import ConfigError


def parse_mesh(spec: str) -> dict[str, int]:
  """'data=1,fsdp=8' -> {'data': 1, 'fsdp': 8} (no validation of names)."""
  out = {}
  for item in filter(None, spec.split(",")):
    name, _, value = item.partition("=")
    if not re.fullmatch(r"-?\d+", value.strip()):
      raise ConfigError(f"--mesh item {item!r} is not AXIS=SIZE")
    out[name.strip()] = int(value)
  return out


def devices_wanted(mesh: str, devices: int | None) -> int | None:
  """Simulated devices --devices / --mesh ask for (None: the machine's own)."""
  if devices:
    return devices
  sizes = parse_mesh(mesh).values()
  return math.prod(sizes) if sizes and all(s > 0 for s in sizes) else None


def simulate_devices(n: int) -> None:
  """Run on `n` CPU devices (any accelerator is ignored). Must come before
  anything touches a device; ConfigError when that has already happened."""
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:  # the backend is already up
    raise ConfigError(f"cannot simulate {n} devices: the JAX backend has already started "
                      f"({e}); call simulate_devices first") from e
  if jax.device_count() != n:
    raise ConfigError(f"{jax.device_count()} devices are visible but {n} were asked for")


def apply_overrides(cfg: ml_collections.ConfigDict, mesh: str, batch: int | None,
                    seq_len: int | None) -> ml_collections.ConfigDict:
  """cfg with --mesh / --batch / --seq_len applied, validated."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  if mesh:
    sizes = parse_mesh(mesh)
    unknown = set(sizes) - set(cfg.mesh.keys())
    if unknown:
      raise ConfigError(f"--mesh names unknown axes {sorted(unknown)}; "
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


def check(cfg: ml_collections.ConfigDict, compile_step: bool = True) -> dict:
  """Lower (and compile) cfg's train step on the current devices; the report."""
  steps = jitted.build(cfg, jitted.mesh_for_config(cfg))
  mesh, state, shardings = steps.mesh, steps.abstract_state, steps.state_shardings
  params = state["params"]
  report = {
      "devices": mesh.size, "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch": cfg.train.global_batch, "seq_len": cfg.train.seq_len,
      "microbatches": cfg.train.microbatches,
      **({"dispatch": cfg.model.moe.dispatch} if config_lib.is_moe(cfg) else {}),
      "params": sum(math.prod(a.shape) for a in jax.tree.leaves(params)),
      **fit.state_bytes_per_device(state, shardings),
  }
  start = time.perf_counter()
  lowered = steps.train.lower(state, steps.abstract_batch())
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


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  for name in ("devices", "batch", "seq_len"):
    if f[name].value is not None and f[name].value <= 0:
      raise ConfigError(f"--{name}={f[name].value} is invalid: must be a positive integer")
  wanted = devices_wanted(f.mesh, f.devices)
  if wanted:
    simulate_devices(wanted)
  cfg = apply_overrides(f.config, f.mesh, f.batch, f.seq_len)
  report = {"config": config_flags.get_config_filename(f["config"])}
  report |= check(cfg, f.compile)
  print(json.dumps(report), flush=True)


def define_flags() -> None:
  cli.define_config_flag("Config file, e.g. configs/moe_9b.py.")
  flags.mark_flags_as_required(["config"])
  flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. data=1,fsdp=8,tensor=1,expert=8 "
                      "(axes not named are 1; dcn_data=2 etc. for multi-slice).")
  flags.DEFINE_integer("devices", None, "Device count; the config's mesh fills its -1 axis "
                       "(default: the --mesh product).")
  flags.DEFINE_integer("batch", None, "Override train.global_batch.")
  flags.DEFINE_integer("seq_len", None, "Override train.seq_len.")
  flags.DEFINE_bool("compile", True, "Compile too (slow for big models on CPU); false "
                    "reports lowering-only numbers.")


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--config=FILE [--mesh=fsdp=8,expert=8] "
               "[--devices=N] [--batch=N] [--seq_len=N] [--compile=false]")
