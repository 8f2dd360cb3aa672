"""HuggingFace transformers interchange: safetensors + config.json.

  dense, no QKV bias  <->  LlamaForCausalLM
  dense, QKV bias     <->  Qwen2ForCausalLM
  MoE                 <->  Qwen2MoeForCausalLM (mlp_only_layers = the dense
                           prefix, experts as per-expert keys)

Qwen2-MoE gates its shared expert with sigmoid(x @ w): we write w = 0
(gate 0.5) and 2x the shared expert's down_proj, which reproduces our
ungated shared expert exactly (both factors are powers of two). The NITP
projector is training-only and is left out. Torch Linear weights are
[out, in], ours [in, out]. Export needs neither torch nor transformers.

CLI:  python -m nitp_jax.export.hf --workdir=DIR --out=HF_DIR [--step=N]
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from absl import flags

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import cli
from nitp_jax import config as config_lib
from nitp_jax import layout
from nitp_jax import model as model_lib
from nitp_jax.data import hf_tokenizer
from nitp_jax.data import tokenizer as tok_lib
from nitp_jax.errors import ConfigError, ExportError
from nitp_jax.layout import write_json

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM"}
SHARED_DOWN_SCALE = 2.0       # 1 / sigmoid(0): undoes the zeroed shared gate
IGNORED_KEYS = ("rotary_emb.inv_freq",)  # buffers older exports carry
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                      "BF16": ml_dtypes.bfloat16}
Array = np.ndarray


# ----------------------------------------------------------------- config

def hf_model_type(cfg: ml_collections.ConfigDict) -> str:
  """The HF model_type ("llama", "qwen2" or "qwen2_moe") of a nitp_jax config."""
  if config_lib.is_moe(cfg):
    return "qwen2_moe"
  return "qwen2" if cfg.model.qkv_bias else "llama"


def check_exportable(cfg: ml_collections.ConfigDict) -> None:
  """ExportError naming the field when HF cannot reproduce the model."""
  e = cfg.model.moe
  if not config_lib.is_moe(cfg):
    return
  if e.routed_scaling != 1.0:
    raise ExportError(f"config.model.moe.routed_scaling={e.routed_scaling} cannot be "
                     "exported: Qwen2MoeForCausalLM has no routed scaling; only 1.0 is exportable.")
  if e.get("bias_update_rate", 0.0) > 0:
    raise ExportError(f"config.model.moe.bias_update_rate={e.bias_update_rate} cannot be "
                     "exported: Qwen2MoeForCausalLM has no router bias for the top-k choice; "
                     "only checkpoints trained with bias_update_rate=0 are exportable.")
  if e.num_shared_experts < 1:
    raise ExportError("config.model.moe.num_shared_experts=0 cannot be exported: "
                     "Qwen2MoeForCausalLM always has a shared expert; train with >= 1.")


def hf_config(cfg: ml_collections.ConfigDict, special_ids: dict | None = None) -> dict:
  """config.json contents for the model (special token ids null unless given)."""
  check_exportable(cfg)
  m, e = cfg.model, cfg.model.moe
  model_type = hf_model_type(cfg)
  ids = special_ids or {}
  out = {
      "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": m.vocab_size, "hidden_size": m.d_model,
      "intermediate_size": m.ffn_dim, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
      "head_dim": m.head_dim, "hidden_act": "silu",
      "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
      "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
      "attention_dropout": 0.0, "use_cache": True, "dtype": "float32",
      "bos_token_id": ids.get("bos"), "eos_token_id": ids.get("eos"),
      "pad_token_id": ids.get("pad"),
  }
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  if model_type == "qwen2_moe":
    out.update(
        num_experts=e.num_experts, num_experts_per_tok=e.top_k,
        moe_intermediate_size=e.expert_ffn,
        shared_expert_intermediate_size=e.num_shared_experts * e.shared_expert_ffn,
        norm_topk_prob=e.renormalize, decoder_sparse_step=1,
        mlp_only_layers=list(range(e.num_dense_layers)), qkv_bias=m.qkv_bias,
        router_aux_loss_coef=e.aux_loss_weight, output_router_logits=False)
  return out


def _sparse_layers(hf: dict) -> list[int]:
  """Layers HF's Qwen2-MoE builds as sparse blocks (its own rule)."""
  skip, step = hf.get("mlp_only_layers") or [], hf.get("decoder_sparse_step", 1)
  return [i for i in range(hf["num_hidden_layers"])
          if i not in skip and (i + 1) % step == 0]


