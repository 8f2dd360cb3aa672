"""Typed, frozen model and NITP settings, built once from the ConfigDict.

`ml_collections` stays the format of config files and `--config.x=y`
overrides; `from_config(cfg)` is the one place that reads `cfg.model` and
`cfg.nitp` for the modules, which take these dataclasses instead of loose
hyperparameters. Each field's checks live next to it (`__post_init__`) and
raise `ConfigError` naming the ConfigDict field (`config.model.x=value is
invalid: ...`), so `config.validate` reports them as before. Dataclasses are
frozen and hold only scalars (and each other), so they are hashable Linen module attributes.
Field defaults (those of `config.base_config` where they make a valid object)
serve configs built by hand in tests and benchmarks; `from_config` sets all.

  model, nitp = from_config(cfg)
  model.attention.num_heads, model.moe.top_k (moe is None when dense),
  model.compute_jnp_dtype, nitp.target_layer, nitp.uses_projector
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import ml_collections

from nitp_jax import layers
from nitp_jax.config import (ATTENTION_IMPLS, BALANCE_LOSSES, DISPATCHES, HIDDEN_SOURCES,
                             NITP_LOSSES, NITP_VARIANTS, PROJECTORS)
from nitp_jax.errors import ConfigError


def _fail(field: str, value, allowed: str) -> None:
  raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(fields: dict[str, object]) -> None:
  """{config field name: value}: each must be a finite positive number."""
  for name, v in fields.items():
    if not _number(v) or v <= 0:
      _fail(name, v, "must be a positive number")


def _non_negative(fields: dict[str, object], note: str = "") -> None:
  """{config field name: value}: each must be a finite number >= 0."""
  for name, v in fields.items():
    if not _number(v) or v < 0:
      _fail(name, v, f"must be >= 0{note}")


def _choice(field: str, value, choices) -> None:
  if value not in choices:
    _fail(field, value, f"must be one of {', '.join(map(str, choices))}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Grouped-query attention with RoPE; `impl` is the kernel (xla|cudnn|auto)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  rope_theta: float = 10_000.0
  impl: str = "xla"

  def __post_init__(self):
    _positive({"model.num_heads": self.num_heads, "model.num_kv_heads": self.num_kv_heads,
               "model.head_dim": self.head_dim, "model.rope_theta": self.rope_theta})
    if self.num_heads % self.num_kv_heads:
      _fail("model.num_kv_heads", self.num_kv_heads,
            f"must divide model.num_heads={self.num_heads} (grouped-query attention)")
    if self.head_dim % 2:
      _fail("model.head_dim", self.head_dim, "must be even (RoPE rotates pairs)")
    _choice("model.attention_impl", self.impl, ATTENTION_IMPLS)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Routed SwiGLU experts (softmax top-k), shared experts, dispatch and the
  router's auxiliary-loss weights; the first `num_dense_layers` blocks of the
  stack stay dense."""
  num_experts: int
  top_k: int
  expert_ffn: int
  num_shared_experts: int = 0
  shared_expert_ffn: int = 0
  renormalize: bool = False     # renormalise the top-k softmax weights to 1
  routed_scaling: float = 1.0
  dispatch: str = "dropless"
  capacity_factor: float = 1.25
  num_dense_layers: int = 1     # checked against the depth by ModelConfig
  aux_loss_weight: float = 0.01  # α of the balance loss
  z_loss_weight: float = 0.0
  balance_loss: str = "batch"   # "batch" | "sequence" (DeepSeek-V3) | "none"
  bias_update_rate: float = 0.0  # γ of auxiliary-loss-free balancing; 0 = off

  def __post_init__(self):
    _non_negative({"model.moe.num_experts": self.num_experts}, " (0 = dense)")
    _positive({"model.moe.top_k": self.top_k, "model.moe.expert_ffn": self.expert_ffn,
               "model.moe.capacity_factor": self.capacity_factor,
               "model.moe.routed_scaling": self.routed_scaling})
    if self.top_k > self.num_experts:
      _fail("model.moe.top_k", self.top_k,
            f"must be <= model.moe.num_experts={self.num_experts}")
    _non_negative({"model.moe.num_shared_experts": self.num_shared_experts,
                   "model.moe.shared_expert_ffn": self.shared_expert_ffn,
                   "model.moe.aux_loss_weight": self.aux_loss_weight,
                   "model.moe.z_loss_weight": self.z_loss_weight})
    _non_negative({"model.moe.bias_update_rate": self.bias_update_rate},
                  " (0 = no auxiliary-loss-free bias)")
    if self.num_shared_experts:
      _positive({"model.moe.shared_expert_ffn": self.shared_expert_ffn})
    _choice("model.moe.dispatch", self.dispatch, DISPATCHES)
    _choice("model.moe.balance_loss", self.balance_loss, BALANCE_LOSSES)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The decoder: sizes, attention, MoE (None = dense), numerics and layout.

  `init_std` and the dtypes are shared by every layer (passed to attention,
  experts and FFNs as module attributes); dtypes are names, resolved by
  `compute_jnp_dtype` / `param_jnp_dtype`.
  """
  vocab_size: int
  d_model: int
  num_layers: int               # total blocks, dense + MoE
  ffn_dim: int                  # dense SwiGLU hidden size
  attention: AttentionConfig
  moe: MoEConfig | None = None
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  max_seq_len: int = 256
  scan_layers: bool = True
  remat_policy: str = "none"
  ce_chunk: int = 0             # cross-entropy positions at a time; 0 = full logits
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  init_std: float = 0.02

  def __post_init__(self):
    _positive({"model.vocab_size": self.vocab_size, "model.d_model": self.d_model,
               "model.num_layers": self.num_layers, "model.ffn_dim": self.ffn_dim,
               "model.norm_eps": self.norm_eps, "model.max_seq_len": self.max_seq_len,
               "model.init_std": self.init_std})
    if self.attention.impl == "cudnn":
      self._check_cudnn()
    if isinstance(self.ce_chunk, bool) or not isinstance(self.ce_chunk, int) or self.ce_chunk < 0:
      _fail("model.ce_chunk", self.ce_chunk, "must be an int >= 0 (0 = full logits)")
    _choice("model.remat_policy", self.remat_policy, layers.REMAT_POLICIES)
    _choice("model.compute_dtype", self.compute_dtype, layers.DTYPES)
    _choice("model.param_dtype", self.param_dtype, layers.DTYPES)
    if self.moe is not None and not 0 <= self.moe.num_dense_layers < self.num_layers:
      _fail("model.moe.num_dense_layers", self.moe.num_dense_layers,
            f"must be in [0, model.num_layers={self.num_layers}) so at least "
            "one MoE block remains")

  def _check_cudnn(self) -> None:
    """cuDNN flash attention (jax 0.10): bf16/fp16 only, head_dim a multiple
    of 8 up to 256 (128 before Hopper). Its even-length need is a train.seq_len
    check, in config.validate."""
    if self.compute_dtype not in ("bfloat16", "float16"):
      _fail("model.attention_impl", "cudnn", f"needs model.compute_dtype bfloat16 or "
            f"float16, not {self.compute_dtype!r} (use 'xla' or 'auto')")
    h = self.attention.head_dim
    if h % 8 or h > 256:
      _fail("model.attention_impl", "cudnn", f"needs model.head_dim a multiple of 8 "
            f"and <= 256, not {h} (use 'xla')")

  @property
  def compute_jnp_dtype(self) -> jnp.dtype:
    return layers.dtype(self.compute_dtype)

  @property
  def param_jnp_dtype(self) -> jnp.dtype:
    return layers.dtype(self.param_dtype)

  @property
  def num_dense_layers(self) -> int:
    """Dense blocks at the bottom of the stack (all of them without MoE)."""
    return self.num_layers if self.moe is None else self.moe.num_dense_layers

  @classmethod
  def from_config(cls, m: ml_collections.ConfigDict) -> ModelConfig:
    """From `cfg.model`; ConfigError on the first bad field."""
    attention = AttentionConfig(
        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
        qkv_bias=m.qkv_bias, rope_theta=m.rope_theta, impl=m.attention_impl)
    e, moe = m.moe, None
    if e.num_experts != 0:  # 0 = dense; a negative count fails in MoEConfig
      moe = MoEConfig(
          num_experts=e.num_experts, top_k=e.top_k, expert_ffn=e.expert_ffn,
          num_shared_experts=e.num_shared_experts, shared_expert_ffn=e.shared_expert_ffn,
          renormalize=e.renormalize, routed_scaling=e.routed_scaling, dispatch=e.dispatch,
          capacity_factor=e.capacity_factor, num_dense_layers=e.num_dense_layers,
          aux_loss_weight=e.aux_loss_weight, z_loss_weight=e.z_loss_weight,
          balance_loss=e.balance_loss, bias_update_rate=e.bias_update_rate)
    return cls(vocab_size=m.vocab_size, d_model=m.d_model, num_layers=m.num_layers,
               ffn_dim=m.ffn_dim, attention=attention, moe=moe,
               tie_embeddings=m.tie_embeddings, norm_eps=m.norm_eps,
               max_seq_len=m.max_seq_len, scan_layers=m.scan_layers,
               remat_policy=m.remat_policy, ce_chunk=m.ce_chunk,
               compute_dtype=m.compute_dtype, param_dtype=m.param_dtype,
               init_std=m.init_std)


@dataclasses.dataclass(frozen=True)
class NITPConfig:
  """Next Implicit Token Prediction: align P(h_L[t]) with h_k[t + shift].

  `target_layer` (k) is checked against the model's depth by the module's
  `check_target_layer`, since the bound is a model field.
  """
  weight: float = 1.0           # λ; 0 = plain NTP
  variant: str = "nitp"         # or the generic cosine regulariser
  target_layer: int = 1         # k: 0 = embedding output ... num_layers
  shift: int = 1                # 1: t -> t+1 (paper), 0: same position
  loss: str = "cosine"
  stop_gradient: bool = True
  projector: str = "swiglu"
  projector_mult: int = 4       # projector hidden = mult * d_model
  start_step: int = 0           # weight is 0 before this step
  hidden_source: str = "after_norm"

  def __post_init__(self):
    if self.shift not in (0, 1):
      _fail("nitp.shift", self.shift,
            "must be 1 (t -> t+1, the paper) or 0 (same position)")
    _choice("nitp.loss", self.loss, NITP_LOSSES)
    _choice("nitp.variant", self.variant, NITP_VARIANTS)
    _choice("nitp.projector", self.projector, PROJECTORS)
    _choice("nitp.hidden_source", self.hidden_source, HIDDEN_SOURCES)
    _non_negative({"nitp.weight": self.weight}, " (0 = plain next-token prediction)")
    _non_negative({"nitp.start_step": self.start_step})
    _positive({"nitp.projector_mult": self.projector_mult})

  @property
  def uses_projector(self) -> bool:
    return self.weight > 0 and self.variant == "nitp" and self.projector == "swiglu"

  @property
  def last_after_norm(self) -> bool:
    """Whether h_L is taken after the final norm (else before it)."""
    return self.hidden_source == "after_norm"

  @classmethod
  def from_config(cls, n: ml_collections.ConfigDict) -> NITPConfig:
    """From `cfg.nitp` (target layer unchecked: see `from_config`)."""
    return cls(weight=n.weight, variant=n.variant, target_layer=n.target_layer,
               shift=n.shift, loss=n.loss, stop_gradient=n.stop_gradient,
               projector=n.projector, projector_mult=n.projector_mult,
               start_step=n.start_step, hidden_source=n.hidden_source)


def check_target_layer(target_layer: int, num_layers: int) -> None:
  """NITP's k must name a residual stream of the model: 0 ... num_layers."""
  if not 0 <= target_layer <= num_layers:
    _fail("nitp.target_layer", target_layer,
          f"must be in [0, model.num_layers={num_layers}] (0 = embedding output)")


def from_config(cfg: ml_collections.ConfigDict) -> tuple[ModelConfig, NITPConfig]:
  """(model, nitp) settings of a full config; ConfigError on the first bad
  field of `cfg.model`, `cfg.model.moe` or `cfg.nitp`."""
  model = ModelConfig.from_config(cfg.model)
  check_target_layer(cfg.nitp.target_layer, model.num_layers)
  return model, NITPConfig.from_config(cfg.nitp)
