"""Config schema: defaults for every field, and `validate` with clear errors.

Every file in `configs/` starts from `base_config()` and overrides what its
model needs, so one schema documents all knobs.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Iterator

import ml_collections

from nitp_jax.errors import ConfigError

# Allowed values; the model/moe/nitp ones are checked in model_config.py.
ATTENTION_IMPLS = ("xla", "cudnn", "auto")  # auto: cudnn on GPU in bf16/fp16, else xla
DISPATCHES = ("dropless", "ragged", "dense", "gather", "capacity")
# Dispatches whose outputs depend on each token's own routing only (causal,
# document-isolated): the ones training accepts. gather/capacity fill
# capacity slots over the whole sequence, so later tokens change earlier ones.
CAUSAL_DISPATCHES = ("dropless", "ragged", "dense")
BALANCE_LOSSES = ("batch", "sequence", "none")
NITP_LOSSES = ("cosine", "mse", "smooth_l1", "kl")
NITP_VARIANTS = ("nitp", "cosine_regularizer")
PROJECTORS = ("swiglu", "none")
HIDDEN_SOURCES = ("after_norm", "before_norm")
SCHEDULES = ("wsd", "wsd_exp")
MAX_SEED = 2**31                # seeds are in [0, MAX_SEED): data.seed + step stays < 2**32


def base_config() -> ml_collections.ConfigDict:
  """All fields with defaults (a tiny dense model, NITP on)."""
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 8192
  m.d_model = 256
  m.num_layers = 4              # total blocks, dense + MoE
  m.num_heads = 4
  m.num_kv_heads = 2
  m.head_dim = 64
  m.ffn_dim = 1024              # dense SwiGLU hidden size
  m.qkv_bias = False
  m.tie_embeddings = True
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.max_seq_len = 256           # context length the model is trained at
  m.attention_impl = "xla"
  m.scan_layers = True
  m.remat_policy = "none"
  m.ce_chunk = 0                # cross-entropy over this many positions at a time
                                # (no [B, T, V] float32 logits); 0 = full logits
  m.compute_dtype = "float32"
  m.param_dtype = "float32"
  m.init_std = 0.02

  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 0             # 0 = dense model
  e.num_dense_layers = 1        # dense blocks before the MoE blocks
  e.num_shared_experts = 1
  e.top_k = 2
  e.expert_ffn = 256
  e.shared_expert_ffn = 256
  e.renormalize = False         # renormalise the top-k softmax weights to 1
  e.routed_scaling = 1.0
  e.dispatch = "dropless"       # grouped block matmuls, no drops (causal); "ragged":
                                # dropless by ragged_dot; "dense": reference; "gather" /
                                # "capacity": capacity slots (drop, not causal: not for training)
  e.capacity_factor = 1.25
  e.aux_loss_weight = 0.01      # α: weight of the balance loss
  e.balance_loss = "batch"      # "batch": E·Σ f_i P_i over the whole batch; "sequence":
                                # the same per sequence (row), averaged (DeepSeek-V3);
                                # "none": no balance loss (still logged)
  e.bias_update_rate = 0.0      # γ: auxiliary-loss-free balancing (DeepSeek-V3), a
                                # per-expert bias on the routing scores (top-k choice
                                # only), b_i += γ·sign(mean load - load_i) after each
                                # step; 0 = off. Not exportable to HF.
  e.z_loss_weight = 0.0         # router z-loss

  c.nitp = n = ml_collections.ConfigDict()
  n.weight = 1.0                # λ; 0 = plain NTP
  n.variant = "nitp"            # or the paper's generic cosine regulariser
  n.target_layer = 1            # k: 0 = embedding output ... num_layers
  n.shift = 1                   # 1: t -> t+1 (paper), 0: same position
  n.loss = "cosine"
  n.stop_gradient = True
  n.projector = "swiglu"
  n.projector_mult = 4          # projector hidden = mult * d_model
  n.start_step = 0              # weight is 0 before this step
  n.hidden_source = "after_norm"

  c.data = d = ml_collections.ConfigDict()
  d.input = ""                  # files, dirs or globs, comma-separated (.txt .md
                                # .jsonl[.gz|.zst] .parquet); "" = embedded corpus
  d.prepared_dir = ""           # "" = <workdir>/data
  d.tokenizer = ""              # .model or tokenizer.json; "" = train one
  d.text_field = "text"         # jsonl field
  d.val_fraction = 0.02
  d.seed = 0                    # held-out split, tokenizer sample, data order
  d.shuffle_seed = -1           # data order only (documents and pieces);
                                # -1 = data.seed. compare --seeds varies it
  d.worker_count = 0            # grain worker processes; 0 = in-process
  d.shuffle_window = 1024       # pieces (seq_len-token chunks of documents)
                                # shuffled together, so one batch mixes many
                                # documents; 0 = keep document order
  d.prepare_workers = 2
  d.weights = ""                # mixture weights of data.input's comma-separated
                                # sources, e.g. "0.7,0.3" (sampled by weight);
                                # "" = every document once per epoch
  d.streaming = False           # tokenize on the fly, each process reading its
                                # own files; False = prepare shards once
  d.max_bad_fraction = 0.01     # malformed records skipped and counted; above
                                # this fraction of records the run stops

  c.init = ml_collections.ConfigDict()
  c.init.from_hf = ""           # HF Llama/Qwen2/Qwen2-MoE directory: the backbone
                                # starts from its weights (and the run uses its
                                # tokenizer); the projector starts fresh

  c.train = t = ml_collections.ConfigDict()
  t.steps = 200
  t.global_batch = 8            # sequences per step, all processes together
  t.seq_len = 256
  t.microbatches = 1            # gradient accumulation
  t.lr = 3e-3
  t.schedule = "wsd"
  t.warmup_steps = 20
  t.decay_fraction = 0.2
  t.final_lr_ratio = 0.0        # lr at the end of the decay, relative to peak
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.grad_clip = 1.0
  t.seed = 0
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 4
  t.eval_tasks = ""             # multiple-choice tasks scored at each eval:
                                # comma-separated JSONL files (lm-eval's
                                # context/choices/label) or "next_line" (built
                                # from the run's held-out documents)
  t.geometry_every = 20         # effective rank / mean cosine on a fixed
                                # held-out probe batch; 0 = off
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.peak_flops_per_device = 0.0  # for MFU; 0 = known chip's bf16 peak, or a
                                 # matmul measured at start-up on CPU
  t.max_skipped_in_a_row = 3    # non-finite steps skipped before the run stops

  c.mesh = s = ml_collections.ConfigDict()
  s.data = -1                   # sizes inside one slice; -1 fills the rest
  s.fsdp = 1
  s.tensor = 1
  s.expert = 1
  s.dcn_data = 1                # factors across slices (multi-slice TPU) or
  s.dcn_fsdp = 1                # nodes (GPU cluster): axis a has size
  s.dcn_tensor = 1              # a * dcn_a; product of dcn_* = slices
  s.dcn_expert = 1
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Load `configs/x.py` or `configs/x.py:variant` as `--config=` does."""
  path, _, variant = path.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist: pass a file from configs/")
  spec = importlib.util.spec_from_file_location("nitp_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def steps_for_tokens(tokens: float, global_batch: int, seq_len: int) -> int:
  """Optimizer steps that consume `tokens` training tokens."""
  return int(round(tokens / (global_batch * seq_len)))


def _fail(field: str, value, allowed: str) -> None:
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _positive(cfg, *fields: str) -> None:
  for f in fields:
    v = cfg[f]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
      _fail(f, v, "must be a positive number")


def _non_negative(cfg, *fields: str, note: str = "") -> None:
  for f in fields:
    v = cfg[f]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
      _fail(f, v, f"must be >= 0{note}")


def _seed(cfg, field: str) -> None:
  v = cfg[field]
  if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < MAX_SEED:
    _fail(field, v, "must be an integer in [0, 2**31)")


def leaves(node: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted field name, value) of every leaf of a ConfigDict."""
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _finite(cfg) -> None:
  """No NaN or infinity anywhere: every float field is a finite number."""
  for field, v in leaves(cfg):
    if isinstance(v, float) and not math.isfinite(v):
      _fail(field, v, "must be a finite number")


def _choice(cfg, field: str, choices) -> None:
  v = cfg[field]
  if v not in choices:
    _fail(field, v, f"must be one of {', '.join(map(str, choices))}")


def is_moe(cfg) -> bool:
  return cfg.model.moe.num_experts > 0


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raise ConfigError naming the first bad field; return cfg if all is well.

  The model, MoE and NITP fields are checked where they are typed
  (`model_config`, next to each field); the rest here.
  """
  # model_config imports this module (the allowed values).
  from nitp_jax import model_config  # pylint: disable=import-outside-toplevel
  _finite(cfg)
  model_config.from_config(cfg)
  m, t = cfg.model, cfg.train
  _positive(cfg, "train.steps", "train.global_batch", "train.seq_len",
            "train.microbatches", "train.lr", "train.log_every", "train.eval_every",
            "train.checkpoint_every", "train.keep_checkpoints", "train.grad_clip",
            "train.eps", "train.eval_batches", "data.prepare_workers")
  _seed(cfg, "train.seed")
  _seed(cfg, "data.seed")
  if m.attention_impl == "cudnn" and t.seq_len % 2:
    # cuDNN flash attention turns the document mask into a bias: even length.
    _fail("model.attention_impl", "cudnn", f"needs an even train.seq_len, not "
          f"{t.seq_len} (use 'xla')")
  _non_negative(cfg, "train.peak_flops_per_device",
                note=" (0 = detect the chip or measure the CPU)")
  _choice(cfg, "train.schedule", SCHEDULES)
  if t.seq_len > m.max_seq_len:
    _fail("train.seq_len", t.seq_len,
          f"must be <= model.max_seq_len={m.max_seq_len}")
  if t.global_batch % t.microbatches:
    _fail("train.microbatches", t.microbatches,
          f"must divide train.global_batch={t.global_batch}")
  _non_negative(cfg, "train.geometry_every", note=" (0 = off)")
  _non_negative(cfg, "train.max_skipped_in_a_row",
                note=" (0 = stop at the first non-finite step)")
  _non_negative(cfg, "train.warmup_steps", "train.weight_decay")
  if not 0 <= t.decay_fraction <= 1:
    _fail("train.decay_fraction", t.decay_fraction, "must be in [0, 1]")
  if not 0 <= t.final_lr_ratio <= 1:
    _fail("train.final_lr_ratio", t.final_lr_ratio, "must be in [0, 1]")
  if t.schedule == "wsd_exp" and t.final_lr_ratio <= 0:
    _fail("train.final_lr_ratio", t.final_lr_ratio,
          "must be > 0 with train.schedule='wsd_exp' (exponential decay "
          "cannot reach 0)")
  for beta in ("train.b1", "train.b2"):
    if not 0 <= cfg[beta] < 1:
      _fail(beta, cfg[beta], "must be in [0, 1)")
  if not 0 <= cfg.data.val_fraction < 1:
    _fail("data.val_fraction", cfg.data.val_fraction, "must be in [0, 1)")
  _non_negative(cfg, "data.worker_count", note=" (0 = read in this process)")
  if cfg.init.from_hf and not os.path.isdir(cfg.init.from_hf):
    _fail("init.from_hf", cfg.init.from_hf, "must be an existing HuggingFace model directory "
          "(config.json, model.safetensors, a tokenizer)")
  if cfg.data.shuffle_seed != -1:  # -1: data.seed
    _seed(cfg, "data.shuffle_seed")
  _non_negative(cfg, "data.shuffle_window", note=" (0 = no shuffle)")
  if not 0 <= cfg.data.max_bad_fraction <= 1:
    _fail("data.max_bad_fraction", cfg.data.max_bad_fraction, "must be in [0, 1]")
  data_weights(cfg)
  for axis in ("data", "fsdp", "tensor", "expert"):
    v = cfg.mesh[axis]
    if isinstance(v, bool) or not isinstance(v, int) or (v != -1 and v < 1):
      _fail(f"mesh.{axis}", v, "must be a positive size or -1 (fill)")
    dcn = cfg.mesh.get(f"dcn_{axis}", 1)
    if isinstance(dcn, bool) or not isinstance(dcn, int) or dcn < 1:
      _fail(f"mesh.dcn_{axis}", dcn, "must be a positive integer (1 = one slice)")
  if [cfg.mesh[a] for a in ("data", "fsdp", "tensor", "expert")].count(-1) > 1:
    _fail("mesh", {a: cfg.mesh[a] for a in ("data", "fsdp", "tensor", "expert")},
          "at most one axis may be -1 (fill)")
  return cfg


def check_trainable(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError unless cfg's MoE dispatch is causal. Training calls this;
  `validate` does not, so benchmarks and compile_check still build gather /
  capacity for comparison."""
  d = cfg.model.moe.dispatch
  if is_moe(cfg) and d not in CAUSAL_DISPATCHES:
    _fail("model.moe.dispatch", d, "cannot train: it drops token copies by capacity over "
          "the whole sequence, so later tokens change earlier tokens' outputs (and packed "
          "documents each other's); use 'dropless'")


def paper_recipe(c: ml_collections.ConfigDict, *, lr: float, global_batch: int,
                 tokens: float, target_layer: int, weight: float,
                 schedule: str = "wsd") -> ml_collections.ConfigDict:
  """The shared recipe of the paper's App. B / Table 4 (AdamW (0.9, 0.95),
  wd 0.1, clip 1.0, WSD with 2,000 warmup steps and a 20% decay, context
  8,192, Qwen2 vocabulary 152,064, bf16 compute)."""
  m, t = c.model, c.train
  m.vocab_size = 152_064
  m.max_seq_len = 8192
  m.rope_theta = 1_000_000.0
  m.compute_dtype = "bfloat16"
  m.remat_policy = "full"
  m.attention_impl = "auto"     # cuDNN flash attention on GPU, XLA elsewhere
  m.ce_chunk = 1024             # never hold [B, 8192, 152064] float32 logits
  t.seq_len = 8192
  t.global_batch = global_batch
  t.steps = steps_for_tokens(tokens, global_batch, t.seq_len)
  t.lr = lr
  t.schedule = schedule
  t.final_lr_ratio = 0.01 if schedule == "wsd_exp" else 0.0
  t.warmup_steps = 2000
  t.decay_fraction = 0.2
  t.b1, t.b2, t.weight_decay, t.grad_clip = 0.9, 0.95, 0.1, 1.0
  t.log_every, t.eval_every, t.checkpoint_every = 10, 1000, 1000
  t.geometry_every = 1000
  c.nitp.target_layer = target_layer
  c.nitp.weight = weight
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c


def paper_dense(*, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int,
                head_dim: int, ffn_dim: int, **recipe) -> ml_collections.ConfigDict:
  """A Qwen2-family dense model (QKV bias, tied embeddings) with the recipe."""
  c = base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = d_model, num_layers, num_heads, num_kv_heads
  m.head_dim, m.ffn_dim = head_dim, ffn_dim
  m.qkv_bias, m.tie_embeddings = True, True
  return paper_recipe(c, **recipe)


def paper_moe(*, d_model: int, num_moe_layers: int, num_heads: int, num_kv_heads: int,
              head_dim: int, ffn_dim: int, expert_ffn: int, top_k: int,
              num_experts: int = 144, **recipe) -> ml_collections.ConfigDict:
  """DeepSeek-V2-style MoE (one dense block first, routed + 1 shared expert,
  GQA, untied embeddings) with the recipe."""
  c = base_config()
  m, e = c.model, c.model.moe
  m.d_model, m.num_heads, m.num_kv_heads, m.head_dim = d_model, num_heads, num_kv_heads, head_dim
  m.num_layers, m.ffn_dim = 1 + num_moe_layers, ffn_dim
  m.qkv_bias, m.tie_embeddings = False, False
  e.num_experts, e.num_dense_layers, e.num_shared_experts, e.top_k = num_experts, 1, 1, top_k
  e.expert_ffn = e.shared_expert_ffn = expert_ffn
  e.aux_loss_weight = 0.001
  return paper_recipe(c, **recipe)


def data_sources(cfg: ml_collections.ConfigDict) -> list[str]:
  """data.input's comma-separated sources ([] = the embedded corpus)."""
  return [s.strip() for s in cfg.data.input.split(",") if s.strip()]


def data_weights(cfg: ml_collections.ConfigDict) -> list[float] | None:
  """data.weights as one float per source, normalised to sum 1; None when
  unset. ConfigError unless there is one positive number per source."""
  text = cfg.data.weights.strip()
  if not text:
    return None
  sources = data_sources(cfg)
  try:
    weights = [float(w) for w in text.split(",")]
  except ValueError:
    weights = []
  if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
    _fail("data.weights", cfg.data.weights, "must be positive numbers separated by commas, "
          "one per data.input source (e.g. '0.7,0.3')")
  if len(weights) != len(sources):
    _fail("data.weights", cfg.data.weights, f"has {len(weights)} weight(s) but data.input "
          f"has {len(sources)} comma-separated source(s): give one weight per source")
  total = sum(weights)
  return [w / total for w in weights]


def order_seed(cfg: ml_collections.ConfigDict) -> int:
  """The seed of the training data order: data.shuffle_seed, else data.seed."""
  return cfg.data.seed if cfg.data.shuffle_seed < 0 else cfg.data.shuffle_seed
