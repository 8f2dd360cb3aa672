"""Multi-host start-up: `jax.distributed.initialize()` when this process is one
of several, before anything touches a device.

Where the process count and rank come from, first match wins:

  explicit  coordinator_address=HOST:PORT, num_processes=N, process_id=I
            (the entry point's --coordinator_address/--num_processes/
            --process_id flags)
  SLURM     SLURM_NTASKS > 1: JAX's own SLURM detection, forced, reads the
            rest (coordinator = first host of SLURM_STEP_NODELIST on port
            61440 + SLURM_JOB_ID % 4096, or $JAX_COORDINATOR_PORT; rank
            SLURM_PROCID). We only add the local devices: JAX would give each
            process the one GPU SLURM_LOCALID, while one task per node
            (launch/gpu_slurm.sh) must keep all of the node's GPUs.
  TPU       a pod slice or multi-slice (TPU_WORKER_HOSTNAMES lists several
            hosts, or MEGASCALE_COORDINATOR_ADDRESS is set): JAX reads the
            rest from the TPU environment.

mode "on" always initializes (JAX auto-detects, e.g. a Cloud TPU VM pod whose
shell has no TPU_* variables); "off" never does. No flags are defined here:
the entry point owns them and passes their values.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

from nitp_jax.errors import LaunchError

# What jax's SLURM detection (jax/_src/clusters/slurm_cluster.py) reads
# besides SLURM_NTASKS and SLURM_PROCID; it is skipped unless all are set.
_JAX_SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Launch:
  """What `jax.distributed.initialize` gets; None fields are auto-detected."""
  source: str                           # "flags", "slurm", "tpu" or "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  cluster_detection_method: str | None = None

  def kwargs(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name != "source" and getattr(self, f.name) is not None}
    if "local_device_ids" in out:
      out["local_device_ids"] = list(out["local_device_ids"])
    return out


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
  tasks = int(env.get("SLURM_NTASKS") or 1)
  if tasks <= 1 or "SLURM_PROCID" not in env:
    return None
  missing = [v for v in _JAX_SLURM_VARIABLES if v not in env]
  if missing:
    raise LaunchError(f"SLURM_NTASKS={tasks} but {', '.join(missing)} not set: launch with "
                      "srun inside an allocation")
  return Launch("slurm", local_device_ids=_slurm_local_devices(env, tasks),
                cluster_detection_method="slurm")


def _tpu(env: Mapping[str, str]) -> Launch | None:
  workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(workers) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return Launch("tpu")
  return None


def detect(env: Mapping[str, str], mode: str = "auto", coordinator_address: str = "",
           num_processes: int | None = None, process_id: int | None = None
           ) -> Launch | None:
  """The launch this process is part of, or None for a single process."""
  if mode not in ("auto", "on", "off"):
    raise LaunchError(f"--distributed={mode}: use auto, on or off")
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


def maybe_initialize(mode: str = "auto", coordinator_address: str = "",
                     num_processes: int | None = None, process_id: int | None = None,
                     env: Mapping[str, str] | None = None) -> Launch | None:
  """Initialize jax.distributed if this is a multi-process launch; returns
  the launch (None for a single process). Call before any device use.
  `mode` is auto, on or off; the explicit three go together."""
  launch = detect(os.environ if env is None else env, mode, coordinator_address,
                  num_processes, process_id)
  if launch is not None and not jax.distributed.is_initialized():
    try:
      jax.distributed.initialize(**launch.kwargs())
    except ValueError as e:  # "on" where JAX detects no cluster: nothing to join
      if launch.source != "auto":
        raise
      raise LaunchError(f"--distributed=on but JAX found no cluster to join ({e}): pass "
                        "--coordinator_address, --num_processes and --process_id, or use "
                        "--distributed=auto for a single process") from e
  return launch


def barrier(name: str) -> None:
  """Wait until every process gets here (no-op for a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)
