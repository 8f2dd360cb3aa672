"""HF export: transformers loads every architecture with no missing or
unexpected keys and reproduces nitp_jax's logits; import -> export gives the
same files; unsupported models fail with clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import model as model_lib
from nitp_jax.export import hf
from tests.conftest import VOCAB
from tests.helpers import small_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

SEQ = 16
CASES = {  # name: (moe, qkv_bias, tie_embeddings, renormalize, scan_layers)
    "llama_tied": (False, False, True, False, True),
    "llama_untied": (False, False, False, False, False),
    "qwen2_tied": (False, True, True, False, True),
    "qwen2_untied": (False, True, False, False, True),
    "qwen2moe": (True, False, False, False, True),
    "qwen2moe_bias_tied_renorm": (True, True, True, True, False),
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen2moe": "Qwen2MoeForCausalLM"}


def _config(moe, qkv_bias, tie, renormalize, scan):
  cfg = small_config(moe=moe)
  m = cfg.model
  m.qkv_bias, m.tie_embeddings, m.scan_layers = qkv_bias, tie, scan
  if moe:
    m.num_layers = 3                  # 1 dense + 2 MoE blocks
    m.moe.renormalize = renormalize
    assert m.moe.dispatch == "dropless"  # the default, as trained; dropless like HF
  return cfg


def _random_params(cfg, seed=0):
  """Every weight random, norm scales around 1, biases non-zero."""
  shapes, _ = model_lib.abstract_params(cfg)
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.asarray(1.0 + 0.3 * rng.standard_normal(s.shape), jnp.float32)
    std = 0.3 if "bias" in name else 0.15
    return jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _jax_logits(cfg, params, tokens_BxT):
  model, _ = model_lib.build(cfg)
  logits, _, _ = jax.jit(model.apply)({"params": params["backbone"]}, jnp.asarray(tokens_BxT))
  return np.asarray(logits)


def _assert_same_backbone(params_a, params_b):
  """Equal weights, whatever the layer storage (scanned or unrolled)."""
  def flat(backbone):
    rest = {k: v for k, v in backbone.items() if not k.startswith("layer")}
    return rest, model_lib.layer_params(backbone)
  jax.tree.map(np.testing.assert_array_equal, flat(params_a["backbone"]),
               flat(params_b["backbone"]))


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def exported(request, tmp_path_factory):
  cfg = _config(*CASES[request.param])
  params = _random_params(cfg)
  out = hf.export_hf(params, cfg, str(tmp_path_factory.mktemp(request.param)))
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True, dtype=torch.float32, attn_implementation="eager")
  return request.param, cfg, params, out, model.eval(), info


def test_transformers_loads_every_key(exported):
  name, _, _, _, model, info = exported
  assert type(model).__name__ == CLASSES[name.split("_")[0]]
  for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
    assert not info[kind], (kind, info[kind])


def test_logits_match_transformers(exported):
  _, cfg, params, _, model, _ = exported
  tokens_BxT = np.random.default_rng(1).integers(0, cfg.model.vocab_size, (2, SEQ), np.int32)
  with torch.no_grad():
    hf_logits = model(torch.from_numpy(tokens_BxT.astype(np.int64))).logits.numpy()
  ours = _jax_logits(cfg, params, tokens_BxT)
  assert np.abs(ours).max() > 1.0                 # a non-trivial comparison
  np.testing.assert_allclose(hf_logits, ours, atol=1e-4, rtol=0)


def test_trained_moe_checkpoint_exports_to_the_same_model(trained_moe_run, tmp_path):
  """A checkpoint as training writes it (default dispatch: dropless), exported
  from its workdir: transformers' Qwen2-MoE gives the same logits."""
  _, cfg, params = ckpt_lib.restore_params(trained_moe_run)
  assert cfg.model.moe.num_experts and cfg.model.moe.dispatch == "dropless"
  out = hf.export_from_params(params, cfg, str(tmp_path / "hf"), trained_moe_run)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation="eager").eval()
  assert type(model).__name__ == "Qwen2MoeForCausalLM"
  tokens_BxT = np.random.default_rng(2).integers(0, VOCAB, (2, cfg.train.seq_len), np.int32)
  with torch.no_grad():
    hf_logits = model(torch.from_numpy(tokens_BxT.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(hf_logits, _jax_logits(cfg, params, tokens_BxT), atol=1e-4, rtol=0)


def test_import_then_export_reproduces_the_files(exported, tmp_path):
  _, cfg, params, out, _, _ = exported
  cfg2, params2 = hf.import_hf(out)
  assert set(params2) == {"backbone"}
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "ffn_dim", "qkv_bias", "tie_embeddings", "rope_theta",
                "norm_eps", "max_seq_len"):
    assert cfg2.model[field] == cfg.model[field], field
  for field in ("num_experts", "num_dense_layers", "top_k", "expert_ffn", "renormalize"):
    assert cfg2.model.moe[field] == cfg.model.moe[field] or not cfg.model.moe.num_experts
  _assert_same_backbone(params, params2)
  again = hf.export_hf(params2, cfg2, str(tmp_path))
  for name in (hf.WEIGHTS, hf.CONFIG):
    with open(os.path.join(out, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
      assert a.read() == b.read(), name


def test_import_reads_what_transformers_saves(exported, tmp_path):
  """save_pretrained (transformers' own writer) -> import_hf -> same weights."""
  _, _, params, _, model, _ = exported
  model.save_pretrained(str(tmp_path))
  _, params2 = hf.import_hf(str(tmp_path))
  _assert_same_backbone(params, params2)


def test_moe_config_fields():
  cfg = _config(*CASES["qwen2moe"])
  c, e = hf.hf_config(cfg), cfg.model.moe
  assert c["architectures"] == ["Qwen2MoeForCausalLM"]
  assert c["mlp_only_layers"] == [0] and c["decoder_sparse_step"] == 1
  assert (c["num_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"],
          c["shared_expert_intermediate_size"], c["norm_topk_prob"]) == (
              e.num_experts, e.top_k, e.expert_ffn, e.shared_expert_ffn, e.renormalize)


# ------------------------------------------------------------ errors

@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
  cfg = _config(*CASES["qwen2_untied"])
  return hf.export_hf(_random_params(cfg), cfg, str(tmp_path_factory.mktemp("dense")))


def _copy_with(src, dst, config=None, tensors=None):
  with open(os.path.join(src, hf.CONFIG)) as f:
    c = json.load(f)
  c.update(config or {})
  t = dict(hf.read_hf_tensors(src))
  for k, v in (tensors or {}).items():
    if v is None:
      del t[k]
    else:
      t[k] = v
  hf.safetensors.numpy.save_file(t, os.path.join(dst, hf.WEIGHTS))
  with open(os.path.join(dst, hf.CONFIG), "w") as f:
    json.dump(c, f)
  return str(dst)


def test_unexportable_moe_settings_are_errors():
  cfg = _config(*CASES["qwen2moe"])
  cfg.model.moe.routed_scaling = 2.0
  with pytest.raises(ValueError, match="routed_scaling"):
    hf.hf_config(cfg)
  cfg.model.moe.routed_scaling, cfg.model.moe.num_shared_experts = 1.0, 0
  with pytest.raises(ValueError, match="num_shared_experts"):
    hf.hf_config(cfg)
  cfg.model.moe.num_shared_experts, cfg.model.moe.bias_update_rate = 1, 1e-3
  with pytest.raises(hf.ExportError, match=r"^config.model.moe.bias_update_rate=0.001 cannot be "
                     r"exported: .*router bias"):
    hf.hf_config(cfg)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"use_sliding_window": True}, "sliding_window"),
])
def test_unsupported_hf_configs_are_errors(dense_dir, tmp_path, change, message):
  with pytest.raises(ValueError, match=message):
    hf.import_hf(_copy_with(dense_dir, tmp_path, config=change))


