"""Parameter and training-FLOP accounting (paper App. G: train ≈ 6 × params)
and model FLOPs utilisation (MFU) against the chip's peak.

`count_params` reads the real model's shapes (through `jax.eval_shape`, so
nothing is allocated); the FLOP functions are pure arithmetic on the config.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections

from nitp_jax import model as model_lib


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _routed_expert_params(backbone: dict) -> int:
  """Parameters of the routed experts (gate/up/down under every `moe`)."""
  total = 0
  for name, seg in backbone.items():
    if isinstance(seg, dict) and "moe" in seg:
      total += sum(_size(seg["moe"][w]) for w in ("gate", "up", "down"))
  return total


def count_params(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Total and active (per-token) backbone parameters, embeddings included,
  and the projector's (training only). Counted from the model's shapes."""
  shapes, _ = model_lib.abstract_params(cfg)
  backbone = shapes["backbone"]
  total = _size(backbone)
  routed = _routed_expert_params(backbone)
  e = cfg.model.moe
  active = total - routed + (routed * e.top_k // e.num_experts if e.num_experts else 0)
  embed = _size(backbone["embed"]) + _size(backbone.get("unembed", {}))
  return {"total": total, "active": active, "embedding": embed,
          "routed_experts": routed, "projector": _size(shapes.get("projector", {}))}


def paper_ntp_flops_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Eq. 28 as the paper instantiates it: L·(18d² + 18·k·d·d_e) + 6Vd, with
  k = routed top-k + shared experts, every layer counted as MoE (dense
  models: k·d_e = FFN width)."""
  m, e = cfg.model, cfg.model.moe
  d = m.d_model
  if e.num_experts:
    k_de = (e.top_k + e.num_shared_experts) * e.expert_ffn
  else:
    k_de = m.ffn_dim
  return m.num_layers * (18 * d * d + 18 * k_de * d) + 6 * m.vocab_size * d


def nitp_extra_flops_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Eqs. 29–30: projector 6 × 3·mult·d² plus the cosine loss 18d."""
  n, d = cfg.nitp, cfg.model.d_model
  if n.weight <= 0:
    return 0.0
  projector = 6 * 3 * n.projector_mult * d * d if model_lib.uses_projector(cfg) else 0
  return projector + 18 * d


def matmul_flops_per_token(cfg: ml_collections.ConfigDict) -> dict[str, float]:
  """Training FLOPs per token from the exact layer shapes (6 × active matmul
  params, input embedding excluded), and causal attention scores apart."""
  m, e = cfg.model, cfg.model.moe
  d, hd, nq, nkv = m.d_model, m.head_dim, m.num_heads, m.num_kv_heads
  attn = d * hd * (2 * nq + 2 * nkv)
  dense_ffn = 3 * d * m.ffn_dim
  num_dense = m.num_layers if not e.num_experts else e.num_dense_layers
  num_moe = m.num_layers - num_dense
  moe_ffn = (3 * d * (e.top_k * e.expert_ffn + e.num_shared_experts * e.shared_expert_ffn)
             + d * e.num_experts) if e.num_experts else 0
  layers = m.num_layers * attn + num_dense * dense_ffn + num_moe * moe_ffn
  # QK^T and AV: 4·T·nq·hd per token forward at full length; causal halves it.
  scores = 3 * 4 * cfg.train.seq_len * nq * hd * m.num_layers / 2
  return {"layers": 6.0 * layers, "unembed": 6.0 * m.vocab_size * d,
          "attention_scores": float(scores)}


def training_flops_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Model FLOPs per trained token (for MFU): matmuls, scores and NITP."""
  f = matmul_flops_per_token(cfg)
  return f["layers"] + f["unembed"] + f["attention_scores"] + nitp_extra_flops_per_token(cfg)


def report(cfg: ml_collections.ConfigDict) -> dict:
  """Everything `python -m nitp_jax.params` prints."""
  params = count_params(cfg)
  shapes = matmul_flops_per_token(cfg)
  ntp_exact = shapes["layers"] + shapes["unembed"]
  paper = paper_ntp_flops_per_token(cfg)
  extra = nitp_extra_flops_per_token(cfg)
  return {
      "params": params,
      "params_billions": {"total": params["total"] / 1e9, "active": params["active"] / 1e9},
      "flops_per_token": {
          "paper_app_g": {"ntp": paper, "nitp_extra": extra,
                          "nitp_overhead": extra / paper},
          "from_shapes": {"ntp": ntp_exact, "nitp_extra": extra,
                          "nitp_overhead": extra / ntp_exact,
                          "attention_scores": shapes["attention_scores"]},
      },
  }


# Dense (not 2:4 sparse) bf16 peak FLOP/s per chip, from the vendors' sheets.
TPU_PEAK_FLOPS = {  # jax device_kind, exactly (lower case)
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5": 459e12, "tpu v5p": 459e12,
    "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}
GPU_PEAK_FLOPS = (  # (substring of device_kind, peak); the first match wins
    ("h100 pcie", 756e12), ("h100 nvl", 835e12), ("h200 nvl", 835e12),
    ("h100", 989e12), ("h200", 989e12), ("a100", 312e12),
)


def peak_flops_for_kind(device_kind: str) -> float | None:
  """bf16 peak of a known chip, e.g. 'NVIDIA H200' or 'TPU v5 lite'; else None."""
  kind = device_kind.strip().lower()
  if kind in TPU_PEAK_FLOPS:
    return TPU_PEAK_FLOPS[kind]
  return next((peak for pattern, peak in GPU_PEAK_FLOPS if pattern in kind), None)


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 1024, dtype: str = "float32", reps: int = 10) -> float:
  """FLOP/s of a jitted n×n matmul on the default device (best of `reps`);
  measured once per process. On CPU this is the whole host's peak."""
  a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(reps):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops_per_device(override: float = 0.0) -> float:
  """`override` if > 0; else the chip's table peak; else a measured matmul
  (float32 on CPU, split over the CPU devices that share the cores)."""
  if override > 0:
    return float(override)
  device = jax.devices()[0]
  known = peak_flops_for_kind(device.device_kind)
  if known:
    return known
  if device.platform == "cpu":
    return measured_matmul_peak() / jax.local_device_count()
  return measured_matmul_peak(4096, "bfloat16")


def model_flops_rate(flops_per_token: float, tokens_per_s: float) -> float:
  """Model FLOP/s of the whole job."""
  return flops_per_token * tokens_per_s


def mfu(flops_per_token: float, tokens_per_s: float, peak_per_device: float,
        num_devices: int = 1) -> float:
  """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
  return model_flops_rate(flops_per_token, tokens_per_s) / (peak_per_device * num_devices)
