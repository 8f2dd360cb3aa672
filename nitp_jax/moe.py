"""DeepSeek-V2-style MoE FFN: softmax top-k router, routed SwiGLU experts,
always-on shared experts, and five dispatch implementations that agree
where they overlap (`config.DISPATCHES`):

  dropless  the default: token copies sorted by expert into blocks of one
            expert each, a loop of block matmuls (`grouped.dropless`). No
            drops; each token's output depends on its own routing only, so
            it is causal and packed documents stay isolated (tested bitwise).
            With experts sharded over the mesh's "expert" axis it runs under
            shard_map: all-gather tokens over that axis, local experts on the
            copies routed to them, psum over "mlp", reduce-scatter back.
  ragged    dropless by `jax.lax.ragged_dot` (same shard_map form); on CPU
            ragged_dot is a masked dense product: slow, large temporaries.
  dense     every expert on every token, masked; the reference.
  capacity  one-hot einsum dispatch/combine per sequence with a capacity
            factor; GSPMD shards the expert axis (all-to-alls). Matrix-unit
            friendly (TPU).
  gather    the same slots, drops and outputs as capacity, moved by index.

capacity and gather fill capacity slots choice-major over the whole sequence:
whether a token's copy is dropped depends on later tokens (and on other
packed documents), so they are not causal. They stay for benchmarks and
memory comparisons; training refuses them (`config.check_trainable`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nitp_jax import grouped
from nitp_jax import sharding
from nitp_jax.layers import SwiGLU, param
from nitp_jax.model_config import MoEConfig


class Routing(NamedTuple):
  """Router decision for N tokens: expert ids and combine weights [N, K]."""
  experts_NxK: jax.Array
  weights_NxK: jax.Array
  probs_NxE: jax.Array
  logits_NxE: jax.Array


def route(logits_NxE: jax.Array, top_k: int, renormalize: bool, routed_scaling: float,
          bias_E: jax.Array | None = None) -> Routing:
  """Softmax over experts, top-k, optional renormalisation and scaling.

  `bias_E` (auxiliary-loss-free balancing, DeepSeek-V3) is added to the
  probabilities only to choose the top-k; the combine weights stay the
  un-biased probabilities of the chosen experts, and no gradient reaches it.
  """
  probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
  if bias_E is None:
    weights_NxK, experts_NxK = jax.lax.top_k(probs_NxE, top_k)
  else:
    scores_NxE = probs_NxE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    _, experts_NxK = jax.lax.top_k(scores_NxE, top_k)
    weights_NxK = jnp.take_along_axis(probs_NxE, experts_NxK, axis=-1)
  if renormalize:
    weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
  return Routing(experts_NxK, weights_NxK * routed_scaling, probs_NxE, logits_NxE)


def expert_load(r: Routing, num_experts: int) -> jax.Array:
  """[E] fraction of the N*K routed token copies sent to each expert (sums
  to 1; counted before any capacity drop)."""
  counts_E = jnp.sum(jax.nn.one_hot(r.experts_NxK, num_experts, dtype=jnp.float32), axis=(0, 1))
  return counts_E / r.experts_NxK.size


def load_balance_loss(r: Routing, num_experts: int) -> jax.Array:
  """Batch-wise Switch/DeepSeek balance loss E * sum_e f_e * P_e over all
  N tokens (1.0 when uniform)."""
  return num_experts * jnp.sum(expert_load(r, num_experts) * jnp.mean(r.probs_NxE, axis=0))


def sequence_balance_loss(r: Routing, num_experts: int, num_sequences: int) -> jax.Array:
  """Sequence-wise balance loss (DeepSeek-V3, Eq. 17-20), averaged over the
  B sequences: per sequence of T tokens, f_i = E/(K*T) * (tokens choosing i),
  P_i = mean over its tokens of the normalised affinity (the softmax
  probabilities, which already sum to 1); loss = sum_i f_i * P_i (1.0 when
  uniform). Rows of the batch are the sequences; padding counts as tokens,
  as in the batch-wise loss."""
  n, k = r.experts_NxK.shape
  t = n // num_sequences
  experts_BxTK = r.experts_NxK.reshape(num_sequences, t * k)
  counts_BxE = jnp.sum(jax.nn.one_hot(experts_BxTK, num_experts, dtype=jnp.float32), axis=1)
  f_BxE = counts_BxE * (num_experts / (k * t))
  p_BxE = jnp.mean(r.probs_NxE.reshape(num_sequences, t, num_experts), axis=1)
  return jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))


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


def _choice_major_slots(r: Routing, g: int, s: int, num_experts: int, c: int):
  """Each token copy's slot in its expert's buffer, within groups of s tokens.

  Copies are ordered choice-major (every token's first choice before any
  token's second), so drops hit the lowest-priority choices first. Returns
  [G, K*S] arrays: expert, weight, slot, and whether the slot is < c (kept).
  """
  k = r.experts_NxK.shape[-1]
  experts_GxKS = r.experts_NxK.reshape(g, s, k).transpose(0, 2, 1).reshape(g, k * s)
  weights_GxKS = r.weights_NxK.reshape(g, s, k).transpose(0, 2, 1).reshape(g, k * s)
  onehot_GxKSxE = jax.nn.one_hot(experts_GxKS, num_experts, dtype=jnp.int32)
  slot_GxKS = jnp.sum(jnp.cumsum(onehot_GxKSxE, axis=1) * onehot_GxKSxE, axis=-1) - 1
  return experts_GxKS, weights_GxKS, slot_GxKS, slot_GxKS < c


def _experts_on_buffers(x_GxExCxD, w, num_experts: int):
  """The expert FFNs on [G, E, C, D] slot buffers. Experts go over the
  "expert" mesh axis and groups over the other batch axes: GSPMD turns the
  change from batch- to expert-sharding into all-to-alls."""
  g, _, c, d = x_GxExCxD.shape
  x_ExGxCxD = nn.with_logical_constraint(x_GxExCxD.transpose(1, 0, 2, 3),
                                         ("activation_experts", "activation_expert_batch", None, None))
  y_ExGxCxD = _expert_ffn(x_ExGxCxD.reshape(num_experts, g * c, d), *w).reshape(
      num_experts, g, c, d)
  y_ExGxCxD = nn.with_logical_constraint(y_ExGxCxD, ("activation_experts", "activation_expert_batch", None, None))
  return y_ExGxCxD.transpose(1, 0, 2, 3)


def dispatch_capacity(x_GxSxD, r: Routing, w, num_experts: int, factor: float):
  """One-hot einsum dispatch within groups (sequences), capacity-limited;
  returns (y, dropped fraction). Costs O(S·E·C·D) FLOPs per group, which
  TPUs' matrix units absorb; `dispatch_gather` moves the same data by index.
  """
  g, s, _ = x_GxSxD.shape
  k = r.experts_NxK.shape[-1]
  c = capacity(s, k, num_experts, factor)
  experts_GxKS, weights_GxKS, slot_GxKS, keep_GxKS = _choice_major_slots(
      r, g, s, num_experts, c)
  cdt = x_GxSxD.dtype
  keep_GxKxSxE = (jax.nn.one_hot(experts_GxKS, num_experts, dtype=cdt)
                  * keep_GxKS[..., None].astype(cdt)).reshape(g, k, s, num_experts)
  slot_GxKxSxC = jax.nn.one_hot(slot_GxKS, c, dtype=cdt).reshape(g, k, s, c)
  dispatch_GxSxExC = jnp.einsum("gkse,gksc->gsec", keep_GxKxSxE, slot_GxKxSxC)
  combine_GxSxExC = jnp.einsum("gkse,gksc,gks->gsec", keep_GxKxSxE, slot_GxKxSxC,
                               weights_GxKS.reshape(g, k, s).astype(cdt))
  x_GxExCxD = jnp.einsum("gsec,gsd->gecd", dispatch_GxSxExC, x_GxSxD)
  y_GxExCxD = _experts_on_buffers(x_GxExCxD, w, num_experts)
  y_GxSxD = jnp.einsum("gsec,gecd->gsd", combine_GxSxExC, y_GxExCxD)
  return y_GxSxD, jnp.mean(~keep_GxKS, dtype=jnp.float32)


def dispatch_gather(x_GxSxD, r: Routing, w, num_experts: int, factor: float):
  """`dispatch_capacity` by index: the same slots, drops and outputs, but
  each slot buffer row is gathered from its token and each token copy
  gathered back from its slot, O(S·K·D) data movement per group instead of
  O(S·E·C·D) FLOPs. Faster on CPU (and where gathers are cheap)."""
  g, s, d = x_GxSxD.shape
  k = r.experts_NxK.shape[-1]
  c = capacity(s, k, num_experts, factor)
  experts_GxKS, weights_GxKS, slot_GxKS, keep_GxKS = _choice_major_slots(
      r, g, s, num_experts, c)
  # Flat slot index of every copy; dropped copies point one past the end.
  dest_GxKS = jnp.where(keep_GxKS, experts_GxKS * c + slot_GxKS, num_experts * c)
  token_KS = jnp.tile(jnp.arange(s, dtype=jnp.int32), k)

  def buffer_sources(dest_KS):  # the token in each slot; s (out of range) = empty
    return jnp.full((num_experts * c,), s, jnp.int32).at[dest_KS].set(token_KS, mode="drop")

  src_GxEC = jax.vmap(buffer_sources)(dest_GxKS)
  take = jax.vmap(lambda a, i: a.at[i].get(mode="fill", fill_value=0))
  x_GxExCxD = take(x_GxSxD, src_GxEC).reshape(g, num_experts, c, d)
  y_GxExCxD = _experts_on_buffers(x_GxExCxD, w, num_experts)
  y_GxKSxD = take(y_GxExCxD.reshape(g, num_experts * c, d), dest_GxKS)
  y_GxKSxD *= weights_GxKS[..., None].astype(y_GxKSxD.dtype)
  y_GxSxD = jnp.sum(y_GxKSxD.reshape(g, k, s, d), axis=1)
  return y_GxSxD, jnp.mean(~keep_GxKS, dtype=jnp.float32)


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
  """How many ways the mesh being traced under splits the experts (1 if none)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  expert_axes = sharding.mesh_axis_names(sharding.logical_to_mesh("expert")[0])
  return math.prod(dict(mesh.shape).get(a, 1) for a in expert_axes)


def _expert_parallel(local_experts: Callable, x_NxD, r: Routing, w) -> jax.Array:
  """Routed experts split over the mesh axes of the logical "expert" axis
  (their hidden dim over those of "mlp"; sharding.py's rules name the mesh
  axes), all-gather based, under shard_map. Each expert shard gathers the
  tokens and routing of its expert-axis peers, runs
  `local_experts(x_MxD, local_MxK, weights_MxK, gate, up, down) -> y_MxD` on
  them (local_MxK: this shard's expert ids, num_local for copies routed
  elsewhere), sums the partial outputs over the "mlp" axes and
  reduce-scatters them back to the shards that own the tokens."""
  mesh = jax.sharding.get_abstract_mesh()
  tokens = sharding.logical_to_mesh("activation_batch", None)
  w_in = sharding.logical_to_mesh("expert", None, "mlp")   # gate, up [X, D, F]
  w_out = sharding.logical_to_mesh("expert", "mlp", None)  # down [X, F, D]
  expert, tensor = w_in[0], w_in[2]

  def local(x_nxD, experts_nxK, weights_nxK, gate_XxDxF, up_XxDxF, down_XxFxD):
    num_local = gate_XxDxF.shape[0]
    x_MxD, experts_MxK, weights_MxK = (
        jax.lax.all_gather(a, expert, tiled=True) for a in (x_nxD, experts_nxK, weights_nxK))
    local_MxK = experts_MxK - jax.lax.axis_index(expert) * num_local
    local_MxK = jnp.where((local_MxK >= 0) & (local_MxK < num_local), local_MxK, num_local)
    y_MxD = local_experts(x_MxD, local_MxK, weights_MxK, gate_XxDxF, up_XxDxF, down_XxFxD)
    y_MxD = jax.lax.psum(y_MxD, tensor)
    return jax.lax.psum_scatter(y_MxD, expert, scatter_dimension=0, tiled=True)

  return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out),
                       out_specs=tokens)(x_NxD, r.experts_NxK, r.weights_NxK, *w)