def _rope_theta(hf: dict) -> float:
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    raise ExportError(f"HF rope scaling {rope!r} is not supported: nitp_jax only has "
                     "plain RoPE (rope_type 'default').")
  return float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def _check_importable(hf: dict) -> None:
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ExportError(f"HF model_type {model_type!r} is not supported: import handles "
                     f"{', '.join(ARCHITECTURES.values())}.")
  if hf.get("hidden_act", "silu") != "silu":
    raise ExportError(f"HF hidden_act={hf['hidden_act']!r} is not supported: only silu (SwiGLU).")
  if hf.get("use_sliding_window"):
    raise ExportError("HF use_sliding_window=true is not supported: nitp_jax attention is full causal.")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ExportError("Llama attention_bias/mlp_bias=true is not supported: nitp_jax has "
                     "QKV biases only (export those as Qwen2).")
  if model_type == "qwen2_moe":
    sparse = _sparse_layers(hf)
    first = hf["num_hidden_layers"] - len(sparse)
    if not sparse or hf.get("num_experts", 0) < 1 or sparse != list(range(first, hf["num_hidden_layers"])):
      raise ExportError(f"HF Qwen2-MoE sparse layers {sparse} are not supported: nitp_jax "
                       "needs dense blocks first, then only MoE blocks (and num_experts > 0).")


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """A validated nitp_jax config (base_config() defaults elsewhere) for a
  HF config.json dict."""
  _check_importable(hf)
  c = config_lib.base_config()
  m, e = c.model, c.model.moe
  m.vocab_size, m.d_model = hf["vocab_size"], hf["hidden_size"]
  m.num_layers, m.num_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
  m.num_kv_heads = hf.get("num_key_value_heads") or m.num_heads
  m.head_dim = hf.get("head_dim") or m.d_model // m.num_heads
  m.ffn_dim = hf["intermediate_size"]
  m.qkv_bias = {"llama": False, "qwen2": True}.get(hf["model_type"], hf.get("qkv_bias", True))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  m.rope_theta, m.norm_eps = _rope_theta(hf), float(hf.get("rms_norm_eps", 1e-6))
  m.max_seq_len = hf.get("max_position_embeddings", m.max_seq_len)
  m.init_std = float(hf.get("initializer_range", m.init_std))
  if hf["model_type"] == "qwen2_moe":
    e.num_experts, e.top_k = hf["num_experts"], hf["num_experts_per_tok"]
    e.num_dense_layers = m.num_layers - len(_sparse_layers(hf))
    e.expert_ffn = hf["moe_intermediate_size"]
    e.num_shared_experts, e.shared_expert_ffn = 1, hf["shared_expert_intermediate_size"]
    e.renormalize = bool(hf.get("norm_topk_prob", False))
    e.routed_scaling = 1.0
    e.aux_loss_weight = float(hf.get("router_aux_loss_coef", e.aux_loss_weight))
  c.train.seq_len = min(c.train.seq_len, m.max_seq_len)
  c.nitp.target_layer = min(c.nitp.target_layer, m.num_layers)
  return config_lib.validate(c)


# ---------------------------------------------------------------- tensors

def _np(x) -> Array:
  return np.asarray(jax.device_get(x), dtype=np.float32)


def _t(w_IxO) -> Array:
  """[in, out] -> torch Linear [out, in] (or back)."""
  return np.ascontiguousarray(_np(w_IxO).T)


