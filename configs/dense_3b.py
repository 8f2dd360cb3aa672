"""3B dense, paper Table 4."""
from nitp_jax.config import paper_dense


def get_config():
  return paper_dense(d_model=2560, num_layers=28, num_heads=20, num_kv_heads=4, head_dim=128,
                     ffn_dim=10240, lr=4.2e-4, global_batch=1024, tokens=330e9,
                     target_layer=6, weight=0.8)
