"""Pure step functions: state init, the train step (with gradient
accumulation), the eval and geometry steps, and the state's shardings.
Jitting happens in jitted.py."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nitp_jax import geometry
from nitp_jax import model as model_lib
from nitp_jax import objectives
from nitp_jax import optim
from nitp_jax import sharding

# {"step": int32[], "params", "opt_state", "nonfinite": int32[2] = (skipped in
# a row, skipped in total)}
State = dict[str, Any]


def init_state(cfg: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
               rng: jax.Array) -> State:
  params = model_lib.init_params(cfg, rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": optimizer.init(params), "nonfinite": jnp.zeros((2,), jnp.int32)}


def all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def state_shardings(cfg: ml_collections.ConfigDict, optimizer: optax.GradientTransformation,
                    mesh: Mesh) -> tuple[State, State]:
  """(abstract state, NamedSharding tree) without allocating anything:
  parameters by their logical axes, optimizer moments like their parameter,
  everything else (step, counts) replicated."""
  abstract = jax.eval_shape(lambda: init_state(cfg, optimizer, jax.random.key(0)))
  _, logical = model_lib.abstract_params(cfg)
  params = sharding.logical_shardings(logical, mesh)
  replicated = NamedSharding(mesh, P())
  opt_state = optax.tree_map_params(optimizer, lambda _, s: s, abstract["opt_state"], params,
                                    transform_non_params=lambda _: replicated)
  return abstract, {"step": replicated, "params": params, "opt_state": opt_state,
                    "nonfinite": replicated}


def _split_microbatches(batch: dict, n: int) -> dict:
  """[B, T] -> [n, B/n, T]; microbatch m takes rows m, m+n, ... so each
  device's rows stay on that device."""
  return {k: v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1)
          for k, v in batch.items()}


def make_train_step(cfg: ml_collections.ConfigDict, optimizer: optax.GradientTransformation
                    ) -> Callable[[State, dict], tuple[State, dict]]:
  loss_fn = objectives.make_loss_fn(cfg)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  schedule = optim.wsd_schedule(cfg.train)
  n_micro = cfg.train.microbatches

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    params, step = state["params"], state["step"]
    if n_micro == 1:
      (_, metrics), grads = grad_fn(params, batch, step)
    else:
      def accumulate(carry, micro):
        (_, m), g = grad_fn(params, micro, step)
        return jax.tree.map(jnp.add, carry, (g, m)), None
      micro = _split_microbatches(batch, n_micro)
      (_, m0), g0 = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), step)
      init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g0, m0))
      (grads, metrics), _ = jax.lax.scan(accumulate, init, micro)
      grads, metrics = jax.tree.map(lambda x: x / n_micro, (grads, metrics))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    # A non-finite loss or gradient skips the update: params and optimizer
    # state (moments, schedule count) stay as they were; the data moves on.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    streak, total = state["nonfinite"][0], state["nonfinite"][1]
    skipped = jnp.where(finite, 0, 1).astype(jnp.int32)
    nonfinite = jnp.stack([jnp.where(finite, 0, streak + 1), total + skipped])
    new_state = {"step": step + 1, "params": keep(new_params, params),
                 "opt_state": keep(opt_state, state["opt_state"]), "nonfinite": nonfinite}
    metrics |= {"grad_norm": grad_norm, "lr": schedule(step),
                "skipped_in_a_row": nonfinite[0], "skipped_total": nonfinite[1]}
    return new_state, metrics

  return train_step


def make_eval_step(cfg: ml_collections.ConfigDict) -> Callable[[dict, dict], dict]:
  """Per-batch sums weighted by valid tokens, so batches combine exactly."""
  loss_fn = objectives.make_loss_fn(cfg)

  def eval_step(params: dict, batch: dict) -> dict:
    _, metrics = loss_fn(params, batch, jnp.int32(2**30))
    tokens = jnp.sum(objectives.valid_pairs(batch["segment_ids"]))
    return {"tokens": tokens, **{k: metrics[k] * tokens for k in ("ntp", "nitp", "nitp_cos")
                                 if k in metrics}}

  return eval_step


def make_geometry_step(cfg: ml_collections.ConfigDict) -> Callable[[dict, dict], dict]:
  """Effective rank and mean cosine of the last and target hidden states."""
  model, _ = model_lib.build(cfg)

  def geometry_step(params: dict, batch: dict) -> dict:
    _, hidden, _ = model.apply({"params": params["backbone"]}, batch["tokens"],
                               batch["segment_ids"], batch["positions"])
    return geometry.geometry_metrics(hidden, batch["segment_ids"])

  return geometry_step