def _export_attention(a: dict) -> dict[str, Array]:
  d, n, h = a["q"].shape
  k = a["k"].shape[1]
  out = {"q_proj.weight": _t(_np(a["q"]).reshape(d, n * h)),
         "k_proj.weight": _t(_np(a["k"]).reshape(d, k * h)),
         "v_proj.weight": _t(_np(a["v"]).reshape(d, k * h)),
         "o_proj.weight": _t(_np(a["o"]).reshape(n * h, d))}
  for name in ("q", "k", "v"):
    if f"{name}_bias" in a:
      out[f"{name}_proj.bias"] = _np(a[f"{name}_bias"]).reshape(-1)
  return {f"self_attn.{k_}": v for k_, v in out.items()}


def _export_swiglu(p: dict, prefix: str, down_scale: float = 1.0) -> dict[str, Array]:
  return {f"{prefix}gate_proj.weight": _t(p["gate"]),
          f"{prefix}up_proj.weight": _t(p["up"]),
          f"{prefix}down_proj.weight": _t(p["down"]) * np.float32(down_scale)}


def _export_moe(p: dict) -> dict[str, Array]:
  gate_ExDxF, up_ExDxF, down_ExFxD = _np(p["gate"]), _np(p["up"]), _np(p["down"])
  out = {"mlp.gate.weight": _t(p["router"]),
         "mlp.shared_expert_gate.weight": np.zeros((1, gate_ExDxF.shape[1]), np.float32)}
  out.update(_export_swiglu(p["shared"], "mlp.shared_expert.", SHARED_DOWN_SCALE))
  for i in range(gate_ExDxF.shape[0]):
    out.update(_export_swiglu({"gate": gate_ExDxF[i], "up": up_ExDxF[i], "down": down_ExFxD[i]},
                              f"mlp.experts.{i}."))
  return out


def _export_block(p: dict) -> dict[str, Array]:
  out = {"input_layernorm.weight": _np(p["attn_norm"]["scale"]),
         "post_attention_layernorm.weight": _np(p["ffn_norm"]["scale"])}
  out.update(_export_attention(p["attn"]))
  out.update(_export_moe(p["moe"]) if "moe" in p else _export_swiglu(p["mlp"], "mlp."))
  return out


def hf_tensors(params: dict, cfg: ml_collections.ConfigDict) -> dict[str, Array]:
  """HF state dict (float32 numpy) of params["backbone"], any layer storage."""
  check_exportable(cfg)
  backbone = params["backbone"]
  out = {"model.embed_tokens.weight": _np(backbone["embed"]),
         "model.norm.weight": _np(backbone["final_norm"]["scale"])}
  if not cfg.model.tie_embeddings:
    out["lm_head.weight"] = _t(backbone["unembed"])
  for i, block in sorted(model_lib.layer_params(backbone).items()):
    out.update({f"model.layers.{i}.{k}": v for k, v in _export_block(block).items()})
  return out


class _Tensors:
  """Strict reader: each key once, with the expected shape; reports leftovers."""

  def __init__(self, tensors: dict[str, Array], source: str):
    self.tensors, self.source, self.used = tensors, source, set()

  def __call__(self, key: str, shape: tuple[int, ...]) -> Array:
    if key not in self.tensors:
      raise ExportError(f"{self.source} lacks tensor {key!r}: the checkpoint does not "
                       "match its config.json (or is not a supported architecture).")
    w = np.asarray(self.tensors[key], np.float32)
    if w.shape != tuple(shape):
      raise ExportError(f"{self.source}: tensor {key!r} has shape {w.shape}, config.json "
                       f"implies {tuple(shape)}.")
    self.used.add(key)
    return w

  def check_all_used(self, also_ignored: tuple[str, ...] = ()) -> None:
    left = sorted(k for k in set(self.tensors) - self.used
                  if k not in also_ignored and not k.endswith(IGNORED_KEYS))
    if left:
      raise ExportError(f"{self.source} has tensors nitp_jax cannot represent: "
                       f"{', '.join(left[:8])}{' ...' if len(left) > 8 else ''}")


