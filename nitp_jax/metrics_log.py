"""Where metrics go: a console line, `metrics.jsonl` and TensorBoard, written
by process 0 only; plus throughput and ETA bookkeeping."""

from __future__ import annotations

import json
import os
import time

from absl import logging

from nitp_jax.tensorboard import SummaryWriter


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(step: int, total: int, m: dict[str, float]) -> str:
  parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"ntp {m['ntp']:.4f}"]
  if "nitp" in m:
    parts.append(f"nitp {m['nitp']:.4f}")
  if "cosine_reg" in m:
    parts.append(f"cos_reg {m['cosine_reg']:.4f}")
  parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}"]
  if "tokens_per_s" in m:
    parts += [f"{m['tokens_per_s']:,.0f} tok/s", f"ETA {format_duration(m['eta_s'])}"]
  return " | ".join(parts)


class MetricsLog:
  """Appends to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      self._jsonl = open(self.path, "a", encoding="utf-8")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": step, "kind": kind, "time": time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    self._tb.scalars(step, {f"{kind}/{k}": float(v) for k, v in metrics.items()})

  def info(self, message: str) -> None:
    """A console line (stdout, timestamped), also kept in the absl log."""
    if self.enabled:
      print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)
      logging.info(message)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Throughput:
  """Tokens/s and ETA over the steps since the last report (the first,
  compiling step is excluded)."""

  def __init__(self, tokens_per_step: int, total_steps: int):
    self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
    self._last_time, self._last_step = None, None

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    out = {}
    if self._last_time is not None and step > self._last_step:
      seconds_per_step = (now - self._last_time) / (step - self._last_step)
      out = {"tokens_per_s": self.tokens_per_step / seconds_per_step,
             "step_s": seconds_per_step,
             "eta_s": seconds_per_step * (self.total_steps - step)}
    self._last_time, self._last_step = now, step
    return out
