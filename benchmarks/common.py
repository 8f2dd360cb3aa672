"""Shared pieces of the benchmarks: presets, synthetic batches, a jitted
single-device train step, and alternating timing with medians.

Timing rules (machines are noisy): variants are measured in one process,
alternating round by round, and reported as medians of per-round values.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from nitp_jax import config as config_lib  # noqa: E402
from nitp_jax import jitted  # noqa: E402


def _small(d: int, layers: int, heads: int, kv: int, ffn: int, vocab: int,
           seq: int = 256, batch: int = 8) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  m = c.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = d, layers, heads, kv
  m.head_dim, m.ffn_dim, m.vocab_size = d // heads, ffn, vocab
  m.max_seq_len = c.train.seq_len = seq
  c.train.global_batch = batch
  c.nitp.target_layer = max(1, round(0.2 * layers))
  return c


def _moe_small() -> ml_collections.ConfigDict:
  """Fine-grained MoE scaled down from the paper's: 1 dense + 3 MoE blocks,
  64 experts top-8 + 1 shared, expert FFN d/2."""
  c = _small(256, 4, 4, 2, 1024, 8192)
  e = c.model.moe
  e.num_experts, e.top_k, e.num_dense_layers, e.num_shared_experts = 64, 8, 1, 1
  e.expert_ffn = e.shared_expert_ffn = 128
  return c


PRESETS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    # d=256, L=8, V=32k: NITP adds 72·d² of ~1,540·d² per token (≈4.7%).
    "overhead": lambda: _small(256, 8, 4, 2, 1024, 32768, batch=4),
    "dense_small": lambda: _small(512, 4, 8, 4, 2048, 8192),
    "moe_small": _moe_small,
}


def load_preset(name: str) -> ml_collections.ConfigDict:
  """A preset above, or `configs/<name>.py[:variant]` (e.g. tiny, dense_3b)."""
  if name in PRESETS:
    return PRESETS[name]()
  base, sep, variant = name.partition(":")
  return config_lib.load_config_file(os.path.join(ROOT, "configs", base + ".py") + sep + variant)


def apply_overrides(c: ml_collections.ConfigDict, *, dtype: str = "", seq_len: int = 0,
                    batch: int = 0, layers: int = 0, remat: str = "", ce_chunk: int = -1,
                    attention: str = "", dispatch: str = "") -> ml_collections.ConfigDict:
  """Benchmark knobs on top of a preset (0 / '' / -1 = keep the preset's)."""
  m, t = c.model, c.train
  if dtype:
    m.compute_dtype = dtype
  if seq_len:
    t.seq_len = m.max_seq_len = seq_len
  if batch:
    t.global_batch = batch
  if layers:
    m.num_layers = layers
    c.nitp.target_layer = min(c.nitp.target_layer, layers)
  if remat:
    m.remat_policy = remat
  if ce_chunk >= 0:
    m.ce_chunk = ce_chunk
  if attention:
    m.attention_impl = attention
  if dispatch:
    m.moe.dispatch = dispatch
  t.microbatches = 1
  return config_lib.validate(c)


def synthetic_batch(cfg: ml_collections.ConfigDict, seed: int = 0, docs: int = 2) -> dict:
  """Random tokens; each row packs `docs` documents of equal length."""
  b, t = cfg.train.global_batch, cfg.train.seq_len
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, cfg.model.vocab_size, size=(b, t), dtype=np.int32)
  doc_len = -(-t // docs)
  pos = np.arange(t, dtype=np.int32)
  seg = np.broadcast_to(1 + pos // doc_len, (b, t)).astype(np.int32)
  positions = np.broadcast_to(pos % doc_len, (b, t)).astype(np.int32)
  return {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(seg),
          "positions": jnp.asarray(positions)}


def train_steps(cfg: ml_collections.ConfigDict) -> jitted.Steps:
  """The training's own jitted steps, on the config's mesh of this machine."""
  return jitted.build(cfg, jitted.mesh_for_config(cfg))


def train_step_and_state(cfg: ml_collections.ConfigDict, seed: int = 0):
  """(jitted train step donating its state, initial state)."""
  steps = train_steps(cfg)
  return steps.train, steps.init(jax.random.key(seed))


def lowered_train_step(cfg: ml_collections.ConfigDict):
  """The train step lowered for abstract inputs (nothing allocated)."""
  steps = train_steps(cfg)
  return steps.train.lower(steps.abstract_state, steps.abstract_batch())


class Stepper:
  """Holds a train step's state so it can be timed in alternating rounds."""

  def __init__(self, cfg: ml_collections.ConfigDict, batch: dict | None = None):
    self.step, self.state = train_step_and_state(cfg)
    self.batch = synthetic_batch(cfg) if batch is None else batch
    start = time.perf_counter()
    self.run(1)
    self.compile_s = time.perf_counter() - start

  def run(self, n: int) -> None:
    """n steps; the device is drained at the end."""
    for _ in range(n):
      self.state, metrics = self.step(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))


def primary_clock() -> str:
  """'cpu' (process CPU seconds: robust to other tenants of a shared CPU,
  since XLA:CPU computes in this process's threads) on the CPU backend,
  'wall' on accelerators."""
  return "cpu" if jax.default_backend() == "cpu" else "wall"


def alternate(fns: dict[str, Callable[[], object]], rounds: int
              ) -> dict[str, dict[str, list[float]]]:
  """Call every fn once per round, in turn (order flipped every round);
  {"wall": {name: seconds per round}, "cpu": {...}} (process CPU time)."""
  out = {"wall": {k: [] for k in fns}, "cpu": {k: [] for k in fns}}
  names = list(fns)
  for r in range(rounds):
    for k in (names if r % 2 == 0 else names[::-1]):
      wall, cpu = time.perf_counter(), time.process_time()
      fns[k]()
      out["wall"][k].append(time.perf_counter() - wall)
      out["cpu"][k].append(time.process_time() - cpu)
  return out


def median(xs: list[float]) -> float:
  return statistics.median(xs)


def paired_ratio(a: list[float], b: list[float]) -> float:
  """Median over rounds of a[i] / b[i]."""
  return statistics.median(x / y for x, y in zip(a, b))


def paired_ratio_quartiles(a: list[float], b: list[float]) -> tuple[float, float]:
  """First and third quartiles over rounds of a[i] / b[i]: the noise."""
  q1, _, q3 = statistics.quantiles([x / y for x, y in zip(a, b)], n=4)
  return q1, q3


def device_info() -> dict:
  d = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": d.device_kind,
          "devices": jax.device_count(), "cpu_count": os.cpu_count(),
          "jax": jax.__version__}


def rnd(x: float, digits: int = 4) -> float:
  return float(f"{x:.{digits}g}")
