"""Every config file validates and has the paper's size; bad configs fail
with a message that names the field, the value and what is allowed."""

import glob
import json
import os
import subprocess
import sys

import pytest

from nitp_jax import config as config_lib
from nitp_jax import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))

# The paper's Table 4 model sizes (billions): total, active.
PAPER_SIZES = {
    "moe_1p9b": (1.84, 0.29), "moe_3b": (3.20, 0.47), "moe_9b": (8.75, 1.06),
    "moe_45b": (44.9, 5.54), "dense_0p5b": (0.49, 0.49), "dense_2b": (2.10, 2.10),
    "dense_3b": (3.03, 3.03),
}


def load(path: str, variant: str = ""):
  return config_lib.load_config_file(f"{path}:{variant}" if variant else path)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_config_validates_and_matches_paper_size(path):
  name = os.path.basename(path)[:-3]
  cfg = config_lib.validate(load(path))
  counts = flops.count_params(cfg)
  if name in PAPER_SIZES:
    total, active = PAPER_SIZES[name]
    assert abs(counts["total"] / 1e9 - total) / total < 0.03, counts
    assert abs(counts["active"] / 1e9 - active) / active < 0.03, counts
    assert cfg.model.vocab_size == 152_064 and cfg.train.seq_len == 8192
    assert counts["projector"] == 12 * cfg.model.d_model ** 2


def test_tiny_variants_validate():
  for variant in ("moe", "ntp"):
    config_lib.validate(load(os.path.join(ROOT, "configs", "tiny.py"), variant))


def test_paper_table4_hyperparameters_of_9b():
  cfg = load(os.path.join(ROOT, "configs", "moe_9b.py"))
  m, e, t = cfg.model, cfg.model.moe, cfg.train
  assert (m.d_model, m.num_layers, e.num_dense_layers, m.head_dim) == (1280, 24, 1, 160)
  assert (m.num_heads, m.num_kv_heads, e.num_experts, e.num_shared_experts, e.top_k) == (8, 4, 144, 1, 8)
  assert (m.ffn_dim, e.expert_ffn, e.shared_expert_ffn) == (10944, 640, 640)
  assert (cfg.nitp.target_layer, cfg.nitp.weight) == (5, 0.8)
  assert (t.lr, t.global_batch, t.warmup_steps, t.decay_fraction) == (4.2e-4, 1024, 2000, 0.2)
  assert t.steps == round(330e9 / (1024 * 8192))


def test_9b_flops_match_appendix_g():
  report = flops.report(load(os.path.join(ROOT, "configs", "moe_9b.py")))
  paper = report["flops_per_token"]["paper_app_g"]
  assert abs(paper["ntp"] - 5.06e9) / 5.06e9 < 0.01
  assert abs(paper["nitp_extra"] - 1.18e8) / 1.18e8 < 0.01
  assert abs(paper["nitp_overhead"] - 0.023) < 0.001


def test_params_cli_prints_one_json_object():
  out = subprocess.run([sys.executable, "-m", "nitp_jax.params",
                        f"--config={ROOT}/configs/moe_9b.py"],
                       capture_output=True, text=True, check=True, cwd=ROOT).stdout
  report = json.loads(out)
  assert round(report["params_billions"]["total"], 2) == 8.75


BAD = [
    ("model.num_kv_heads", 3, "must divide model.num_heads=4"),
    ("model.head_dim", 0, "must be a positive number"),
    ("model.d_model", -8, "must be a positive number"),
    ("nitp.target_layer", 9, "must be in [0, model.num_layers=4]"),
    ("nitp.target_layer", -1, "must be in [0, model.num_layers=4]"),
    ("nitp.loss", "cos", "must be one of cosine, mse, smooth_l1, kl"),
    ("nitp.shift", 2, "must be 1 (t -> t+1, the paper) or 0"),
    ("nitp.projector", "mlp", "must be one of swiglu, none"),
    ("model.moe.dispatch", "sparse", "must be one of dropless, ragged, dense, gather, capacity"),
    ("model.remat_policy", "some", "must be one of none, full, dots, dots_no_batch"),
    ("train.microbatches", 3, "must divide train.global_batch=8"),
    ("train.seq_len", 512, "must be <= model.max_seq_len=256"),
    ("train.schedule", "cosine", "must be one of wsd, wsd_exp"),
    ("nitp.weight", -1.0, "must be >= 0"),
    ("model.moe.balance_loss", "token", "must be one of batch, sequence, none"),
    ("model.moe.bias_update_rate", -1e-3, "must be >= 0 (0 = no auxiliary-loss-free bias)"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_values_are_named(field, value, message):
  cfg = config_lib.base_config()
  if field.startswith("model.moe"):
    cfg.model.moe.num_experts = 4
  *parents, leaf = field.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg)
  assert str(err.value) == f"config.{field}={value!r} is invalid: {message}" or (
      str(err.value).startswith(f"config.{field}={value!r} is invalid: ")
      and message in str(err.value))


def test_moe_specific_errors():
  cfg = config_lib.base_config()
  cfg.model.moe.num_experts, cfg.model.moe.top_k = 4, 6
  with pytest.raises(config_lib.ConfigError, match=r"config.model.moe.top_k=6 .* <= model.moe.num_experts=4"):
    config_lib.validate(cfg)
  cfg.model.moe.top_k, cfg.model.moe.num_dense_layers = 2, 4
  with pytest.raises(config_lib.ConfigError, match="num_dense_layers=4 .* at least one MoE block"):
    config_lib.validate(cfg)
