"""Small configs and batches shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nitp_jax import config as config_lib


def small_config(moe: bool = False, **nitp):
  """A model small enough for many jitted calls in a test."""
  c = config_lib.base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = 97, 32, 4
  m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_dim = 4, 2, 8, 64
  m.max_seq_len = c.train.seq_len = 16
  c.nitp.target_layer = 1
  if moe:
    e = m.moe
    e.num_experts, e.top_k, e.num_dense_layers = 8, 2, 1
    e.expert_ffn = e.shared_expert_ffn = 16
    e.z_loss_weight = 1e-3
  for k, v in nitp.items():
    c.nitp[k] = v
  return config_lib.validate(c)


def packed_batch(b: int = 2, t: int = 16, vocab: int = 97, seed: int = 0) -> dict:
  """Rows holding two documents and trailing padding (segment 0)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, size=(b, t)).astype(np.int32)
  seg = np.zeros((b, t), np.int32)
  pos = np.zeros((b, t), np.int32)
  for r in range(b):
    cut, end = 5 + r, t - 2 - r
    seg[r, :cut], seg[r, cut:end] = 1, 2
    pos[r, :cut] = np.arange(cut)
    pos[r, cut:end] = np.arange(end - cut)
    tokens[r, end:] = 0
  return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(pos)}


def max_abs_diff(a, b) -> float:
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
