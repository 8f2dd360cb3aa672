"""DeepSeek-V2-style MoE FFN: softmax top-k router, routed SwiGLU experts,
always-on shared experts, and three dispatch implementations that agree
where they overlap:

  capacity  einsum dispatch/combine per sequence with a capacity factor
            (tokens over capacity are dropped and counted); CPU default,
            GSPMD shards the expert axis.
  ragged    dropless: token copies sorted by expert, `jax.lax.ragged_dot`;
            with experts sharded over the mesh's "expert" axis it runs under
            shard_map (all-gather tokens, local experts, reduce-scatter).
  dense     every expert on every token, masked; the reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nitp_jax.layers import SwiGLU, param


class Routing(NamedTuple):
  """Router decision for N tokens: expert ids and combine weights [N, K]."""
  experts_NxK: jax.Array
  weights_NxK: jax.Array
  probs_NxE: jax.Array
  logits_NxE: jax.Array


def route(logits_NxE: jax.Array, top_k: int, renormalize: bool,
          routed_scaling: float) -> Routing:
  """Softmax over experts, top-k, optional renormalisation and scaling."""
  probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
  weights_NxK, experts_NxK = jax.lax.top_k(probs_NxE, top_k)
  if renormalize:
    weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
  return Routing(experts_NxK, weights_NxK * routed_scaling, probs_NxE, logits_NxE)


def load_balance_loss(r: Routing, num_experts: int) -> jax.Array:
  """Switch/DeepSeek balance loss E * sum_e f_e * P_e (1.0 when uniform)."""
  counts_E = jnp.sum(jax.nn.one_hot(r.experts_NxK, num_experts, dtype=jnp.float32), axis=(0, 1))
  fraction_E = counts_E / r.experts_NxK.size
  return num_experts * jnp.sum(fraction_E * jnp.mean(r.probs_NxE, axis=0))


def router_z_loss(r: Routing) -> jax.Array:
  return jnp.mean(jax.nn.logsumexp(r.logits_NxE, axis=-1) ** 2)


def _expert_ffn(x_ExMxD, gate_ExDxF, up_ExDxF, down_ExFxD):
  g = jnp.einsum("emd,edf->emf", x_ExMxD, gate_ExDxF)
  u = jnp.einsum("emd,edf->emf", x_ExMxD, up_ExDxF)
  return jnp.einsum("emf,efd->emd", nn.silu(g) * u, down_ExFxD)


def dispatch_dense(x_NxD, r: Routing, w, num_experts: int):
  """Reference: every expert on every token, combined with routing weights."""
  x_ExNxD = jnp.broadcast_to(x_NxD, (num_experts,) + x_NxD.shape)
  y_ExNxD = _expert_ffn(x_ExNxD, *w)
  combine_NxE = jnp.sum(jax.nn.one_hot(r.experts_NxK, num_experts, dtype=x_NxD.dtype)
                        * r.weights_NxK[..., None].astype(x_NxD.dtype), axis=1)
  return jnp.einsum("ne,end->nd", combine_NxE, y_ExNxD), jnp.float32(0.0)


def capacity(tokens_per_group: int, top_k: int, num_experts: int, factor: float) -> int:
  """Slots per expert per group."""
  return max(1, math.ceil(factor * tokens_per_group * top_k / num_experts))


def dispatch_capacity(x_GxSxD, r: Routing, w, num_experts: int, factor: float):
  """Einsum dispatch within groups (sequences); returns (y, dropped fraction).

  Slots are filled choice-major: every token's first choice before any
  token's second, so drops hit the lowest-priority choices first.
  """
  g, s, _ = x_GxSxD.shape
  k = r.experts_NxK.shape[-1]
  c = capacity(s, k, num_experts, factor)
  experts_GxKxS = r.experts_NxK.reshape(g, s, k).transpose(0, 2, 1)
  weights_GxKxS = r.weights_NxK.reshape(g, s, k).transpose(0, 2, 1)
  onehot_GxKSxE = jax.nn.one_hot(experts_GxKxS.reshape(g, k * s), num_experts, dtype=jnp.int32)
  slot_GxKSxE = jnp.cumsum(onehot_GxKSxE, axis=1) * onehot_GxKSxE - 1
  keep_GxKSxE = (slot_GxKSxE >= 0) & (slot_GxKSxE < c)
  slot_GxKxS = jnp.sum(jnp.where(keep_GxKSxE, slot_GxKSxE, 0), axis=-1).reshape(g, k, s)
  keep_GxKxSxE = keep_GxKSxE.reshape(g, k, s, num_experts).astype(x_GxSxD.dtype)
  slot_GxKxSxC = jax.nn.one_hot(slot_GxKxS, c, dtype=x_GxSxD.dtype)
  dispatch_GxSxExC = jnp.einsum("gkse,gksc->gsec", keep_GxKxSxE, slot_GxKxSxC)
  combine_GxSxExC = jnp.einsum("gkse,gksc,gks->gsec", keep_GxKxSxE, slot_GxKxSxC,
                               weights_GxKxS.astype(x_GxSxD.dtype))
  # Experts over the "expert" axis, token groups over the other batch axes:
  # GSPMD turns the change from batch- to expert-sharding into all-to-alls.
  x_ExGxCxD = jnp.einsum("gsec,gsd->egcd", dispatch_GxSxExC, x_GxSxD)
  x_ExGxCxD = nn.with_logical_constraint(x_ExGxCxD, ("expert", "expert_batch", None, None))
  y_ExGxCxD = _expert_ffn(x_ExGxCxD.reshape(num_experts, g * c, -1), *w).reshape(
      num_experts, g, c, -1)
  y_ExGxCxD = nn.with_logical_constraint(y_ExGxCxD, ("expert", "expert_batch", None, None))
  y_GxSxD = jnp.einsum("gsec,egcd->gsd", combine_GxSxExC, y_ExGxCxD)
  dropped = (g * s * k - jnp.sum(keep_GxKSxE, dtype=jnp.int32)) / (g * s * k)
  return y_GxSxD, dropped


def dispatch_ragged(x_NxD, r: Routing, w, num_experts: int):
  """Dropless: sort the N*K token copies by expert, grouped matmuls."""
  n, d = x_NxD.shape
  k = r.experts_NxK.shape[-1]
  flat_experts_M = r.experts_NxK.reshape(-1)
  order_M = jnp.argsort(flat_experts_M, stable=True)
  x_MxD = x_NxD[order_M // k]
  group_sizes_E = jnp.bincount(flat_experts_M, length=num_experts).astype(jnp.int32)
  gate, up, down = w
  g_MxF = jax.lax.ragged_dot(x_MxD, gate, group_sizes_E)
  u_MxF = jax.lax.ragged_dot(x_MxD, up, group_sizes_E)
  y_MxD = jax.lax.ragged_dot(nn.silu(g_MxF) * u_MxF, down, group_sizes_E)
  y_NxKxD = jnp.zeros_like(y_MxD).at[order_M].set(y_MxD).reshape(n, k, d)
  y_NxD = jnp.einsum("nkd,nk->nd", y_NxKxD, r.weights_NxK.astype(y_NxKxD.dtype))
  return y_NxD, jnp.float32(0.0)


def expert_shards() -> int:
  """Size of the "expert" axis of the mesh being traced under (1 if none)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get("expert", 1)