def test_missing_extra_or_misshaped_tensors_are_errors(dense_dir, tmp_path):
  key = "model.layers.1.self_attn.k_proj.bias"
  with pytest.raises(ValueError, match=f"lacks tensor '{key}'"):
    hf.import_hf(_copy_with(dense_dir, tmp_path, tensors={key: None}))
  with pytest.raises(ValueError, match="cannot represent: model.layers.0.self_attn.o_proj.bias"):
    hf.import_hf(_copy_with(dense_dir, tmp_path, tensors={
        "model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}))
  with pytest.raises(ValueError, match=r"has shape \(97, 16\)"):
    hf.import_hf(_copy_with(dense_dir, tmp_path, tensors={
        "lm_head.weight": np.zeros((97, 16), np.float32)}))
  with pytest.raises(ValueError, match="has no config.json"):
    hf.import_hf(str(tmp_path / "nowhere"))


def test_gated_shared_expert_is_an_error(tmp_path_factory):
  cfg = _config(*CASES["qwen2moe"])
  src = hf.export_hf(_random_params(cfg), cfg, str(tmp_path_factory.mktemp("moe")))
  key = "model.layers.1.mlp.shared_expert_gate.weight"
  dst = _copy_with(src, tmp_path_factory.mktemp("gated"),
                   tensors={key: np.ones((1, cfg.model.d_model), np.float32)})
  with pytest.raises(ValueError, match="gated shared expert"):
    hf.import_hf(dst)


# ---------------------------------------------------- tokenizer and CLI

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  from nitp_jax.data import tokenizer as tok_lib
  rng = np.random.default_rng(0)
  words = ["hello", "world", "the", "quick", "über", "naïve", "123", "  two", "tab\tx"]
  docs = [" ".join(rng.choice(words, 30)) + "\n" + " ".join(rng.choice(words, 9))
          for _ in range(200)]
  return tok_lib.train_tokenizer(docs, 300, str(tmp_path_factory.mktemp("sp") / "sp"))


def test_tokenizer_loads_in_transformers_and_matches_sentencepiece(sp_model, tmp_path):
  from nitp_jax.data import tokenizer as tok_lib
  cfg = _config(*CASES["llama_tied"])
  cfg.model.vocab_size = 300
  out = hf.export_hf(_random_params(cfg), cfg, str(tmp_path), tokenizer_path=sp_model)
  with open(os.path.join(out, hf.CONFIG)) as f:
    c = json.load(f)
  assert (c["pad_token_id"], c["bos_token_id"], c["eos_token_id"]) == (
      tok_lib.PAD_ID, tok_lib.BOS_ID, tok_lib.EOS_ID)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  ours = tok_lib.load_tokenizer(sp_model)
  assert (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id) == (
      tok_lib.PAD_ID, tok_lib.BOS_ID, tok_lib.EOS_ID)
  for text in ["hello world", " leading", "über naïve\n\ttab  two", "unseen 🙂 ±", "\n\nx\n"]:
    ids = theirs(text)["input_ids"]
    assert ids == ours.encode(text), text
    assert theirs.decode(ids) == text


NO_SENTENCEPIECE = """
import sys
sys.modules["sentencepiece"] = None  # as on a machine without it
import transformers
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
print(tok("über naïve\\n\\ttab  two")["input_ids"])
"""


def test_exported_tokenizer_needs_no_sentencepiece(sp_model, tmp_path):
  import subprocess
  import sys
  from nitp_jax.data import tokenizer as tok_lib
  cfg = _config(*CASES["llama_tied"])
  cfg.model.vocab_size = 300
  out = hf.export_hf(_random_params(cfg), cfg, str(tmp_path), tokenizer_path=sp_model)
  proc = subprocess.run([sys.executable, "-c", NO_SENTENCEPIECE, out], capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  ids = json.loads(proc.stdout.strip().splitlines()[-1])
  assert ids == tok_lib.load_tokenizer(sp_model).encode("über naïve\n\ttab  two")


def test_a_tokenizer_json_run_exports_the_same_tokenizer(tmp_path):
  from tests.test_tokenizers import build_bpe_json
  path = build_bpe_json(tmp_path / "tok", vocab_size=300)
  cfg = _config(*CASES["qwen2_tied"])
  cfg.model.vocab_size = 320  # padded past the tokenizer's 300, as Qwen2's 152,064
  out = hf.export_hf(_random_params(cfg), cfg, str(tmp_path / "hf"), tokenizer_path=path)
  with open(path) as a, open(os.path.join(out, hf.TOKENIZER_JSON)) as b:
    assert a.read() == b.read()
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  assert theirs.eos_token == "<|endoftext|>" and theirs("def f(x):")["input_ids"] == \
      __import__("tokenizers").Tokenizer.from_file(path).encode("def f(x):").ids


def test_export_from_workdir_uses_the_run_tokenizer(sp_model, tmp_path):
  """The CLI path exports with the tokenizer found in <workdir>/data/."""
  cfg = _config(*CASES["llama_untied"])
  cfg.model.vocab_size = 300
  params = _random_params(cfg)
  workdir = tmp_path / "run"
  os.makedirs(workdir / "data")
  with open(sp_model, "rb") as a, open(workdir / "data" / hf.TOKENIZER, "wb") as b:
    b.write(a.read())
  out = hf.export_from_params(params, cfg, str(tmp_path / "hf"), str(workdir))
  assert sorted(os.listdir(out)) == sorted([hf.CONFIG, hf.WEIGHTS, hf.TOKENIZER_JSON,
                                            hf.TOKENIZER_CONFIG])
