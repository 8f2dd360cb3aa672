"""End-to-end training on one host: loss goes down, resumption is exact,
logs are readable, accumulation and the schedule do what they say."""

import glob
import itertools
import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import metrics_log
from nitp_jax import optim
from nitp_jax import step as step_lib
from nitp_jax import train
from tests.conftest import train_config
from tests.helpers import (crc32c, max_abs_diff, read_event_records, session_start_steps,
                           tensorboard_view)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_training_lowers_the_loss(prepared_dir, tmp_path, moe):
  cfg = train_config(prepared_dir, moe=moe, steps=40)
  result = train.run(cfg, str(tmp_path))
  losses = [r["ntp"] for r in read_metrics(str(tmp_path))]
  assert len(losses) == 40
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  assert result["eval"]["ntp"] < losses[0] and result["eval"]["tokens"] > 0
  nitp = [r["nitp"] for r in read_metrics(str(tmp_path))]
  assert all(np.isfinite(nitp)) and min(nitp) < 0.5


def test_resume_continues_exactly(prepared_dir, tmp_path):
  cfg = train_config(prepared_dir, steps=16, checkpoint_every=8, eval_every=100)
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  train.run(cfg, whole)
  train.run(cfg, parts, stop_after=8)
  assert [r["step"] for r in read_metrics(parts)] == list(range(1, 9))
  train.run(cfg, parts)  # the same command again resumes from step 8
  a, b = read_metrics(whole), read_metrics(parts)
  assert [r["step"] for r in b] == list(range(1, 17))
  for key in ("loss", "ntp", "nitp", "grad_norm"):
    assert [r[key] for r in a] == [r[key] for r in b], key
  *_, pa = ckpt_lib.restore_params(whole)
  *_, pb = ckpt_lib.restore_params(parts)
  assert max_abs_diff(pa, pb) == 0.0


def test_resume_with_router_bias_continues_exactly(prepared_dir, tmp_path):
  """The aux-free router bias is train state: checkpointed, restored, and
  the loads and losses of a resumed run are those of an uninterrupted one."""
  cfg = train_config(prepared_dir, moe=True, steps=12, checkpoint_every=6, eval_every=100)
  cfg.model.moe.balance_loss, cfg.model.moe.bias_update_rate = "none", 1e-2
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  train.run(cfg, whole)
  train.run(cfg, parts, stop_after=6)
  train.run(cfg, parts)
  a, b = read_metrics(whole), read_metrics(parts)
  for key in ("loss", "ntp", "moe_load_max_over_mean_l1", "moe_load_max_over_mean"):
    assert [r[key] for r in a] == [r[key] for r in b], key
  *_, pa = ckpt_lib.restore_params(whole)
  *_, pb = ckpt_lib.restore_params(parts)
  assert max_abs_diff(pa, pb) == 0.0
  bias = pa["backbone"]["layers_1_2"]["moe"]["router_bias"]
  assert bias.shape == (1, 4) and np.any(bias != 0)
  other = train_config(prepared_dir, moe=True, steps=14)
  other.model.moe.balance_loss = "none"
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model.moe.bias_update_rate: 0.01 -> 0.0"):
    train.run(other, parts)


def test_resume_refuses_a_different_model(prepared_dir, tmp_path):
  train.run(train_config(prepared_dir, steps=2, eval_every=100), str(tmp_path))
  other = train_config(prepared_dir, steps=4)
  other.model.d_model = 96
  with pytest.raises(ckpt_lib.CheckpointError, match=r"model.d_model: 64 -> 96"):
    train.run(other, str(tmp_path))


def test_tensorboard_events_are_valid(tmp_path):
  assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  log = metrics_log.MetricsLog(str(tmp_path))
  log.write(7, {"loss": 1.5})
  log.close()
  [path] = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  events = read_event_records(path)
  assert b"brain.Event:2" in events[0]
  [scalar] = [e for e in events if b"train/loss" in e]
  assert struct.pack("<f", 1.5) in scalar and b"\x10\x07" in scalar  # field 2 (step) = 7
  assert tensorboard_view(str(tmp_path / "tensorboard"), "train/loss") == [(7, 1.5)]


