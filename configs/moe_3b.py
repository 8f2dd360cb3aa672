"""3B-A0.5B MoE, paper Table 4."""
from nitp_jax.config import paper_moe


def get_config():
  return paper_moe(d_model=768, num_moe_layers=16, num_heads=8, num_kv_heads=4, head_dim=96,
                   ffn_dim=10944, expert_ffn=544, top_k=8, lr=8.7e-4, global_batch=512,
                   tokens=200e9, target_layer=4, weight=1.0)
