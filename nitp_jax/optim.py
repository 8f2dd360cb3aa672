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


SCHEDULE_FIELDS = ("lr", "steps", "warmup_steps", "decay_fraction", "final_lr_ratio", "schedule")


def schedule_change(saved: ml_collections.ConfigDict, current: ml_collections.ConfigDict,
                    step: int) -> str | None:
  """A line saying how the learning rate moves at `step` when a run resumes
  under other schedule fields (`train` configs) than its checkpoint's, e.g.
  a finished run given more steps re-warms from its decayed rate to the
  peak; None when the rate at `step` is the same (or `saved` predates a field)."""
  if any(k not in saved for k in SCHEDULE_FIELDS):
    return None
  before, after = float(wsd_schedule(saved)(step)), float(wsd_schedule(current)(step))
  if abs(after - before) <= 1e-6 * max(abs(before), abs(after), 1e-30):
    return None
  changed = "; ".join(f"train.{k}: {saved[k]!r} -> {current[k]!r}" for k in SCHEDULE_FIELDS
                      if saved[k] != current[k])
  return (f"the learning-rate schedule differs from the checkpoint's ({changed}): the rate "
          f"at step {step} is {after:.2e}, where the checkpoint's run was at {before:.2e}")


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