def _import_attention(get: _Tensors, pre: str, m) -> dict:
  d, n, k, h = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim
  a = {"q": get(pre + "q_proj.weight", (n * h, d)).T.reshape(d, n, h),
       "k": get(pre + "k_proj.weight", (k * h, d)).T.reshape(d, k, h),
       "v": get(pre + "v_proj.weight", (k * h, d)).T.reshape(d, k, h),
       "o": get(pre + "o_proj.weight", (d, n * h)).T.reshape(n, h, d)}
  if m.qkv_bias:
    for name, heads in (("q", n), ("k", k), ("v", k)):
      a[f"{name}_bias"] = get(f"{pre}{name}_proj.bias", (heads * h,)).reshape(heads, h)
  return a


def _import_swiglu(get: _Tensors, pre: str, d: int, f: int, down_scale: float = 1.0) -> dict:
  return {"gate": get(pre + "gate_proj.weight", (f, d)).T,
          "up": get(pre + "up_proj.weight", (f, d)).T,
          "down": get(pre + "down_proj.weight", (d, f)).T / np.float32(down_scale)}


def _import_moe(get: _Tensors, pre: str, m) -> dict:
  e, d = m.moe, m.d_model
  gate_w = get(pre + "shared_expert_gate.weight", (1, d))
  if np.any(gate_w != 0):
    raise ExportError(f"{get.source}: {pre}shared_expert_gate.weight is not zero: a gated "
                     "shared expert cannot be represented by nitp_jax (ungated shared expert).")
  experts = [_import_swiglu(get, f"{pre}experts.{i}.", d, e.expert_ffn)
             for i in range(e.num_experts)]
  p = {name: np.stack([x[name] for x in experts]) for name in ("gate", "up", "down")}
  p["router"] = get(pre + "gate.weight", (e.num_experts, d)).T
  p["shared"] = _import_swiglu(get, pre + "shared_expert.", d, e.shared_expert_ffn,
                               SHARED_DOWN_SCALE)
  return p


def _import_block(get: _Tensors, i: int, cfg: ml_collections.ConfigDict) -> dict:
  m, pre = cfg.model, f"model.layers.{i}."
  p = {"attn_norm": {"scale": get(pre + "input_layernorm.weight", (m.d_model,))},
       "ffn_norm": {"scale": get(pre + "post_attention_layernorm.weight", (m.d_model,))},
       "attn": _import_attention(get, pre + "self_attn.", m)}
  if config_lib.is_moe(cfg) and i >= m.moe.num_dense_layers:
    p["moe"] = _import_moe(get, pre + "mlp.", m)
  else:
    p["mlp"] = _import_swiglu(get, pre + "mlp.", m.d_model, m.ffn_dim)
  return p


def params_from_tensors(tensors: dict[str, Array], cfg: ml_collections.ConfigDict,
                        source: str = "checkpoint") -> dict:
  """{"backbone": ...} laid out for cfg, from a HF state dict (strict)."""
  m = cfg.model
  get = _Tensors(tensors, source)
  backbone = {"embed": get("model.embed_tokens.weight", (m.vocab_size, m.d_model)),
              "final_norm": {"scale": get("model.norm.weight", (m.d_model,))}}
  if not m.tie_embeddings:
    backbone["unembed"] = get("lm_head.weight", (m.vocab_size, m.d_model)).T
  for i in range(m.num_layers):
    backbone[f"layer_{i}"] = _import_block(get, i, cfg)
  get.check_all_used(("lm_head.weight",) if m.tie_embeddings else ())
  backbone = jax.tree.map(jax.numpy.asarray, backbone)
  return {"backbone": model_lib.arrange_layers(backbone, cfg)}


# ------------------------------------------------------------------ files

def _read_safetensors(path: str) -> dict[str, Array]:
  """All tensors of one file as numpy (bfloat16 via ml_dtypes)."""
  with open(path, "rb") as f:
    views = safetensors.deserialize(f.read())
  out = {}
  for name, v in views:
    if v["dtype"] not in SAFETENSORS_DTYPES:
      raise ExportError(f"{path}: tensor {name!r} has dtype {v['dtype']}; import reads "
                       f"{', '.join(SAFETENSORS_DTYPES)} only.")
    out[name] = np.frombuffer(v["data"], SAFETENSORS_DTYPES[v["dtype"]]).reshape(v["shape"])
  return out


