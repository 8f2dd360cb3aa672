"""The one place that knows about devices: mesh, logical-axis rules, and the
shardings of parameters, optimizer state and batches.

Model code only names logical axes ("embed", "mlp", "expert", ...); the rules
below map them onto the mesh axes ("data", "fsdp", "tensor", "expert").
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axes, tried in order; a mesh axis already used by an
# earlier dimension of the same array is skipped (Flax's resolution).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("layers", None),
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Axis sizes with the (at most one) -1 filled so the product is num_devices."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {', '.join(fill)}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh: fixed axes multiply to {known}, which does not divide "
                       f"the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices but {num_devices} are available; set one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_shardings(logical_specs: Any, mesh: Mesh) -> Any:
  """NamedSharding tree for a tree of logical PartitionSpecs."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state: Any,
                    param_shardings: Any, mesh: Mesh) -> dict:
  """Shardings for {"step", "params", "opt_state"}: optimizer moments follow
  their parameter, everything else (counts) is replicated."""
  replicated = NamedSharding(mesh, P())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state, param_shardings,
                              transform_non_params=lambda _: replicated)
  return {"step": replicated, "params": param_shardings, "opt_state": opt}


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's rows into one global array per field."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
