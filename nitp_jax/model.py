"""Decoder-only transformer (dense or MoE) that also returns the NITP states.

`Transformer.__call__` returns `(logits_BxTxV, hidden, aux)` where
`hidden = {"target": h_k, "last": h_L}`: h_k is the residual stream after
block k (the embedding output for k = 0), h_L the last hidden state (after
the final norm by default). With `return_logits=False` the first output is
the unembedding's input [B, T, D] instead, for a chunked cross-entropy that
never holds full logits (`unembed`, `unembed_matrix`). The layer stack is
cut into scanned segments at the dense/MoE boundary and at k, so h_k comes
out of the one forward pass without keeping every layer's output.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nitp_jax import layers
from nitp_jax import model_config
from nitp_jax.attention import Attention, CacheView, KVCache
from nitp_jax.layers import RMSNorm, SwiGLU, flat_matmul, param
from nitp_jax.model_config import ModelConfig, NITPConfig
from nitp_jax.moe import MoE

AUX_KEYS = ("load_balance", "router_z", "dropped_fraction")  # scalars, mean over MoE layers
LOAD_KEY = "moe_load_LxE"     # per MoE layer (bottom first): fraction of copies per expert


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then + ffn(norm(x)) (dense or MoE)."""
  cfg: ModelConfig
  moe: bool            # this block's FFN is cfg.moe's (else the dense SwiGLU)

  @nn.compact
  def __call__(self, x_BxTxD, segment_ids_BxT, positions_BxT, cache: KVCache | None = None,
               view: CacheView | None = None):
    """(x, aux), or (x, aux, cache) when decoding with a KV cache."""
    c = self.cfg
    cdt, pdt = c.compute_jnp_dtype, c.param_jnp_dtype
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("activation_batch", "activation_length", "activation_embed"))
    h = RMSNorm(c.norm_eps, pdt, name="attn_norm")(x_BxTxD)
    attn = Attention(c.attention, c.init_std, cdt, pdt, name="attn")
    if cache is None:
      y = attn(h, segment_ids_BxT, positions_BxT)
    else:
      y, cache = attn(h, segment_ids_BxT, positions_BxT, cache, view)
    x_BxTxD = x_BxTxD + y.astype(x_BxTxD.dtype)
    h = RMSNorm(c.norm_eps, pdt, name="ffn_norm")(x_BxTxD)
    if self.moe:
      y, aux = MoE(c.moe, c.init_std, cdt, pdt, name="moe")(h)
    else:
      y = SwiGLU(c.ffn_dim, c.init_std, cdt, pdt, name="mlp")(h)
      aux = {}
    x_BxTxD = x_BxTxD + y.astype(x_BxTxD.dtype)
    return (x_BxTxD, aux) if cache is None else (x_BxTxD, aux, cache)


def segments(num_layers: int, num_dense: int, target_layer: int) -> list[tuple[int, int, bool]]:
  """[(start, end, is_moe)]: the stack cut at the dense/MoE boundary and at k."""
  cuts = sorted({0, num_dense, target_layer, num_layers})
  return [(a, b, a >= num_dense) for a, b in zip(cuts, cuts[1:]) if b > a]


def _remat(block_cls, policy: str, scanned: bool):
  if policy == "none":
    return block_cls
  return nn.remat(block_cls, policy=layers.REMAT_POLICIES[policy], prevent_cse=not scanned)


