"""Starting from HuggingFace weights: a small random Qwen2 / Qwen2-MoE model
written by transformers itself loads as the run's backbone (same logits as
transformers), and another architecture is refused naming every field."""

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
