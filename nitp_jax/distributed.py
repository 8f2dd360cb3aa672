"""Multi-host start-up: `jax.distributed.initialize()` when this process is one
of several, before anything touches a device.

Where the process count and rank come from, first match wins:

  flags   --coordinator_address=HOST:PORT --num_processes=N --process_id=I
  SLURM   SLURM_NTASKS > 1: coordinator = first host of SLURM_STEP_NODELIST
          (or SLURM_JOB_NODELIST / SLURM_NODELIST) on port
          $NITP_COORDINATOR_PORT (default 61440 + job id % 4096), rank
          SLURM_PROCID; one task per node sees all its GPUs.
  TPU     a pod slice or multi-slice (TPU_WORKER_HOSTNAMES lists several
          hosts, or MEGASCALE_COORDINATOR_ADDRESS is set): JAX reads the rest
          from the TPU environment.

`--distributed=on` always initializes (JAX auto-detects, e.g. a Cloud TPU
VM pod whose shell has no TPU_* variables); `off` never does.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

import jax
from absl import flags

from nitp_jax.errors import LaunchError

DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-host start-up: auto (detect SLURM / TPU pod / the flags below), "
    "on (always call jax.distributed.initialize()), off (single process).")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0, for a manual multi-process launch.")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes of a manual multi-process launch.")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Rank of this process (0 .. num_processes-1) in a manual launch.")

SLURM_BASE_PORT = 61440


@dataclasses.dataclass(frozen=True)
class Launch:
  """What `jax.distributed.initialize` gets; None fields are auto-detected."""
  source: str                           # "flags", "slurm", "tpu" or "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None

  def kwargs(self) -> dict:
    fields = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
    return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}


def expand_nodelist(nodelist: str) -> list[str]:
  """SLURM's compressed host list -> hosts: 'gpu[01-03,7],cpu1' ->
  ['gpu01', 'gpu02', 'gpu03', 'gpu7', 'cpu1']."""
  hosts = []
  for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
    if plain:
      hosts.append(plain)
      continue
    for part in ranges.split(","):
      lo, _, hi = part.partition("-")
      hosts += [f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi or lo) + 1)]
  return hosts


def _slurm_local_devices(env: Mapping[str, str], tasks: int) -> tuple[int, ...] | None:
  """Local accelerator ids for this task: all visible ones with one task per
  node, else the task's own (JAX's default would be [SLURM_LOCALID])."""
  nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES")
              or env.get("SLURM_NNODES") or tasks)
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  if tasks <= nodes:
    count = len(visible) or int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
    return tuple(range(count)) or None
  if len(visible) == 1:
    return (0,)
  return (int(env.get("SLURM_LOCALID", "0")),)


def _slurm(env: Mapping[str, str]) -> Launch | None:
  tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
  if tasks <= 1 or "SLURM_PROCID" not in env:
    return None
  nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
              or env.get("SLURM_NODELIST") or "")
  hosts = expand_nodelist(nodelist)
  if not hosts:
    raise LaunchError(f"SLURM_NTASKS={tasks} but no SLURM_STEP_NODELIST / SLURM_NODELIST "
                      "names the hosts: launch with srun inside an allocation")
  port = env.get("NITP_COORDINATOR_PORT") or str(
      SLURM_BASE_PORT + int(env.get("SLURM_JOB_ID", "0")) % 4096)
  return Launch("slurm", f"{hosts[0]}:{port}", tasks, int(env["SLURM_PROCID"]),
                _slurm_local_devices(env, tasks))


def _tpu(env: Mapping[str, str]) -> Launch | None:
  workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(workers) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return Launch("tpu")
  return None


def detect(env: Mapping[str, str], mode: str = "auto", coordinator_address: str = "",
           num_processes: int | None = None, process_id: int | None = None
           ) -> Launch | None:
  """The launch this process is part of, or None for a single process."""
  if mode == "off":
    return None
  explicit = (coordinator_address, num_processes, process_id)
  if any(v not in ("", None) for v in explicit):
    if coordinator_address == "" or num_processes is None or process_id is None:
      raise LaunchError("--coordinator_address, --num_processes and --process_id go "
                        "together: pass all three (or none, to auto-detect)")
    if not 0 <= process_id < num_processes:
      raise LaunchError(f"--process_id={process_id} must be in [0, --num_processes="
                        f"{num_processes})")
    return Launch("flags", coordinator_address, num_processes, process_id)
  launch = _slurm(env) or _tpu(env)
  if launch is None and mode == "on":
    return Launch("auto")
  return launch


def maybe_initialize(flag_values: flags.FlagValues = flags.FLAGS,
                     env: Mapping[str, str] | None = None) -> Launch | None:
  """Initialize jax.distributed if this is a multi-process launch; returns
  the launch (None for a single process). Call before any device use."""
  launch = detect(os.environ if env is None else env, flag_values.distributed,
                  flag_values.coordinator_address, flag_values.num_processes,
                  flag_values.process_id)
  if launch is not None and not jax.distributed.is_initialized():
    kwargs = launch.kwargs()
    if "local_device_ids" in kwargs:
      kwargs["local_device_ids"] = list(kwargs["local_device_ids"])
    jax.distributed.initialize(**kwargs)
  return launch


def barrier(name: str) -> None:
  """Wait until every process gets here (no-op for a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
