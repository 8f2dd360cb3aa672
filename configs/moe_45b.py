"""45B-A5.5B MoE, paper App. C (WSD-exp schedule)."""
from nitp_jax.config import paper_moe


def get_config():
  return paper_moe(d_model=3072, num_moe_layers=23, num_heads=24, num_kv_heads=8, head_dim=128,
                   ffn_dim=12288, expert_ffn=1408, top_k=12, lr=2.8e-4, global_batch=768,
                   tokens=240e9, target_layer=5, weight=0.6, schedule="wsd_exp")
