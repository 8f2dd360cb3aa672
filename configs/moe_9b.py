"""9B-A1B MoE, paper Table 4 (the paper's headline model)."""
from nitp_jax.config import paper_moe


def get_config():
  return paper_moe(d_model=1280, num_moe_layers=23, num_heads=8, num_kv_heads=4, head_dim=160,
                   ffn_dim=10944, expert_ffn=640, top_k=8, lr=4.2e-4, global_batch=1024,
                   tokens=330e9, target_layer=5, weight=0.8)
