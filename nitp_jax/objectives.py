"""Pure losses: next-token cross-entropy, NITP (with the paper's ablations),
the generic cosine regulariser baseline, and the total used for training.

All reductions are masked means in float32. Position t is valid for NTP and
for NITP with shift 1 iff t+1 is a real token of the same document.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

from nitp_jax import model as model_lib
from nitp_jax import model_config
from nitp_jax.model_config import NITPConfig


def shift_left(x_BxT: jax.Array, shift: int = 1, fill=0) -> jax.Array:
  """x[:, t + shift], padded with `fill` at the end."""
  if shift == 0:
    return x_BxT
  pad = jnp.full_like(x_BxT[:, :shift], fill)
  return jnp.concatenate([x_BxT[:, shift:], pad], axis=1)


def valid_pairs(segment_ids_BxT: jax.Array, shift: int = 1) -> jax.Array:
  """[B, T] bool: position t has a target at t+shift in the same document."""
  nxt_BxT = shift_left(segment_ids_BxT, shift)
  return (segment_ids_BxT != 0) & (nxt_BxT == segment_ids_BxT)


def masked_mean(x_BxT: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  m = mask_BxT.astype(jnp.float32)
  return jnp.sum(x_BxT.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def ntp_loss(logits_BxTxV: jax.Array, tokens_BxT: jax.Array,
             segment_ids_BxT: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over valid positions, in float32."""
  logits = logits_BxTxV.astype(jnp.float32)
  targets_BxT = shift_left(tokens_BxT)
  target_logit_BxT = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  ce_BxT = jax.nn.logsumexp(logits, axis=-1) - target_logit_BxT
  return masked_mean(ce_BxT, valid_pairs(segment_ids_BxT))


def chunked_ntp_loss(normed_BxTxD: jax.Array, unembed_DxV: jax.Array, tokens_BxT: jax.Array,
                     segment_ids_BxT: jax.Array, chunk: int, compute_dtype=jnp.float32
                     ) -> jax.Array:
  """`ntp_loss` of `unembed(normed)` computed `chunk` positions at a time.

  `normed_BxTxD` is what `model.apply(..., return_logits=False)` returns. A
  scan over sequence chunks; each chunk's [B, chunk, V] logits are rebuilt in
  the backward pass (jax.checkpoint), so no [B, T, V] buffer ever exists. The
  price: the unembedding matmul runs once more (≈ +2·V·d FLOPs per token).
  """
  b, t, _ = normed_BxTxD.shape
  chunk = min(chunk, t)
  n = -(-t // chunk)
  pad = n * chunk - t
  targets_BxT = jnp.pad(shift_left(tokens_BxT), ((0, 0), (0, pad)))
  valid_BxT = jnp.pad(valid_pairs(segment_ids_BxT), ((0, 0), (0, pad)))
  x_BxTxD = jnp.pad(normed_BxTxD, ((0, 0), (0, pad), (0, 0)))
  split = lambda a: a.reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_ce_sum(x_BxCxD, unembed_DxV, targets_BxC, valid_BxC):
    logits = model_lib.unembed(x_BxCxD, unembed_DxV, compute_dtype).astype(jnp.float32)
    target_logit_BxC = jnp.take_along_axis(logits, targets_BxC[..., None], axis=-1)[..., 0]
    ce_BxC = jax.nn.logsumexp(logits, axis=-1) - target_logit_BxC
    return jnp.sum(jnp.where(valid_BxC, ce_BxC, 0.0))

  def body(total, xs):
    return total + chunk_ce_sum(xs[0], unembed_DxV, xs[1], xs[2]), None

  total, _ = jax.lax.scan(body, jnp.float32(0.0),
                          (split(x_BxTxD), split(targets_BxT), split(valid_BxT)))
  return total / jnp.maximum(jnp.sum(valid_BxT, dtype=jnp.float32), 1.0)


def _cosine(a_BxTxD, b_BxTxD, eps=1e-6):
  dot = jnp.sum(a_BxTxD * b_BxTxD, axis=-1)
  norms = jnp.linalg.norm(a_BxTxD, axis=-1) * jnp.linalg.norm(b_BxTxD, axis=-1)
  return dot / jnp.maximum(norms, eps)


def alignment_loss(pred_BxTxD: jax.Array, target_BxTxD: jax.Array, kind: str) -> jax.Array:
  """Per-position loss [B, T] between prediction and target vectors."""
  p = pred_BxTxD.astype(jnp.float32)
  z = target_BxTxD.astype(jnp.float32)
  if kind == "cosine":
    return 1.0 - _cosine(p, z)
  if kind == "mse":
    return jnp.mean((p - z) ** 2, axis=-1)
  if kind == "smooth_l1":
    d = jnp.abs(p - z)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5), axis=-1)
  if kind == "kl":  # KL(softmax(z) || softmax(p)) over features
    log_q = jax.nn.log_softmax(z, axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q - jax.nn.log_softmax(p, axis=-1)), axis=-1)
  raise ValueError(f"unknown NITP loss {kind!r}")


