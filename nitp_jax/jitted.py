"""The jitted, sharded steps of a config on a mesh: the one builder that
training, evaluation, `compile_check` and the benchmarks use.

    steps = jitted.build(cfg, mesh)
    state = steps.init(jax.random.key(0))
    state, metrics = steps.train(state, batch)   # donates `state`

Every function is `jax.jit` with `NamedSharding`s in and out (the modern
pjit), traced with the logical-axis rules and the mesh in context.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nitp_jax import model as model_lib
from nitp_jax import optim
from nitp_jax import sharding
from nitp_jax import step as step_lib

BATCH_FIELDS = ("tokens", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Steps:
  """A config's train, eval and geometry steps on `mesh`, and its state layout."""
  cfg: ml_collections.ConfigDict
  mesh: Mesh
  optimizer: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict      # ShapeDtypeStructs that carry their shardings
  init: Callable[[jax.Array], step_lib.State]
  train: Callable[[step_lib.State, dict], tuple[step_lib.State, dict]]
  eval: Callable[[dict, dict], dict]
  geometry: Callable[[dict, dict], dict]
  score: Callable[[dict, dict], jax.Array]

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch as shapes, for lowering without data."""
    shape = (self.cfg.train.global_batch, self.cfg.train.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for k in BATCH_FIELDS}


def mesh_for_config(cfg: ml_collections.ConfigDict,
                    devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of cfg.mesh over `devices` (default: all), after checking that
  cfg's batch and parameters divide over it (ConfigError otherwise)."""
  mesh = sharding.make_mesh(cfg.mesh, devices)
  sharding.check_config(cfg, mesh, *model_lib.abstract_params(cfg))
  return mesh


def build(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Steps:
  """Jit cfg's steps for `mesh` (nothing is compiled or allocated yet)."""
  optimizer = optim.make_optimizer(cfg.train)
  abstract, shardings = step_lib.state_shardings(cfg, optimizer, mesh)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  batch = sharding.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  params = shardings["params"]

  def on_mesh(fn: Callable, in_shardings: Any, out_shardings: Any, **kw) -> Callable:
    return sharding.jit(fn, mesh, in_shardings=in_shardings, out_shardings=out_shardings, **kw)

  return Steps(
      cfg=cfg, mesh=mesh, optimizer=optimizer, state_shardings=shardings,
      abstract_state=abstract_state,
      init=jax.jit(lambda rng: step_lib.init_state(cfg, optimizer, rng), out_shardings=shardings),
      train=on_mesh(step_lib.make_train_step(cfg, optimizer), (shardings, batch),
                    (shardings, replicated), donate_argnums=0),
      eval=on_mesh(step_lib.make_eval_step(cfg), (params, batch), replicated),
      geometry=on_mesh(step_lib.make_geometry_step(cfg), (params, batch), replicated),
      score=on_mesh(step_lib.make_score_step(cfg), (params, batch), replicated))