def test_tensorboard_restart_drops_the_steps_that_are_run_again(tmp_path):
  first = metrics_log.MetricsLog(str(tmp_path))
  first.truncate_after(0)
  for step in (1, 2, 3):  # a run killed after step 3, last checkpoint at 2
    first.write(step, {"loss": float(step)})
  first.close()
  resumed = metrics_log.MetricsLog(str(tmp_path))
  resumed.truncate_after(2)
  resumed.write(3, {"loss": 30.0})
  resumed.close()
  # The resumed file starts with a SessionLog START at step 3 (purge_step).
  paths = sorted(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*")))
  assert len(paths) == 2
  assert session_start_steps(paths[0]) == [1] and session_start_steps(paths[1]) == [3]
  assert tensorboard_view(str(tmp_path / "tensorboard"), "train/loss") == [
      (1, 1.0), (2, 2.0), (3, 30.0)]
  with open(tmp_path / "metrics.jsonl") as f:
    assert [(r["step"], r["loss"]) for r in map(json.loads, f)] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def _wsd_float32(t, n: int) -> np.ndarray:
  """The WSD formula op by op in float32, as XLA evaluates it: a division by
  a scalar is a multiplication by its float32 reciprocal, and the power is
  XLA's (jnp.power), not NumPy's."""
  f32 = np.float32
  decay_steps = int(round(t.decay_fraction * t.steps))
  step = np.arange(n).astype(f32)
  progress = np.clip((step - f32(t.steps - decay_steps)) * (f32(1) / f32(max(decay_steps, 1))),
                     f32(0), f32(1))
  if t.schedule == "wsd_exp":
    decay = np.asarray(jnp.power(jnp.float32(t.final_lr_ratio), jnp.asarray(progress)))
  else:
    decay = f32(1) - f32(1.0 - t.final_lr_ratio) * progress
  if not t.warmup_steps:
    return f32(t.lr) * decay
  warm = np.minimum(f32(1), (step + f32(1)) * (f32(1) / f32(t.warmup_steps)))
  return f32(t.lr) * warm * decay


def test_wsd_schedule_matches_a_float32_transcription():
  """The schedule against an independent float32 transcription of the WSD
  formula (warmup (step+1)/warmup, stable, linear or exponential decay):
  bit for bit in every phase."""
  cfg = train_config("", steps=1)
  worst: dict[str, int] = {}
  for warmup, steps, fraction, schedule, final in itertools.product(
      [0, 1, 5, 20], [1, 7, 200, 1000], [0, 0.2, 1], ["wsd", "wsd_exp"], [0, 0.01, 0.5]):
    if schedule == "wsd_exp" and final == 0:
      continue
    t = cfg.train
    t.warmup_steps, t.steps, t.decay_fraction, t.schedule, t.final_lr_ratio = (
        warmup, steps, fraction, schedule, final)
    n = steps + 6
    lr_N = np.asarray(optim.wsd_schedule(t)(jnp.arange(n, dtype=jnp.int32)), np.float32)
    ulps_N = np.abs(lr_N.view(np.int32).astype(np.int64)
                    - _wsd_float32(t, n).view(np.int32).astype(np.int64))
    step = np.arange(n)
    decay_start = steps - int(round(fraction * steps))
    decay = ("linear decay to 0" if schedule == "wsd" and final == 0
             else "linear decay" if schedule == "wsd" else "exponential decay")
    phase = np.where(step >= steps, "after the end",
                     np.where(step >= decay_start, decay,  # a warmup overlapping the
                              np.where(step < warmup - 1, "warmup", "stable")))  # decay: decay
    for p in np.unique(phase):
      worst[p] = max(worst.get(p, 0), int(ulps_N[phase == p].max()))
  assert worst == dict.fromkeys(worst, 0), worst


def test_resuming_under_another_schedule_says_how_the_rate_moves():
  # A finished 200-step run (decayed to 0) given 500 steps re-warms to the peak.
  saved = train_config("", steps=200).train
  longer = train_config("", steps=500).train
  assert optim.schedule_change(saved, longer, 200) == (
      "the learning-rate schedule differs from the checkpoint's (train.steps: 200 -> 500): "
      "the rate at step 200 is 3.00e-03, where the checkpoint's run was at 0.00e+00")
  assert optim.schedule_change(saved, train_config("", steps=200).train, 200) is None
  # Still in the stable phase of both: nothing changes at this step.
  assert optim.schedule_change(train_config("", steps=1000).train, longer, 100) is None
  del saved["schedule"]  # a checkpoint from before a field existed: no note
  assert optim.schedule_change(saved, longer, 200) is None


def test_weight_decay_skips_norms_and_biases():
  params = {"layers_0_2": {"attn_norm": {"scale": jnp.ones((2, 4))},
                           "attn": {"q": jnp.ones((2, 4, 2, 2)), "q_bias": jnp.ones((2, 2, 2))}},
            "embed": jnp.ones((8, 4))}
  mask = optim.decay_mask(params)
  assert mask["embed"] and mask["layers_0_2"]["attn"]["q"]
  assert not mask["layers_0_2"]["attn_norm"]["scale"] and not mask["layers_0_2"]["attn"]["q_bias"]


def test_gradient_accumulation_matches_one_big_batch():
  cfg = train_config("", steps=10)
  cfg.train.global_batch = 4
  opt = optim.make_optimizer(cfg.train)
  state = step_lib.init_state(cfg, opt, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(1, 512, (4, 64)), jnp.int32),
           "segment_ids": jnp.ones((4, 64), jnp.int32),
           "positions": jnp.tile(jnp.arange(64, dtype=jnp.int32), (4, 1))}
  one, m1 = jax.jit(step_lib.make_train_step(cfg, opt))(state, batch)
  cfg.train.microbatches = 2
  two, m2 = jax.jit(step_lib.make_train_step(cfg, opt))(state, batch)
  assert abs(float(m1["loss"]) - float(m2["loss"])) < 1e-5
  assert max_abs_diff(one["params"], two["params"]) < 1e-5


