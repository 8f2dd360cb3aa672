"""The one place that knows about devices: mesh, logical-axis rules, and the
shardings of parameters, optimizer state and batches.

Model code only names logical axes ("embed", "mlp", "expert", ...); the rules
below map them onto the mesh axes ("data", "fsdp", "tensor", "expert").

Mesh: `config.mesh.{data,fsdp,tensor,expert}` are the axis sizes inside one
slice (ICI; one -1 fills the slice), `config.mesh.dcn_{axis}` multiply an axis
across slices (DCN: multi-slice TPU, or the nodes of a GPU cluster, one
process per node). Axis `a` of the mesh has size `mesh.a * mesh.dcn_a`.

Tracing: Linen's activation constraints (`nn.with_logical_constraint`) only
act while the rules and a mesh are in context, so every sharded function is
jitted through `jit(fn, mesh, ...)`, which enters both while `fn` traces.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nitp_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axes, tried in order; a rule whose mesh axes are
# already used by another dimension of the same array is skipped (Flax's
# resolution). Parameters and activations have their own names: activations
# ("activation_*") shard their rows over every data-parallel axis and keep
# d_model whole.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_vocab", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_experts", "expert"),                # capacity buffers [E, G, C, D]:
    ("activation_expert_batch", ("data", "fsdp")),   # token groups beside experts
    ("expert", "expert"),                # expert parallelism (before embed)
    ("embed", ("fsdp", "expert")),       # FSDP on d_model; dense weights also
    ("embed", "fsdp"),                   # over "expert", experts' over fsdp
    ("vocab", "tensor"),
    ("q_heads", "tensor"),               # Megatron-style tensor parallelism
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),                    # the scanned layer dimension
)


def dcn_shape(mesh_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Per-axis factors across slices (1 when the config has no dcn_* field)."""
  return tuple(int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES)


