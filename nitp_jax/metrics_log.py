"""Where metrics go: a console line, `metrics.jsonl` and TensorBoard, written
by process 0 only; plus throughput and ETA bookkeeping.

A remote (gs://) workdir cannot be appended to: both files are written to a
local staging directory and uploaded whole (`MetricsLog.sync`): at most every
UPLOAD_EVERY_S seconds, after every eval / probe record, at every checkpoint
save and at close. A killed run loses only records after its last checkpoint,
which its rerun writes again."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from typing import Callable

import jax
from absl import logging

from nitp_jax import flops
from nitp_jax import storage

_event_files = itertools.count()
UPLOAD_EVERY_S = 30.0


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
  if "moe_load_max_over_mean" in m:  # worst MoE layer; per layer in metrics.jsonl
    parts.append(f"load max/mean {m['moe_load_max_over_mean']:.2f}")
  if m.get("dropped_fraction", 0.0) > 0:
    parts.append(f"dropped {100 * m['dropped_fraction']:.1f}%")
  parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}"]
  if "tokens_per_s" in m:
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if "mfu" in m:
      parts += [f"{m['model_tflops']:.3g} TFLOP/s/dev", f"MFU {100 * m['mfu']:.1f}%"]
    parts.append(f"ETA {format_duration(m['eta_s'])}")
  return " | ".join(parts)


def _step_of(line: str) -> float:
  """The record's step; a line cut short by a kill counts as past any step."""
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError):
    return float("inf")


