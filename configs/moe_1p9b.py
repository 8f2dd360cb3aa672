"""1.9B-A0.3B MoE, paper Table 4."""
from nitp_jax.config import paper_moe


def get_config():
  return paper_moe(d_model=512, num_moe_layers=15, num_heads=8, num_kv_heads=4, head_dim=64,
                   ffn_dim=10944, expert_ffn=496, top_k=8, lr=6.0e-4, global_batch=256,
                   tokens=105e9, target_layer=3, weight=1.0)