def ici_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Axis sizes inside one slice of `num_devices`, the (at most one) -1 filled."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"config.mesh: only one axis may be -1, got {', '.join(fill)}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"config.mesh: fixed axes multiply to {known}, which does not "
                        f"divide the {num_devices} devices per slice")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                      f"devices per slice but {num_devices} are available; set one axis "
                      "to -1")
  return tuple(sizes)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Full axis sizes (ICI × DCN) for `num_devices` devices in all."""
  dcn = dcn_shape(mesh_cfg)
  slices = math.prod(dcn)
  if num_devices % slices:
    raise ConfigError(f"config.mesh: dcn_* factors multiply to {slices} slices, which does "
                      f"not divide the {num_devices} devices")
  ici = ici_shape(mesh_cfg, num_devices // slices)
  return tuple(i * d for i, d in zip(ici, dcn))


def device_grid(mesh_cfg: ml_collections.ConfigDict,
                devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as the mesh: TPU slices (or processes, when all devices
  are in one slice: GPU nodes) are the DCN granules; inside each the ICI shape."""
  dcn = dcn_shape(mesh_cfg)
  mesh_shape(mesh_cfg, len(devices))  # raises ConfigError when the sizes do not fit
  ici = ici_shape(mesh_cfg, len(devices) // math.prod(dcn))
  by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
  granules = len({d.process_index if by_process else d.slice_index for d in devices})
  if granules != math.prod(dcn):
    unit = "processes" if by_process else "slices"
    raise ConfigError(f"config.mesh: dcn_* factors {dict(zip(MESH_AXES, dcn))} multiply to "
                      f"{math.prod(dcn)} but the devices span {granules} {unit}")
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=by_process,
                                              allow_split_physical_axes=True)


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of config.mesh over `devices` (default: all), Auto axis types."""
  devices = list(devices if devices is not None else jax.devices())
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn_shape(mesh_cfg)) == 1:
    return jax.make_mesh(mesh_shape(mesh_cfg, len(devices)), MESH_AXES,
                         axis_types=axis_types, devices=devices)
  return Mesh(device_grid(mesh_cfg, devices), MESH_AXES, axis_types=axis_types)


def _without_unit_axes(spec: P, mesh: Mesh) -> P:
  """`spec` minus mesh axes of size 1 (the same sharding, a simpler spec)."""
  def keep(entry):
    names = tuple(n for n in mesh_axis_names(entry) if mesh.shape[n] > 1)
    return None if not names else names[0] if len(names) == 1 else names
  return P(*(keep(e) for e in spec))


def logical_shardings(logical_specs: Any, mesh: Mesh) -> Any:
  """NamedSharding tree for a tree of logical PartitionSpecs."""
  specs = nn.logical_to_mesh(logical_specs, LOGICAL_RULES)
  return jax.tree.map(lambda s: NamedSharding(mesh, _without_unit_axes(s, mesh)), specs,
                      is_leaf=lambda x: isinstance(x, P))


def in_context(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with the logical rules and `mesh` in context, so the model's
  activation constraints apply (they are no-ops otherwise)."""
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with nn.logical_axis_rules(LOGICAL_RULES), jax.sharding.use_abstract_mesh(
        mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def jit(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
  """jax.jit(fn, **jit_kwargs) with the rules and mesh active while tracing."""
  return jax.jit(in_context(fn, mesh), **jit_kwargs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_rows(mesh: Mesh, rows: int) -> dict[int, np.ndarray]:
  """{process index: the global batch rows its devices hold, ascending}."""
  indices = batch_sharding(mesh).devices_indices_map((rows, 1))
  out: dict[int, set[int]] = {}
  for device, (row_slice, _) in indices.items():
    out.setdefault(device.process_index, set()).update(range(*row_slice.indices(rows)))
  return {p: np.array(sorted(r), dtype=np.int64) for p, r in sorted(out.items())}


def check_process_rows(mesh: Mesh, rows: int) -> None:
  """Each process must hold its own rows/P rows: it feeds only those."""
  per_process = process_rows(mesh, rows)
  seen = np.concatenate(list(per_process.values()))
  if len(per_process) > 1 and (len(np.unique(seen)) != rows or
                               any(len(r) != rows // len(per_process)
                                   for r in per_process.values())):
    raise ConfigError(f"config.mesh {dict(mesh.shape)}: processes would share batch rows "
                      "(a non-batch axis spans processes); put tensor/dcn factors on "
                      "data, fsdp or expert instead")


def local_rows(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, np.ndarray]:
  """This process's rows of a global host batch (the same on every process)."""
  if jax.process_count() == 1:
    return batch
  rows = process_rows(mesh, next(iter(batch.values())).shape[0])[jax.process_index()]
  return {k: v[rows] for k, v in batch.items()}


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's rows into one global array per field."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def logical_to_mesh(*logical: str | None) -> P:
  """The mesh PartitionSpec of one array's logical axis names under the rules,
  for code that must name mesh axes itself (shard_map specs, collectives)."""
  return nn.logical_to_mesh_axes(logical, LOGICAL_RULES)


def mesh_axis_names(entry: str | Sequence[str] | None) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None: none)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def param_specs(abstract: Any, logical: Any) -> dict[str, tuple[tuple, P]]:
  """{"backbone/embed": (shape, mesh PartitionSpec), ...} for every parameter
  of `model.abstract_params(cfg)`'s (shapes, logical specs)."""
  specs = nn.logical_to_mesh(logical, LOGICAL_RULES)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  return {"/".join(k.key for k in path): (tuple(leaf.shape), spec)
          for (path, leaf), spec in zip(flat, spec_leaves)}


def _axes_size(mesh: Mesh, entry) -> int:
  return math.prod(mesh.shape[n] for n in mesh_axis_names(entry))


def check_config(cfg: ml_collections.ConfigDict, mesh: Mesh, abstract_params: Any,
                 logical_specs: Any) -> None:
  """ConfigError unless cfg's batch and the parameters (shapes and logical
  specs, as `model.abstract_params` gives them) divide evenly over mesh."""
  t = cfg.train
  shards, micro_rows = batch_shards(mesh), t.global_batch // t.microbatches
  if micro_rows % shards:
    raise ConfigError(f"config.train.global_batch={t.global_batch} / microbatches="
                      f"{t.microbatches} = {micro_rows} rows must be divisible by the "
                      f"{shards} batch shards (mesh data*fsdp*expert)")
  check_process_rows(mesh, t.global_batch)
  for path, (shape, spec) in param_specs(abstract_params, logical_specs).items():
    for dim, entry in zip(shape, spec):
      if dim % _axes_size(mesh, entry):
        raise ConfigError(f"config.mesh: parameter {path} {tuple(shape)} cannot be split "
                          f"{spec}: mesh {entry}={_axes_size(mesh, entry)} does not divide "
                          f"{dim}; choose mesh sizes that divide the model's dimensions")


def per_device_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of a tree of arrays with these shardings."""
  total = 0
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
    total += math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
  return total