def nitp_loss(pred_BxTxD: jax.Array, target_BxTxD: jax.Array, segment_ids_BxT: jax.Array,
              shift: int = 1, kind: str = "cosine", stop_gradient: bool = True
              ) -> tuple[jax.Array, jax.Array]:
  """(loss, mean cosine) aligning P(h_t) with z_{t+shift} (Eq. 3)."""
  if stop_gradient:
    target_BxTxD = jax.lax.stop_gradient(target_BxTxD)
  z_BxTxD = shift_left(target_BxTxD, shift) if shift else target_BxTxD
  valid_BxT = valid_pairs(segment_ids_BxT, shift)
  loss = masked_mean(alignment_loss(pred_BxTxD, z_BxTxD, kind), valid_BxT)
  cos = masked_mean(_cosine(pred_BxTxD.astype(jnp.float32), z_BxTxD.astype(jnp.float32)),
                    valid_BxT)
  return loss, cos


def mean_pairwise_cosine_per_row(h_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """Mean cosine over pairs i != j of valid tokens within each row, averaged
  over rows: the generic cosine regulariser (after Gao et al. 2019). O(T·D)."""
  u = h_BxTxD.astype(jnp.float32)
  u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-6)
  m = mask_BxT.astype(jnp.float32)
  u = u * m[..., None]
  n_B = jnp.sum(m, axis=1)
  s_BxD = jnp.sum(u, axis=1)
  pair_sum_B = jnp.sum(s_BxD * s_BxD, axis=-1) - jnp.sum(u * u, axis=(1, 2))
  pairs_B = n_B * (n_B - 1)
  has_pairs_B = pairs_B > 0
  per_row_B = jnp.where(has_pairs_B, pair_sum_B / jnp.maximum(pairs_B, 1.0), 0.0)
  return jnp.sum(per_row_B) / jnp.maximum(jnp.sum(has_pairs_B), 1)


def nitp_weight(nitp: NITPConfig, step: jax.Array) -> jax.Array:
  """λ, or 0 before `nitp.start_step`."""
  return jnp.where(step >= nitp.start_step, nitp.weight, 0.0).astype(jnp.float32)


LossFn = Callable[[dict, dict, jax.Array], tuple[jax.Array, dict]]


def make_loss_fn(cfg: ml_collections.ConfigDict) -> LossFn:
  """loss_fn(params, batch, step) -> (total, metrics); pure, jit-able.

  total = ntp + λ·(nitp or cosine regulariser) + MoE aux losses. For a MoE
  model, metrics[model.LOAD_KEY] is the [L_moe, E] expert load (not a scalar:
  the train step turns it into a bias update and per-layer scalars).
  """
  m, n = model_config.from_config(cfg)
  model, projector = model_lib.build_modules(m, n)
  chunk = m.ce_chunk
  # A dense model has no router: its aux metrics are zeros, weighted by 0.
  aux_weight, z_weight = (m.moe.aux_loss_weight, m.moe.z_loss_weight) if m.moe else (0.0, 0.0)
  if m.moe and m.moe.balance_loss == "none":
    aux_weight = 0.0  # the balance loss is still computed and logged

  def loss_fn(params: dict, batch: dict, step: jax.Array):
    tokens, seg = batch["tokens"], batch["segment_ids"]
    out, hidden, aux = model.apply({"params": params["backbone"]}, tokens, seg,
                                   batch["positions"], return_logits=not chunk)
    if chunk:
      unembed_DxV = model_lib.unembed_matrix(params["backbone"], m.tie_embeddings)
      ntp = chunked_ntp_loss(out, unembed_DxV, tokens, seg, chunk, m.compute_jnp_dtype)
    else:
      ntp = ntp_loss(out, tokens, seg)
    lam = nitp_weight(n, step)
    metrics = {"ntp": ntp, "nitp_weight": lam}
    if n.weight > 0 and n.variant == "nitp":
      h_BxTxD = hidden["last"]
      pred_BxTxD = h_BxTxD if projector is None else projector.apply(
          {"params": params["projector"]}, h_BxTxD)
      nitp, cos = nitp_loss(pred_BxTxD, hidden["target"], seg, n.shift, n.loss,
                            n.stop_gradient)
      metrics |= {"nitp": nitp, "nitp_cos": cos}
    elif n.weight > 0:
      nitp = mean_pairwise_cosine_per_row(hidden["last"], seg != 0)
      metrics["cosine_reg"] = nitp
    else:
      nitp = jnp.float32(0.0)
    aux_loss = aux_weight * aux["load_balance"] + z_weight * aux["router_z"]
    total = ntp + lam * nitp + aux_loss
    metrics |= {"loss": total, "aux": aux_loss, **aux}
    return total, metrics

  return loss_fn