class Transformer(nn.Module):
  """The backbone; `nitp` says which hidden states come out (k, h_L's norm).

  Decoding: with `caches` (one KVCache per layer; unrolled layers only) and
  their `view`, the call returns (logits_BxTxV, caches) for the new tokens."""
  cfg: ModelConfig
  nitp: NITPConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None,
               positions_BxT: jax.Array | None = None, return_logits: bool = True,
               caches: list[KVCache] | None = None, view: CacheView | None = None):
    c, k = self.cfg, self.nitp.target_layer
    cdt, pdt = c.compute_jnp_dtype, c.param_jnp_dtype
    b, t = tokens_BxT.shape
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones((b, t), jnp.int32)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    embed_VxD = param(self, "embed", (c.vocab_size, c.d_model), ("vocab", "embed"), c.init_std, pdt)
    # Gather from the vocab-sharded table with d_model whole (FSDP gathers
    # it), so the rows come out batch-sharded without a full rematerialization.
    lookup_VxD = nn.with_logical_constraint(embed_VxD, ("vocab", None))
    x_BxTxD = jnp.take(lookup_VxD, tokens_BxT, axis=0).astype(cdt)
    if caches is not None:
      return self._decode(x_BxTxD, segment_ids_BxT, positions_BxT, caches, view, embed_VxD)
    num_dense = c.num_dense_layers
    target_BxTxD = x_BxTxD
    aux_layers = []
    for start, end, is_moe in segments(c.num_layers, num_dense, k):
      if c.scan_layers:
        stack = nn.scan(_remat(Block, c.remat_policy, True),
                        variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=end - start,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x_BxTxD, aux = stack(c, is_moe, name=f"layers_{start}_{end}")(
            x_BxTxD, segment_ids_BxT, positions_BxT)
        if is_moe:
          aux_layers.append(aux)
      else:
        block = _remat(Block, c.remat_policy, False)
        for i in range(start, end):
          x_BxTxD, aux = block(c, is_moe, name=f"layer_{i}")(x_BxTxD, segment_ids_BxT, positions_BxT)
          if is_moe:
            aux_layers.append(jax.tree.map(lambda a: a[None], aux))
      if end == k:
        target_BxTxD = x_BxTxD
    normed_BxTxD = RMSNorm(c.norm_eps, pdt, name="final_norm")(x_BxTxD)
    if c.tie_embeddings:
      unembed_DxV = embed_VxD.T
    else:
      unembed_DxV = param(self, "unembed", (c.d_model, c.vocab_size), ("embed", "vocab"),
                          c.init_std, pdt)
    hidden = {"target": target_BxTxD,
              "last": normed_BxTxD if self.nitp.last_after_norm else x_BxTxD}
    aux = _moe_aux(aux_layers)
    if not return_logits:
      return normed_BxTxD, hidden, aux
    logits_BxTxV = unembed(normed_BxTxD, unembed_DxV, cdt)
    return logits_BxTxV, hidden, aux

  def _decode(self, x_BxTxD, segment_ids_BxT, positions_BxT, caches, view, embed_VxD):
    """The layers over new tokens with KV caches: (logits_BxTxV, caches)."""
    c = self.cfg
    if c.scan_layers:
      raise ValueError("decoding with a KV cache needs unrolled layers: "
                       "arrange the params with scan_layers=False")
    new_caches = []
    for i in range(c.num_layers):
      block = Block(c, i >= c.num_dense_layers, name=f"layer_{i}")
      x_BxTxD, _, cache = block(x_BxTxD, segment_ids_BxT, positions_BxT, caches[i], view)
      new_caches.append(cache)
    normed_BxTxD = RMSNorm(c.norm_eps, c.param_jnp_dtype, name="final_norm")(x_BxTxD)
    unembed_DxV = embed_VxD.T if c.tie_embeddings else param(
        self, "unembed", (c.d_model, c.vocab_size), ("embed", "vocab"), c.init_std,
        c.param_jnp_dtype)
    return unembed(normed_BxTxD, unembed_DxV, c.compute_jnp_dtype), new_caches


def unembed(normed_BxTxD: jax.Array, unembed_DxV: jax.Array, compute_dtype) -> jax.Array:
  """Logits [B, T, V] in the compute dtype (also used chunk by chunk)."""
  logits_BxTxV = flat_matmul(normed_BxTxD.astype(compute_dtype),
                             unembed_DxV.astype(compute_dtype))
  return nn.with_logical_constraint(logits_BxTxV, ("activation_batch", "activation_length", "activation_vocab"))


def unembed_matrix(backbone: dict, tie_embeddings: bool) -> jax.Array:
  """The [D, V] output projection stored in `backbone` params."""
  return backbone["embed"].T if tie_embeddings else backbone["unembed"]


def _moe_aux(aux_layers: list[dict]) -> dict:
  """Each scalar aux metric averaged over the MoE layers (zeros for a dense
  model), and the expert loads stacked per MoE layer as LOAD_KEY [L_moe, E]
  (absent for a dense model). `aux_layers` holds [n, ...] per MoE segment."""
  if not aux_layers:
    return {k: jnp.float32(0.0) for k in AUX_KEYS}
  out = {k: jnp.mean(jnp.concatenate([a[k] for a in aux_layers])) for k in AUX_KEYS}
  out[LOAD_KEY] = jnp.concatenate([a["load_E"] for a in aux_layers])
  return out


def router_biases(backbone: dict) -> list[tuple[str, jax.Array]]:
  """[(segment or layer name, router bias [n, E] or [E])] in layer order,
  the MoE layers' auxiliary-loss-free biases (empty when there are none)."""
  found = [(name, sub["moe"]["router_bias"]) for name, sub in backbone.items()
           if name.startswith("layer") and "router_bias" in sub.get("moe", {})]
  first = lambda name: int(name.split("_")[1])
  return sorted(found, key=lambda item: first(item[0]))


def with_router_biases(backbone: dict, biases: dict[str, jax.Array]) -> dict:
  """`backbone` with the router biases of the named segments/layers replaced."""
  out = dict(backbone)
  for name, b in biases.items():
    out[name] = {**out[name], "moe": {**out[name]["moe"], "router_bias": b}}
  return out


class Projector(nn.Module):
  """NITP projector P: SwiGLU d -> mult*d -> d (12 d^2 params at mult 4)."""
  cfg: ModelConfig
  nitp: NITPConfig

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array) -> jax.Array:
    c = self.cfg
    return SwiGLU(self.nitp.projector_mult * c.d_model, c.init_std, c.compute_jnp_dtype,
                  c.param_jnp_dtype, name="mlp")(h_BxTxD)