def dispatch_ragged_sharded(x_NxD, r: Routing, w, num_experts: int):
  """`dispatch_ragged` with the experts split over the mesh axis "expert"
  (and their hidden dim over "tensor"), all-gather based, under shard_map.

  Each expert shard gathers the token copies of its expert-axis peers, runs
  its own experts on the copies routed to them (the rest sort last and stay
  out of every group), and a reduce-scatter sums the outputs back to the
  shards that own the tokens.
  """
  mesh = jax.sharding.get_abstract_mesh()
  tokens = P(("data", "fsdp", "expert"), None)
  in_specs = (tokens, tokens, tokens, P("expert", None, "tensor"),
              P("expert", None, "tensor"), P("expert", "tensor", None))

  def local(x_nxD, experts_nxK, weights_nxK, gate_XxDxF, up_XxDxF, down_XxFxD):
    num_local = gate_XxDxF.shape[0]
    x_MxD, experts_MxK, weights_MxK = (
        jax.lax.all_gather(a, "expert", tiled=True) for a in (x_nxD, experts_nxK, weights_nxK))
    m, k = experts_MxK.shape
    local_MxK = experts_MxK - jax.lax.axis_index("expert") * num_local
    mine_MxK = (local_MxK >= 0) & (local_MxK < num_local)
    flat_C = jnp.where(mine_MxK, local_MxK, num_local).reshape(-1)  # C = M*K copies
    order_C = jnp.argsort(flat_C, stable=True)
    group_sizes_X = jnp.bincount(flat_C, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs_CxD = x_MxD[order_C // k]
    g_CxF = jax.lax.ragged_dot(xs_CxD, gate_XxDxF, group_sizes_X)
    u_CxF = jax.lax.ragged_dot(xs_CxD, up_XxDxF, group_sizes_X)
    ys_CxD = jax.lax.ragged_dot(nn.silu(g_CxF) * u_CxF, down_XxFxD, group_sizes_X)
    y_MxKxD = jnp.zeros_like(ys_CxD).at[order_C].set(ys_CxD).reshape(m, k, -1)
    y_MxKxD = jnp.where(mine_MxK[..., None], y_MxKxD, 0)  # rows past the groups: not ours
    y_MxD = jnp.einsum("mkd,mk->md", y_MxKxD, weights_MxK.astype(y_MxKxD.dtype))
    y_MxD = jax.lax.psum(y_MxD, "tensor")
    return jax.lax.psum_scatter(y_MxD, "expert", scatter_dimension=0, tiled=True)

  y_NxD = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=tokens)(
      x_NxD, r.experts_NxK, r.weights_NxK, *w)
  return y_NxD, jnp.float32(0.0)


class MoE(nn.Module):
  num_experts: int
  top_k: int
  expert_ffn: int
  num_shared_experts: int
  shared_expert_ffn: int
  renormalize: bool
  routed_scaling: float
  dispatch: str
  capacity_factor: float
  std: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, t, d = x_BxTxD.shape
    e, f = self.num_experts, self.expert_ffn
    router_DxE = param(self, "router", (d, e), ("embed", None), self.std, self.param_dtype)
    w = tuple(param(self, name, shape, axes, self.std, self.param_dtype).astype(self.dtype)
              for name, shape, axes in (
                  ("gate", (e, d, f), ("expert", "embed", "mlp")),
                  ("up", (e, d, f), ("expert", "embed", "mlp")),
                  ("down", (e, f, d), ("expert", "mlp", "embed"))))
    x = x_BxTxD.astype(self.dtype)
    x_NxD = x.reshape(b * t, d)
    logits_NxE = jnp.einsum("nd,de->ne", x_NxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
    r = route(logits_NxE, self.top_k, self.renormalize, self.routed_scaling)
    if self.dispatch == "capacity":
      y, dropped = dispatch_capacity(x, r, w, e, self.capacity_factor)
    elif self.dispatch == "ragged" and expert_shards() > 1:
      y, dropped = dispatch_ragged_sharded(x_NxD, r, w, e)
    elif self.dispatch == "ragged":
      y, dropped = dispatch_ragged(x_NxD, r, w, e)
    elif self.dispatch == "dense":
      y, dropped = dispatch_dense(x_NxD, r, w, e)
    else:
      raise ValueError(f"unknown MoE dispatch {self.dispatch!r}")
    y_BxTxD = y.reshape(b, t, d)
    if self.num_shared_experts:
      y_BxTxD += SwiGLU(self.num_shared_experts * self.shared_expert_ffn, self.std,
                        self.dtype, self.param_dtype, name="shared")(x)
    aux = {"load_balance": load_balance_loss(r, e), "router_z": router_z_loss(r),
           "dropped_fraction": dropped}
    return y_BxTxD, aux
