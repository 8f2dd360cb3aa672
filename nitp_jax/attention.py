"""Grouped-query self-attention with RoPE and document (segment) masking.

Kernels (`model.attention_impl`), all through `jax.nn.dot_product_attention`:
  xla    any backend; the full [B, 1, T, T] document-causal mask.
  cudnn  cuDNN flash attention on GPU (bf16/fp16): `is_causal=True` (masked
         blocks skipped) plus the same-document mask, which jax 0.10 turns
         into an additive bias (its packed-sequence `q_offsets` path is not in
         the public API), so packed documents stay isolated.
  auto   cudnn where it can run (GPU, bf16/fp16, supported head_dim), else xla.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nitp_jax.errors import ConfigError
from nitp_jax.layers import flat_matmul, param, rope
from nitp_jax.model_config import AttentionConfig


def document_causal_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] bool: query t sees key s iff s <= t and same document.

  Padding (segment 0) only sees padding, so no row is ever fully masked.
  """
  t = segment_ids_BxT.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return (same_BxTxT & causal_TxT)[:, None]


def same_document_mask(segment_ids_BxT: jax.Array) -> jax.Array:
  """[B, 1, T, T] bool: same document (causality left to the kernel)."""
  return (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]


def _gpu_head_dim_limit() -> int:
  cc = getattr(jax.devices()[0], "compute_capability", "0")
  return 256 if float(cc) >= 9.0 else 128


def resolve_impl(impl: str, dtype, head_dim: int) -> str:
  """The kernel to use on this backend: 'xla' or 'cudnn'; clear error when
  cudnn is asked for where it cannot run."""
  on_gpu = jax.default_backend() == "gpu"
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "auto":
    ok = on_gpu and half and head_dim % 8 == 0 and head_dim <= _gpu_head_dim_limit()
    return "cudnn" if ok else "xla"
  if impl == "cudnn" and not on_gpu:
    raise ConfigError(f"config.model.attention_impl='cudnn' needs a GPU, but the backend "
                      f"is {jax.default_backend()!r}: use 'xla' or 'auto'")
  return impl


def attend(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
           segment_ids_BxT: jax.Array, impl: str) -> jax.Array:
  """Causal attention within documents with the resolved kernel."""
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=same_document_mask(segment_ids_BxT),
        is_causal=True, implementation="cudnn")
  return jax.nn.dot_product_attention(
      q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=document_causal_mask(segment_ids_BxT),
      implementation=impl)


class KVCache(NamedTuple):
  """One layer's keys and values for incremental decoding: S slots per row."""
  k_BxSxKxH: jax.Array
  v_BxSxKxH: jax.Array


class CacheView(NamedTuple):
  """Where the new tokens go in every layer's cache, and whom they may see:
  the T new tokens fill slots [offset, offset + T); `mask_Bx1xTxS` is query t
  sees slot s (s <= offset + t and slot s holds a real token of the row)."""
  offset: jax.Array
  mask_Bx1xTxS: jax.Array


def cached_mask(valid_BxS: jax.Array, offset: jax.Array, t: int) -> jax.Array:
  """CacheView.mask_Bx1xTxS for T new tokens at `offset`, given which slots
  hold real tokens (the new ones included)."""
  s = valid_BxS.shape[1]
  causal_TxS = jnp.arange(s)[None, :] <= offset + jnp.arange(t)[:, None]
  return (causal_TxS[None] & valid_BxS[:, None, :])[:, None]


class Attention(nn.Module):
  """Self-attention as `cfg` describes it; init std and dtypes are the model's."""
  cfg: AttentionConfig
  std: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, segment_ids_BxT: jax.Array,
               positions_BxT: jax.Array, cache: KVCache | None = None,
               view: CacheView | None = None):
    """The attention output [B, T, D]; with a `cache` (and its `view`), also
    the cache with these tokens' keys and values written in."""
    c = self.cfg
    d = x_BxTxD.shape[-1]
    n, k, h = c.num_heads, c.num_kv_heads, c.head_dim
    p = lambda name, shape, axes, std=self.std: param(
        self, name, shape, axes, std, self.param_dtype).astype(self.dtype)
    x = x_BxTxD.astype(self.dtype)
    q_BxTxNxH = flat_matmul(x, p("q", (d, n, h), ("embed", "q_heads", "head_dim")))
    k_BxTxKxH = flat_matmul(x, p("k", (d, k, h), ("embed", "kv_heads", "head_dim")))
    v_BxTxKxH = flat_matmul(x, p("v", (d, k, h), ("embed", "kv_heads", "head_dim")))
    if c.qkv_bias:
      q_BxTxNxH += p("q_bias", (n, h), ("q_heads", "head_dim"), 0.0)
      k_BxTxKxH += p("k_bias", (k, h), ("kv_heads", "head_dim"), 0.0)
      v_BxTxKxH += p("v_bias", (k, h), ("kv_heads", "head_dim"), 0.0)
    q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, c.rope_theta)
    k_BxTxKxH = rope(k_BxTxKxH, positions_BxT, c.rope_theta)
    q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
    o_NxHxD = p("o", (n, h, d), ("q_heads", "head_dim", "embed"))
    if cache is None:
      out_BxTxNxH = attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT,
                           resolve_impl(c.impl, self.dtype, h))
      return flat_matmul(out_BxTxNxH, o_NxHxD, contract=2)
    write = lambda slots, new: jax.lax.dynamic_update_slice_in_dim(
        slots, new.astype(slots.dtype), view.offset, axis=1)
    cache = KVCache(write(cache.k_BxSxKxH, k_BxTxKxH), write(cache.v_BxSxKxH, v_BxTxKxH))
    out_BxTxNxH = jax.nn.dot_product_attention(
        q_BxTxNxH, cache.k_BxSxKxH.astype(self.dtype), cache.v_BxSxKxH.astype(self.dtype),
        mask=view.mask_Bx1xTxS, implementation="xla")
    return flat_matmul(out_BxTxNxH, o_NxHxD, contract=2), cache
