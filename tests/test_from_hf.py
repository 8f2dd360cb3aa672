"""Starting from HuggingFace weights: a small random Qwen2 / Qwen2-MoE model
written by transformers itself loads as the run's backbone (same logits as
transformers), and another architecture is refused naming every field."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import model as model_lib
from nitp_jax.errors import ConfigError
from nitp_jax.export import hf
from tests.helpers import small_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def save_transformers_model(cfg, directory, seed=0) -> str:
  """A randomly initialised transformers model of cfg's architecture."""
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(**hf.hf_config(cfg))
  config.initializer_range = 0.2  # sharper logits than the default 0.02
  model = transformers.AutoModelForCausalLM.from_config(config)
  with torch.no_grad():  # nitp_jax's shared expert is ungated: gate 0.5, as export writes
    for name, weight in model.named_parameters():
      if name.endswith("shared_expert_gate.weight"):
        weight.zero_()
  model.save_pretrained(str(directory))
  return str(directory)


@pytest.mark.parametrize("moe", [False, True], ids=["qwen2", "qwen2moe"])
def test_backbone_from_hf_computes_transformers_logits(moe, tmp_path):
  cfg = small_config(moe=moe)
  cfg.model.qkv_bias = True
  hf_dir = save_transformers_model(cfg, tmp_path / "hf")
  backbone = hf.backbone_from_hf(hf_dir, cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 12))
  net, _ = model_lib.build(cfg)
  ours = np.asarray(net.apply({"params": backbone}, jnp.asarray(tokens))[0])
  theirs_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
  with torch.no_grad():
    theirs = theirs_model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=2e-4)
  abstract, _ = model_lib.abstract_params(cfg)
  assert jax.tree.structure(backbone) == jax.tree.structure(abstract["backbone"])


def test_another_architecture_is_refused_naming_each_field(tmp_path):
  cfg = small_config()
  hf_dir = save_transformers_model(cfg, tmp_path / "hf")
  other = small_config()
  other.model.num_kv_heads, other.model.vocab_size = 4, 128
  with pytest.raises(ConfigError) as e:
    hf.backbone_from_hf(hf_dir, other)
  message = str(e.value)
  assert "model.vocab_size: 97 in HF vs 128" in message
  assert "model.num_kv_heads: 2 in HF vs 4" in message
  assert "\n" not in message


def test_training_starts_from_hf_weights_with_its_tokenizer_and_resumes(tmp_path):
  import json
  from nitp_jax import train
  from tests.conftest import CORPUS_GLOB, train_config
  from tests.test_tokenizers import build_bpe_json
  cfg = train_config(str(tmp_path / "prepared"), steps=2, eval_every=2, checkpoint_every=2,
                     geometry_every=0)
  cfg.model.qkv_bias, cfg.data.input = True, CORPUS_GLOB
  hf_dir = save_transformers_model(cfg, tmp_path / "hf")
  build_bpe_json(hf_dir, vocab_size=500)
  cfg.init.from_hf = hf_dir
  trainer = train.Trainer(cfg, str(tmp_path / "run"))
  try:
    assert trainer.cfg.data.tokenizer == os.path.join(hf_dir, "tokenizer.json")
    state = trainer.initial_state()
    tokens = np.random.default_rng(0).integers(0, 500, (1, 12))
    net, _ = model_lib.build(cfg)
    ours = np.asarray(net.apply({"params": state["params"]["backbone"]}, jnp.asarray(tokens))[0])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
      np.testing.assert_allclose(ours, theirs(torch.tensor(tokens)).logits.numpy(), atol=2e-4)
  finally:
    trainer.close()
  assert train.run(cfg, str(tmp_path / "run"))["step"] == 2
  with open(tmp_path / "prepared" / "manifest.json") as f:
    assert json.load(f)["tokenizer"]["kind"] == "huggingface"
  cfg.train.steps = 3
  assert train.run(cfg, str(tmp_path / "run"))["step"] == 3  # from its own checkpoint
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    steps = [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]
  assert steps == [1, 2, 3]
  cfg.data.tokenizer = str(tmp_path / "other.model")
  with pytest.raises(ConfigError, match="is not the tokenizer of --config.init.from_hf"):
    train.run(cfg, str(tmp_path / "run2"))
