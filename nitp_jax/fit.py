"""Will the train state fit? Checked before anything is allocated.

What one device holds of parameters and optimizer state is exact from the
abstract state and its shardings (`state_bytes_per_device`, also reported by
`compile_check`). One device's memory is its `memory_stats()["bytes_limit"]`
on an accelerator; on CPU, where `memory_stats()` is None, the host's RAM
(or its cgroup limit, if lower) shared by the process's local devices.
Activations and XLA's temporaries come on top, so passing is necessary, not
sufficient: `python -m nitp_jax.compile_check` measures the whole step, and
`out_of_memory_as_config_error` turns XLA's RESOURCE_EXHAUSTED into one line.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import jax

from nitp_jax import jitted
from nitp_jax import sharding
from nitp_jax.errors import ConfigError

CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max",                    # cgroup v2
                 "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v1


def state_bytes_per_device(abstract_state: dict, shardings: dict) -> dict[str, int]:
  """Bytes one device holds of the parameters and of the optimizer state."""
  return {"param_bytes_per_device": sharding.per_device_bytes(abstract_state["params"],
                                                              shardings["params"]),
          "opt_state_bytes_per_device": sharding.per_device_bytes(abstract_state["opt_state"],
                                                                  shardings["opt_state"])}


def host_ram_bytes() -> int:
  """Physical RAM of this host, or the cgroup's memory limit when lower."""
  limits = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
  for path in CGROUP_LIMITS:
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit():
      limits.append(int(text))
  return min(limits)


def device_memory(device: jax.Device | None = None) -> tuple[int, str]:
  """(bytes one device can hold, what that memory is, in words)."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats()
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"memory of one {device.device_kind}"
  count = jax.local_device_count()
  return host_ram_bytes() // count, f"host RAM / {count} {device.platform} device(s)"


def _gb(n: int) -> str:
  return f"{n / 1e9:.1f} GB"


def check(steps: jitted.Steps) -> None:
  """ConfigError (one line: what is needed, what this machine has, where to
  run instead) when one device cannot hold its share of the train state."""
  need = sum(state_bytes_per_device(steps.abstract_state, steps.state_shardings).values())
  have, what = device_memory()  # this process's devices (others may not be addressable)
  if need <= have:
    return
  total = sum(math.prod(a.shape) * a.dtype.itemsize
              for a in jax.tree.leaves((steps.abstract_state["params"],
                                        steps.abstract_state["opt_state"])))
  params = sum(math.prod(a.shape) for a in jax.tree.leaves(steps.abstract_state["params"]))
  mesh = ", ".join(f"{k}={v}" for k, v in steps.mesh.shape.items())
  raise ConfigError(
      f"the model does not fit: one device must hold {_gb(need)} of parameters and "
      f"optimizer state ({params / 1e9:.2f}B parameters, mesh {mesh}) but has "
      f"{_gb(have)} ({what}). Train it on more devices (launch/tpu_vm.sh for a TPU "
      f"VM or pod, launch/gpu_slurm.sh for a GPU cluster) with the state sharded by "
      f"--config.mesh.fsdp=-1 (its {_gb(total)} need at least "
      f"{math.ceil(total / have)} devices of this size, more for activations); try a mesh "
      "first with `python -m nitp_jax.compile_check --config=<this config> "
      "--mesh=fsdp=N --compile=false`")


@contextlib.contextmanager
def out_of_memory_as_config_error() -> Iterator[None]:
  """XLA's RESOURCE_EXHAUSTED (a step or state too large for the device)
  becomes a one-line ConfigError naming the settings that shrink it."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if not first.startswith("RESOURCE_EXHAUSTED"):
      raise
    raise ConfigError(
        f"the run does not fit in device memory ({first[:200]}): lower "
        "--config.train.global_batch or raise --config.train.microbatches, set "
        "--config.model.remat_policy=full and --config.model.ce_chunk=1024, or shard over "
        "more devices (--config.mesh.fsdp=-1); `python -m nitp_jax.compile_check` measures "
        "a step's memory, and rerunning resumes from the last checkpoint") from None