def test_cli_reports_bad_input_in_one_line(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "nitp_jax.train", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--config.data.input=/no/such/corpus"],
      capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "/no/such/corpus" in out.stderr and "Traceback" not in out.stderr


def test_grain_worker_processes_train_resume_and_exit_cleanly(prepared_dir, tmp_path):
  """data.worker_count > 0 end to end: trains, resumes, and leaves nothing
  behind (no leaked shared memory, no exception printed at exit)."""
  config = tmp_path / "workers.py"
  config.write_text(
      "from tests.conftest import train_config\n"
      "def get_config():\n"
      f"  c = train_config({prepared_dir!r}, steps=4, eval_every=4, checkpoint_every=4)\n"
      "  c.data.worker_count = 2\n"
      "  return c\n")
  workdir = tmp_path / "run"

  def run(*overrides):
    out = subprocess.run([sys.executable, "-m", "nitp_jax.train", f"--config={config}",
                          f"--workdir={workdir}", *overrides], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for noise in ("leaked shared_memory", "Traceback", "Exception ignored"):
      assert noise not in out.stderr, out.stderr[-3000:]
    return out.stdout + out.stderr

  assert "done: step 4" in run()
  resumed = run("--config.train.steps=6")
  assert "resuming from step 4" in resumed and "done: step 6" in resumed
  assert [r["step"] for r in read_metrics(str(workdir))] == list(range(1, 7))
