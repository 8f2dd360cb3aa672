"""0.5B dense (Qwen2-0.5B shape), paper Table 4."""
from nitp_jax.config import paper_dense


def get_config():
  return paper_dense(d_model=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                     ffn_dim=4864, lr=4.2e-4, global_batch=512, tokens=200e9,
                     target_layer=5, weight=1.0)