def read_hf_tensors(hf_dir: str) -> dict[str, Array]:
  """The state dict of model.safetensors or a sharded index."""
  index = os.path.join(hf_dir, WEIGHTS_INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.isfile(os.path.join(hf_dir, WEIGHTS)):
    files = [WEIGHTS]
  else:
    raise ExportError(f"{hf_dir!r} has neither {WEIGHTS} nor {WEIGHTS_INDEX}: pass a "
                     "directory written by export_hf or save_pretrained(safe_serialization=True).")
  tensors = {}
  for name in files:
    tensors.update(_read_safetensors(os.path.join(hf_dir, name)))
  return tensors


def _special_ids(tokenizer: tok_lib.Tokenizer) -> dict:
  """bos/eos/pad/unk ids of a loaded tokenizer (None when it has none), and
  their token strings under "pieces"."""
  ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
         "unk": tokenizer.unk_id}
  ids = {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}
  ids["pieces"] = {k: tokenizer.piece(v) for k, v in ids.items() if v is not None}
  return ids


def tokenizer_config(special: dict, max_len: int) -> dict:
  """tokenizer_config.json for transformers' fast tokenizer over our
  tokenizer.json: no BOS/EOS added, no text clean-up (lossless round trips)."""
  pieces = special["pieces"]
  return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
          "bos_token": pieces.get("bos"), "eos_token": pieces.get("eos"),
          "pad_token": pieces.get("pad"), "unk_token": pieces.get("unk"),
          "add_bos_token": False, "add_eos_token": False,
          "clean_up_tokenization_spaces": False}


def write_tokenizer_json(tokenizer: tok_lib.Tokenizer, path: str) -> None:
  """The tokenizer as a HuggingFace tokenizer.json: copied, or converted from
  SentencePiece (so transformers and lm-eval need no sentencepiece)."""
  if tokenizer.kind == "huggingface":
    shutil.copyfile(tokenizer.path, path)
  else:
    hf_tokenizer.from_sentencepiece(tokenizer.path).save(path)


def export_hf(params: dict, cfg: ml_collections.ConfigDict, out_dir: str,
              tokenizer_path: str | None = None) -> str:
  """Write model.safetensors + config.json (and, given a tokenizer,
  tokenizer.json + tokenizer_config.json) to out_dir; return out_dir. Loads
  with AutoModelForCausalLM / AutoTokenizer.from_pretrained."""
  check_exportable(cfg)
  tensors = hf_tensors(params, cfg)
  tokenizer = tok_lib.load_tokenizer(tokenizer_path) if tokenizer_path else None
  special = _special_ids(tokenizer) if tokenizer else None
  os.makedirs(out_dir, exist_ok=True)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
  write_json(os.path.join(out_dir, CONFIG), hf_config(cfg, special))
  if tokenizer:
    write_tokenizer_json(tokenizer, os.path.join(out_dir, TOKENIZER_JSON))
    write_json(os.path.join(out_dir, TOKENIZER_CONFIG),
               tokenizer_config(special, cfg.model.max_seq_len))
  return out_dir


