"""AdamW with a warmup-stable-decay schedule (paper App. B)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def wsd_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak, constant, then decay over the last
  `decay_fraction` of the steps: linear to `final_lr_ratio`·peak ("wsd") or
  exponential to it ("wsd_exp")."""
  # Hand-written, not optax.join_schedules of linear/exponential pieces:
  # measured, the optax form (same values to <= 40 float32 ulps) fuses
  # differently inside the jitted train step and changed the losses of a
  # 200-step configs/tiny.py run from step 180 on (the decay), and its linear
  # warmup piece, (init - end)·(1 - x) + end, changed a 40-step run's from
  # step 5. Resumed and compared runs rely on bitwise-stable schedules.
  t = train_cfg
  peak, steps, warmup = t.lr, t.steps, t.warmup_steps
  decay_steps = int(round(t.decay_fraction * steps))
  decay_start = steps - decay_steps
  final = t.final_lr_ratio

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1) / max(warmup, 1)) if warmup else 1.0
    progress = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    if t.schedule == "wsd_exp":
      decay = final ** progress
    else:
      decay = 1.0 - (1.0 - final) * progress
    return peak * warm * decay

  return schedule


def decay_mask(params) -> dict:
  """Weight decay on weight matrices and embeddings, not on norm scales or
  biases (named, since scanned layers stack vectors into matrices)."""
  def decays(path, _):
    name = path[-1].key
    return name != "scale" and not name.endswith("bias")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  t = train_cfg
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(wsd_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                  mask=decay_mask))
