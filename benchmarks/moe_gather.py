"""Prototype (not in the library): the `capacity` dispatch with index
gathers instead of one-hot einsums. Same slots, same drops, same outputs as
`nitp_jax.moe.dispatch_capacity`, but O(tokens × k × d) data movement
instead of O(group × experts × capacity × d) FLOPs per group.
`moe_dispatch.py` times it as `capacity_gather` by swapping it in while the
MoE layer is traced.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from nitp_jax import moe as moe_lib


def dispatch_gather(x_GxSxD, r: moe_lib.Routing, w, num_experts: int, factor: float):
  """Drop-in for `dispatch_capacity`: (y_GxSxD, dropped fraction)."""
  g, s, d = x_GxSxD.shape
  k = r.experts_NxK.shape[-1]
  c = moe_lib.capacity(s, k, num_experts, factor)
  # Choice-major order, as dispatch_capacity: all first choices first.
  experts_GxKS = r.experts_NxK.reshape(g, s, k).transpose(0, 2, 1).reshape(g, k * s)
  weights_GxKS = r.weights_NxK.reshape(g, s, k).transpose(0, 2, 1).reshape(g, k * s)
  onehot_GxKSxE = jax.nn.one_hot(experts_GxKS, num_experts, dtype=jnp.int32)
  slot_GxKS = jnp.sum(jnp.cumsum(onehot_GxKSxE, axis=1) * onehot_GxKSxE, axis=-1) - 1
  keep_GxKS = slot_GxKS < c
  dest_GxKS = jnp.where(keep_GxKS, experts_GxKS * c + slot_GxKS, num_experts * c)
  token_GxKS = jnp.broadcast_to(jnp.tile(jnp.arange(s, dtype=jnp.int32), k), (g, k * s))
  src_GxEC = jnp.full((g, num_experts * c + 1), s, jnp.int32)  # s = the zero row
  src_GxEC = src_GxEC.at[jnp.arange(g)[:, None], dest_GxKS].set(token_GxKS)[:, :-1]
  x_pad = jnp.concatenate([x_GxSxD, jnp.zeros((g, 1, d), x_GxSxD.dtype)], axis=1)
  x_GxECxD = jnp.take_along_axis(x_pad, src_GxEC[..., None], axis=1)
  x_ExGCxD = x_GxECxD.reshape(g, num_experts, c, d).swapaxes(0, 1).reshape(num_experts, g * c, d)
  y_ExGCxD = moe_lib._expert_ffn(x_ExGCxD, *w)  # pylint: disable=protected-access
  y_GxECxD = y_ExGCxD.reshape(num_experts, g, c, d).swapaxes(0, 1).reshape(g, num_experts * c, d)
  y_pad = jnp.concatenate([y_GxECxD, jnp.zeros((g, 1, d), y_GxECxD.dtype)], axis=1)
  y_GxKSxD = jnp.take_along_axis(y_pad, dest_GxKS[..., None], axis=1)
  y_GxKSxD = y_GxKSxD * (weights_GxKS * keep_GxKS)[..., None].astype(y_GxKSxD.dtype)
  dropped = 1.0 - jnp.mean(keep_GxKS.astype(jnp.float32))
  return jnp.sum(y_GxKSxD.reshape(g, k, s, d), axis=1), dropped


@contextlib.contextmanager
def patched():
  """Trace MoE layers with `dispatch_gather` in place of `dispatch_capacity`."""
  original = moe_lib.dispatch_capacity
  moe_lib.dispatch_capacity = dispatch_gather
  try:
    yield
  finally:
    moe_lib.dispatch_capacity = original