def import_hf(hf_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(cfg, {"backbone": ...}) from a HF Llama / Qwen2 / Qwen2-MoE directory.
  The NITP projector is not in HF files: initialise it to train further."""
  path = os.path.join(hf_dir, CONFIG)
  if not os.path.isfile(path):
    raise ExportError(f"{hf_dir!r} has no {CONFIG}: pass a HF model directory.")
  with open(path) as f:
    cfg = config_from_hf(json.load(f))
  return cfg, params_from_tensors(read_hf_tensors(hf_dir), cfg, source=hf_dir)


# Model fields that decide what a HF checkpoint's weights mean: a run that
# starts from them (config.init.from_hf) must agree on every one.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                       "head_dim", "ffn_dim", "qkv_bias", "tie_embeddings", "rope_theta",
                       "norm_eps")
MOE_ARCHITECTURE_FIELDS = ("num_experts", "top_k", "num_dense_layers", "expert_ffn",
                           "num_shared_experts", "shared_expert_ffn", "renormalize",
                           "routed_scaling")


def architecture_mismatches(hf_cfg: ml_collections.ConfigDict,
                            cfg: ml_collections.ConfigDict) -> list[str]:
  """'model.field: HF value vs run value' for every field that differs."""
  fields = [f"model.{f}" for f in ARCHITECTURE_FIELDS]
  if hf_cfg.model.moe.num_experts or cfg.model.moe.num_experts:
    fields += [f"model.moe.{f}" for f in MOE_ARCHITECTURE_FIELDS]
  diffs = [f"{f}: {hf_cfg[f]!r} in HF vs {cfg[f]!r}" for f in fields  # dotted ConfigDict keys
           if hf_cfg[f] != cfg[f]]
  if cfg.model.max_seq_len > hf_cfg.model.max_seq_len:
    diffs.append(f"model.max_seq_len: {cfg.model.max_seq_len} > the HF model's "
                 f"{hf_cfg.model.max_seq_len}")
  return diffs


def backbone_from_hf(hf_dir: str, cfg: ml_collections.ConfigDict) -> dict:
  """The backbone params of a HF directory, laid out for the run `cfg`;
  ConfigError naming every architecture field where the two disagree."""
  hf_cfg, params = import_hf(hf_dir)
  diffs = architecture_mismatches(hf_cfg, cfg)
  if diffs:
    raise ConfigError(f"--config.init.from_hf={hf_dir} is another architecture than the run's "
                      f"config ({'; '.join(diffs)}): set those --config.model fields to the HF "
                      "model's values")
  return model_lib.arrange_layers(params["backbone"], cfg)


def hf_tokenizer_file(hf_dir: str) -> str | None:
  """The tokenizer of a HF directory: tokenizer.json, else tokenizer.model."""
  for name in (TOKENIZER_JSON, TOKENIZER):
    if os.path.isfile(os.path.join(hf_dir, name)):
      return os.path.join(hf_dir, name)
  return None


def with_hf_tokenizer(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """cfg whose data.tokenizer is the tokenizer of cfg.init.from_hf (a run
  that starts from HF weights reads text as that model does)."""
  hf_dir = cfg.init.from_hf
  if not hf_dir:
    return cfg
  found = hf_tokenizer_file(hf_dir)
  if found is None:
    raise ConfigError(f"--config.init.from_hf={hf_dir} has no tokenizer.json or "
                      "tokenizer.model: the run must read text with that model's tokenizer")
  if cfg.data.tokenizer and os.path.abspath(cfg.data.tokenizer) != os.path.abspath(found):
    raise ConfigError(f"--config.data.tokenizer={cfg.data.tokenizer} is not the tokenizer of "
                      f"--config.init.from_hf ({found}): leave data.tokenizer empty")
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.data.tokenizer = found
  return cfg


# -------------------------------------------------------------------- CLI

def export_from_params(params: dict, cfg: ml_collections.ConfigDict, out_dir: str,
                       workdir: str | None = None, tokenizer_path: str | None = None) -> str:
  """export_hf with the run's tokenizer (nitp_jax.layout) when none is given."""
  return export_hf(params, cfg, out_dir, tokenizer_path or layout.run_tokenizer(cfg, workdir))


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if f.tokenizer:
    tok_lib.load_tokenizer(f.tokenizer)  # DataError naming --tokenizer, before the restore
  layout.make_local_dir(f.out, "--out", ExportError)  # before the restore, too
  _, cfg, params = ckpt_lib.restore_params(f.workdir, f.step)
  out = export_from_params(params, cfg, f.out, f.workdir, f.tokenizer or None)
  print(f"wrote {ARCHITECTURES[hf_model_type(cfg)]} to {out}")


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training run directory (its checkpoints/).",
                      required=True)
  flags.DEFINE_string("out", None, "Output directory for the HF model.", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("tokenizer", "", "SentencePiece .model or HuggingFace "
                      "tokenizer.json (default: the run's).")


if __name__ == "__main__":
  cli.run_main(main, define_flags, usage="--workdir=DIR --out=HF_DIR [--step=N]",
               flag_names={"data.tokenizer": "--tokenizer"})
