"""Tiny dense model for a laptop CPU: NITP on the embedded default corpus in
a few minutes. Variants: `--config=configs/tiny.py:moe` (tiny MoE, 8 experts
top-2, the default dropless dispatch),
`--config=configs/tiny.py:ntp` (the NTP baseline, λ = 0)."""
from nitp_jax.config import base_config


def get_config(variant: str = ""):
  c = base_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers = 4096, 256, 4
  m.num_heads, m.num_kv_heads, m.head_dim, m.ffn_dim = 4, 2, 64, 768
  m.max_seq_len = c.train.seq_len = 256
  c.nitp.target_layer = 1
  c.train.steps, c.train.global_batch, c.train.lr = 200, 8, 3e-3
  c.train.warmup_steps, c.train.eval_every, c.train.checkpoint_every = 20, 100, 100
  c.train.eval_tasks = "next_line"  # downstream accuracy on held-out stdlib code
  if variant == "moe":
    m.moe.num_experts, m.moe.top_k, m.moe.num_dense_layers = 8, 2, 1
    m.moe.expert_ffn = m.moe.shared_expert_ffn = 256
  elif variant == "ntp":
    c.nitp.weight = 0.0
  elif variant:
    raise ValueError(f"unknown tiny variant {variant!r}: use '', 'moe' or 'ntp'")
  return c