def _ragged_local(x_MxD, local_MxK, weights_MxK, gate_XxDxF, up_XxDxF, down_XxFxD):
  """`dispatch_ragged` on one expert shard: copies of other shards (id
  num_local) sort last and stay out of every group."""
  num_local = gate_XxDxF.shape[0]
  m, k = local_MxK.shape
  flat_C = local_MxK.reshape(-1)  # C = M*K copies
  order_C = jnp.argsort(flat_C, stable=True)
  group_sizes_X = jnp.bincount(flat_C, length=num_local + 1)[:num_local].astype(jnp.int32)
  xs_CxD = x_MxD[order_C // k]
  g_CxF = jax.lax.ragged_dot(xs_CxD, gate_XxDxF, group_sizes_X)
  u_CxF = jax.lax.ragged_dot(xs_CxD, up_XxDxF, group_sizes_X)
  ys_CxD = jax.lax.ragged_dot(nn.silu(g_CxF) * u_CxF, down_XxFxD, group_sizes_X)
  y_MxKxD = jnp.zeros_like(ys_CxD).at[order_C].set(ys_CxD).reshape(m, k, -1)
  y_MxKxD = jnp.where((local_MxK < num_local)[..., None], y_MxKxD, 0)  # past the groups
  return jnp.einsum("mkd,mk->md", y_MxKxD, weights_MxK.astype(y_MxKxD.dtype))


def dispatch_ragged_sharded(x_NxD, r: Routing, w, num_experts: int):
  """`dispatch_ragged` with the experts split over the mesh (`_expert_parallel`)."""
  del num_experts
  return _expert_parallel(_ragged_local, x_NxD, r, w), jnp.float32(0.0)


def dispatch_dropless(x_NxD, r: Routing, w, num_experts: int):
  """Dropless by `grouped.dropless`: copies sorted by expert into blocks of
  one expert each, a loop of block matmuls. Each token's output depends only
  on its own routing: causal and document-isolated."""
  del num_experts
  return grouped.dropless(x_NxD, r.experts_NxK, r.weights_NxK, *w), jnp.float32(0.0)


def dispatch_dropless_sharded(x_NxD, r: Routing, w, num_experts: int):
  """`dispatch_dropless` with the experts split over the mesh
  (`_expert_parallel`): each shard runs `grouped.dropless` on the copies
  routed to its own experts (the others sort last and are never computed).
  Nothing is dropped: the copy buffer is sized for every gathered copy
  landing on one shard."""

  def local(x_MxD, local_MxK, weights_MxK, gate_XxDxF, up_XxDxF, down_XxFxD):
    num_local, d, f = gate_XxDxF.shape
    m, k = local_MxK.shape
    # Block size from the mean group (m*k/E copies per expert), not all m*k copies.
    block = grouped.default_block(m * k * num_local // num_experts, num_local, d * f)
    return grouped.dropless(x_MxD, local_MxK, weights_MxK, gate_XxDxF, up_XxDxF, down_XxFxD,
                            block=block)

  return _expert_parallel(local, x_NxD, r, w), jnp.float32(0.0)


class MoE(nn.Module):
  """The MoE FFN as `cfg` describes it; init std and dtypes are the model's."""
  cfg: MoEConfig
  std: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    c = self.cfg
    b, t, d = x_BxTxD.shape
    e, f = c.num_experts, c.expert_ffn
    router_DxE = param(self, "router", (d, e), ("embed", None), self.std, self.param_dtype)
    w = tuple(param(self, name, shape, axes, self.std, self.param_dtype).astype(self.dtype)
              for name, shape, axes in (
                  ("gate", (e, d, f), ("expert", "embed", "mlp")),
                  ("up", (e, d, f), ("expert", "embed", "mlp")),
                  ("down", (e, f, d), ("expert", "mlp", "embed"))))
    x = x_BxTxD.astype(self.dtype)
    x_NxD = x.reshape(b * t, d)
    logits_NxE = jnp.einsum("nd,de->ne", x_NxD.astype(jnp.float32), router_DxE.astype(jnp.float32))
    bias_E = None
    if c.bias_update_rate > 0:  # auxiliary-loss-free balancing: see step.router_bias_update
      bias_E = param(self, "router_bias", (e,), (None,), 0.0, jnp.float32)
    r = route(logits_NxE, c.top_k, c.renormalize, c.routed_scaling, bias_E)
    if c.dispatch == "dropless" and expert_shards() > 1:
      y, dropped = dispatch_dropless_sharded(x_NxD, r, w, e)
    elif c.dispatch == "dropless":
      y, dropped = dispatch_dropless(x_NxD, r, w, e)
    elif c.dispatch == "capacity":
      y, dropped = dispatch_capacity(x, r, w, e, c.capacity_factor)
    elif c.dispatch == "gather":
      y, dropped = dispatch_gather(x, r, w, e, c.capacity_factor)
    elif c.dispatch == "ragged" and expert_shards() > 1:
      y, dropped = dispatch_ragged_sharded(x_NxD, r, w, e)
    elif c.dispatch == "ragged":
      y, dropped = dispatch_ragged(x_NxD, r, w, e)
    elif c.dispatch == "dense":
      y, dropped = dispatch_dense(x_NxD, r, w, e)
    else:
      raise ValueError(f"unknown MoE dispatch {c.dispatch!r}")
    y_BxTxD = y.reshape(b, t, d)
    if c.num_shared_experts:
      y_BxTxD += SwiGLU(c.num_shared_experts * c.shared_expert_ffn, self.std,
                        self.dtype, self.param_dtype, name="shared")(x)
    if c.balance_loss == "sequence":
      balance = sequence_balance_loss(r, e, b)
    else:  # "batch"; with "none" it is still reported, at weight 0
      balance = load_balance_loss(r, e)
    aux = {"load_balance": balance, "router_z": router_z_loss(r),
           "dropped_fraction": dropped, "load_E": expert_load(r, e)}
    return y_BxTxD, aux
