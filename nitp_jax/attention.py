"""Grouped-query self-attention with RoPE and document (segment) masking."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nitp_jax.layers import param, rope


def document_causal_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] bool: query t sees key s iff s <= t and same document.

  Padding (segment 0) only sees padding, so no row is ever fully masked.
  """
  t = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (same_BxTxT & causal_TxT)[:, None]


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool
  rope_theta: float
  std: float
  impl: str = "xla"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, segment_ids_BxT: jax.Array,
               positions_BxT: jax.Array) -> jax.Array:
    d = x_BxTxD.shape[-1]
    n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
    p = lambda name, shape, axes, std=self.std: param(
        self, name, shape, axes, std, self.param_dtype).astype(self.dtype)
    x = x_BxTxD.astype(self.dtype)
    q_BxTxNxH = jnp.einsum("btd,dnh->btnh", x, p("q", (d, n, h), ("embed", "q_heads", "head_dim")))
    k_BxTxKxH = jnp.einsum("btd,dkh->btkh", x, p("k", (d, k, h), ("embed", "kv_heads", "head_dim")))
    v_BxTxKxH = jnp.einsum("btd,dkh->btkh", x, p("v", (d, k, h), ("embed", "kv_heads", "head_dim")))
    if self.qkv_bias:
      q_BxTxNxH += p("q_bias", (n, h), ("q_heads", "head_dim"), 0.0)
      k_BxTxKxH += p("k_bias", (k, h), ("kv_heads", "head_dim"), 0.0)
      v_BxTxKxH += p("v_bias", (k, h), ("kv_heads", "head_dim"), 0.0)
    q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, self.rope_theta)
    k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, self.rope_theta)
    q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("batch", "length", "q_heads", "head_dim"))
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
        mask=document_causal_mask(segment_ids_BxT),
        implementation=self.impl)
    o_NxHxD = p("o", (n, h, d), ("q_heads", "head_dim", "embed"))
    return jnp.einsum("btnh,nhd->btd", out_BxTxNxH, o_NxHxD)
