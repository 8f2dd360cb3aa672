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

from nitp_jax import config as config_lib
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


def router_bias_update(backbone: dict, load_LxE: jax.Array, rate: float
                       ) -> dict[str, jax.Array]:
  """Auxiliary-loss-free balancing (DeepSeek-V3), outside the gradient:
  b_i + rate · sign(mean load - load_i) per MoE layer, from the expert loads
  [L_moe, E] of this step (MoE layers bottom first). Returns the new biases
  by segment/layer name (`model.with_router_biases` puts them back); {}
  when `backbone` has no router biases."""
  delta_LxE = rate * jnp.sign(jnp.mean(load_LxE, axis=-1, keepdims=True) - load_LxE)
  new, row = {}, 0
  for name, bias in model_lib.router_biases(backbone):
    n = bias.shape[0] if bias.ndim == 2 else 1
    d = delta_LxE[row:row + n]
    new[name] = bias + (d if bias.ndim == 2 else d[0]).astype(bias.dtype)
    row += n
  return new


def load_metrics(load_LxE: jax.Array, first_moe_layer: int) -> dict[str, jax.Array]:
  """Max-load / mean-load per MoE layer (`moe_load_max_over_mean_l<layer>`,
  1 = balanced, E = all copies on one expert) and the max over layers."""
  ratio_L = jnp.max(load_LxE, axis=-1) / jnp.mean(load_LxE, axis=-1)
  out = {f"moe_load_max_over_mean_l{first_moe_layer + i}": ratio_L[i]
         for i in range(load_LxE.shape[0])}
  return out | {"moe_load_max_over_mean": jnp.max(ratio_L)}


def make_train_step(cfg: ml_collections.ConfigDict, optimizer: optax.GradientTransformation
                    ) -> Callable[[State, dict], tuple[State, dict]]:
  loss_fn = objectives.make_loss_fn(cfg)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  schedule = optim.wsd_schedule(cfg.train)
  n_micro = cfg.train.microbatches
  moe_cfg = cfg.model.moe
  bias_rate = moe_cfg.bias_update_rate if config_lib.is_moe(cfg) else 0.0

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
    load_LxE = metrics.pop(model_lib.LOAD_KEY, None)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if load_LxE is not None:
      metrics |= load_metrics(load_LxE, moe_cfg.num_dense_layers)
      if bias_rate > 0:
        # The router biases get no gradient (the optimizer's update of them
        # is 0 and is discarded): they follow the balancing rule instead.
        new_params = {**new_params, "backbone": model_lib.with_router_biases(
            new_params["backbone"],
            router_bias_update(params["backbone"], load_LxE, bias_rate))}
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


def make_score_step(cfg: ml_collections.ConfigDict) -> Callable[[dict, dict], jax.Array]:
  """Per row, the summed log-likelihood of `batch["targets"]` where
  `batch["scored"]` is 1: how a multiple-choice task scores a choice after
  its context. Full [B, T, V] logits, as the held-out evaluation without
  ce_chunk."""
  model, _ = model_lib.build(cfg)

  def score_step(params: dict, batch: dict) -> jax.Array:
    logits_BxTxV, _, _ = model.apply({"params": params["backbone"]}, batch["tokens"],
                                     batch["segment_ids"], batch["positions"])
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    target_BxT = jnp.take_along_axis(logits_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
    loglik_BxT = target_BxT - jax.nn.logsumexp(logits_BxTxV, axis=-1)
    return jnp.sum(jnp.where(batch["scored"] > 0, loglik_BxT, 0.0), axis=-1)

  return score_step


def make_geometry_step(cfg: ml_collections.ConfigDict) -> Callable[[dict, dict], dict]:
  """Effective rank and mean cosine of the last and target hidden states."""
  model, _ = model_lib.build(cfg)

  def geometry_step(params: dict, batch: dict) -> dict:
    _, hidden, _ = model.apply({"params": params["backbone"]}, batch["tokens"],
                               batch["segment_ids"], batch["positions"])
    return geometry.geometry_metrics(hidden, batch["segment_ids"])

  return geometry_step