def uses_projector(cfg: ml_collections.ConfigDict) -> bool:
  return model_config.from_config(cfg)[1].uses_projector


def build(cfg: ml_collections.ConfigDict) -> tuple[Transformer, Projector | None]:
  """The backbone and (when NITP needs one) the projector for a config: the
  boundary where the ConfigDict becomes typed settings (ConfigError if bad)."""
  return build_modules(*model_config.from_config(cfg))


def build_modules(cfg: ModelConfig, nitp: NITPConfig) -> tuple[Transformer, Projector | None]:
  """`build` from typed settings."""
  model_config.check_target_layer(nitp.target_layer, cfg.num_layers)
  return Transformer(cfg, nitp), Projector(cfg, nitp) if nitp.uses_projector else None


def _init_boxed(cfg: ModelConfig, nitp: NITPConfig, rng: jax.Array) -> dict:
  model, projector = build_modules(cfg, nitp)
  rng_model, rng_proj = jax.random.split(rng)
  t = min(8, cfg.max_seq_len)
  tokens = jnp.zeros((1, t), jnp.int32)
  params = {"backbone": model.init(rng_model, tokens)["params"]}
  if projector is not None:
    params["projector"] = projector.init(
        rng_proj, jnp.zeros((1, t, cfg.d_model), jnp.float32))["params"]
  return params


def init_params(cfg: ml_collections.ConfigDict, rng: jax.Array) -> dict:
  """{"backbone": ..., "projector": ...} float32 pytrees (no metadata boxes).

  Blocks are initialised in one canonical layout and then re-stored for
  `cfg`, so runs that differ only in the NITP target layer (or in scanning)
  start from the same weights.
  """
  m, n = model_config.from_config(cfg)
  canonical = (dataclasses.replace(m, scan_layers=True),
               dataclasses.replace(n, target_layer=m.num_layers))
  params = jax.jit(lambda r: nn.unbox(_init_boxed(*canonical, r)))(rng)
  params["backbone"] = _arrange_layers(params["backbone"], m, n.target_layer)
  return params


def abstract_params(cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """(ShapeDtypeStruct tree, logical PartitionSpec tree); allocates nothing."""
  m, n = model_config.from_config(cfg)
  boxed = jax.eval_shape(lambda: _init_boxed(m, n, jax.random.key(0)))
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def layer_params(backbone: dict) -> dict[int, dict]:
  """{layer index: that block's params}, from scanned or unrolled storage."""
  layers = {}
  for name, sub in backbone.items():
    if name.startswith("layer_"):
      layers[int(name.split("_")[1])] = sub
    elif name.startswith("layers_"):
      start, end = map(int, name.split("_")[1:])
      for i in range(start, end):
        layers[i] = jax.tree.map(lambda a, i=i - start: a[i], sub)
  return layers


def arrange_layers(backbone: dict, cfg: ml_collections.ConfigDict) -> dict:
  """Re-store the blocks of `backbone` the way `cfg` lays them out (scanned
  segments cut at its target layer, or unrolled); other params unchanged.
  Lets one set of weights serve any target layer or scan setting."""
  m, n = model_config.from_config(cfg)
  return _arrange_layers(backbone, m, n.target_layer)


def _arrange_layers(backbone: dict, m: ModelConfig, target_layer: int) -> dict:
  layers = layer_params(backbone)
  out = {k: v for k, v in backbone.items() if not k.startswith("layer")}
  for start, end, _ in segments(m.num_layers, m.num_dense_layers, target_layer):
    if m.scan_layers:
      out[f"layers_{start}_{end}"] = jax.tree.map(
          lambda *a: jnp.stack(a), *[layers[i] for i in range(start, end)])
    else:
      out.update({f"layer_{i}": layers[i] for i in range(start, end)})
  return out