class MetricsLog:
  """Appends to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`.

  The TensorBoard writer (a new event file per run) opens at the first
  `truncate_after` or `write`: a resumed run's file starts with a SessionLog
  START at the first step it runs again, so TensorBoard drops the points of
  those steps written before."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = storage.join(workdir, "metrics.jsonl")
    self._tb_dir = storage.join(workdir, "tensorboard")
    self._tb = None
    self._staging = None  # remote workdir: local copies, uploaded by sync()
    if enabled and storage.is_remote(workdir):
      self._staging = tempfile.mkdtemp(prefix="nitp_metrics_")
      self._uploaded: dict[str, int] = {}  # staged file -> size at its last upload
      self._not_uploaded: list[str] = []     # staged files whose last upload failed
      self._last_sync = time.monotonic()
      local = os.path.join(self._staging, "metrics.jsonl")
      if storage.exists(self.path):  # a resumed run continues the file
        storage.download(self.path, local)
      self._remote_workdir, self._remote_path, self.path = workdir, self.path, local
      self._remote_tb_dir, self._tb_dir = self._tb_dir, os.path.join(self._staging, "tensorboard")
    if enabled:
      self._jsonl = open(self.path, "a", encoding="utf-8")

  def _open_tensorboard(self, purge_step: int | None = None) -> None:
    # tensorboardX imports torch when it is installed: only when writing.
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    if self._tb is not None:
      self._tb.close()
    # Names carry the pid and a counter: tensorboardX names files by the
    # second and host only, and truncates a file of the same name. Its writer
    # thread flushes every flush_secs, `write` flushes too: a killed run
    # loses at most its last second of points.
    self._tb = SummaryWriter(self._tb_dir, purge_step=purge_step, flush_secs=1,
                             filename_suffix=f".{os.getpid()}.{next(_event_files)}")

  def write(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": step, "kind": kind, "time": time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is None:
      self._open_tensorboard()
    for k, v in metrics.items():
      self._tb.add_scalar(f"{kind}/{k}", float(v), step, walltime=record["time"])
    self._tb.flush()
    if self._staging and (kind != "train"
                          or time.monotonic() - self._last_sync >= UPLOAD_EVERY_S):
      self.sync()

  def sync(self) -> None:
    """Upload what changed since the last upload (remote workdirs only)."""
    if not self.enabled or self._staging is None:
      return
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
    staged = [(self.path, self._remote_path)]
    if os.path.isdir(self._tb_dir):
      staged += [(os.path.join(self._tb_dir, n), storage.join(self._remote_tb_dir, n))
                 for n in sorted(os.listdir(self._tb_dir))]
    self._last_sync, self._not_uploaded = time.monotonic(), []
    for local, remote in staged:
      size = os.path.getsize(local)
      if self._uploaded.get(local) != size:
        try:
          storage.upload(local, remote)
        except Exception as e:  # pylint: disable=broad-except  # retried at the next sync
          logging.warning("could not upload %s to %s (%s: %s); the next upload retries it",
                          local, remote, type(e).__name__, str(e)[:200])
          self._not_uploaded.append(local)
          continue
        self._uploaded[local] = size

  def truncate_after(self, step: int) -> None:
    """Drop records past `step`: after a resume, the steps that were run but
    not checkpointed are run (and logged) again, once."""
    if not self.enabled:
      return
    self._open_tensorboard(purge_step=step + 1)
    self._jsonl.close()
    with open(self.path, encoding="utf-8") as f:
      kept = [line for line in f if _step_of(line) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(tmp, self.path)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    self.sync()  # sizes only grow between syncs: the size is the version uploaded

  def info(self, message: str) -> None:
    """A console line (stdout, timestamped), also kept in the absl log."""
    if self.enabled:
      print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)
      logging.info(message)

  def close(self) -> None:
    if self.enabled:
      if self._tb is not None:
        self._tb.close()
        self._tb = None
      self.sync()
      self._jsonl.close()
      if self._staging and not self._not_uploaded:
        shutil.rmtree(self._staging, ignore_errors=True)
      elif self._staging:
        logging.warning("metrics that could not be uploaded to %s are kept in %s",
                        self._remote_workdir, self._staging)


class Throughput:
  """Tokens/s, ETA and (given the model's FLOPs per token and the devices'
  peak) model TFLOP/s per device and MFU, over the steps since the last
  report (the first, compiling step is excluded) or the last `restart`."""

  def __init__(self, tokens_per_step: int, total_steps: int, flops_per_token: float = 0.0,
               peak_flops_per_device: float = 0.0, num_devices: int = 1,
               clock: Callable[[], float] = time.perf_counter):
    self.tokens_per_step, self.total_steps = tokens_per_step, total_steps
    self.flops_per_token, self.peak, self.num_devices = (
        flops_per_token, peak_flops_per_device, num_devices)
    self._clock = clock
    self._last_time, self._last_step = None, None

  @classmethod
  def for_config(cls, cfg) -> "Throughput":
    """Tokens per step, steps, FLOPs per token (flops.py) and the devices'
    peak (train.peak_flops_per_device, a known chip, or a measured matmul)."""
    t = cfg.train
    return cls(t.global_batch * t.seq_len, t.steps, flops.training_flops_per_token(cfg),
               flops.peak_flops_per_device(t.peak_flops_per_device), jax.device_count())

  def restart(self, step: int) -> None:
    """Time the next report from now, with `step` done: what ran since that
    step (an eval, a geometry probe, a checkpoint save) is not training."""
    self._last_time, self._last_step = self._clock(), step

  def update(self, step: int) -> dict[str, float]:
    now = self._clock()
    out = {}
    if self._last_time is not None and step > self._last_step:
      seconds_per_step = (now - self._last_time) / (step - self._last_step)
      out = {"tokens_per_s": self.tokens_per_step / seconds_per_step,
             "step_s": seconds_per_step,
             "eta_s": seconds_per_step * (self.total_steps - step)}
      out |= self.utilisation(out["tokens_per_s"])
    self._last_time, self._last_step = now, step
    return out

  def utilisation(self, tokens_per_s: float) -> dict[str, float]:
    """{"model_tflops": per device, "mfu": fraction of peak}; {} if unknown."""
    if self.flops_per_token <= 0 or self.peak <= 0:
      return {}
    rate = flops.model_flops_rate(self.flops_per_token, tokens_per_s) / self.num_devices
    return {"model_tflops": rate / 1e12,
            "mfu": flops.mfu(self.flops_per_token, tokens_per_s, self.peak, self.num_devices)}
