"""Runs that survive: kills at arbitrary points, SIGTERM, corrupt checkpoints,
non-finite steps, a process-count change and a mesh change on restore."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nitp_jax import checkpoint as ckpt_lib
from nitp_jax import optim
from nitp_jax import step as step_lib
from nitp_jax import train
from tests.conftest import train_config
from tests.helpers import max_abs_diff, tensorboard_view

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24


def train_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == "train"]


class Run:
  """`python -m nitp_jax.train` in a child process, as a user starts it."""

  def __init__(self, config_file, workdir):
    self.workdir = workdir
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    self.log = open(os.path.join(os.path.dirname(workdir), "child.log"), "a")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "nitp_jax.train", f"--config={config_file}",
         f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))

  def wait_for(self, condition, what, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
      assert self.proc.poll() is None, f"child exited before {what}"
      assert time.time() < deadline, f"timed out waiting for {what}"
      time.sleep(0.002)

  def logged_step(self) -> int:
    try:
      return max((r["step"] for r in train_records(self.workdir)), default=0)
    except (OSError, ValueError):
      return 0

  def writing_checkpoint(self, after: int) -> bool:
    d = os.path.join(self.workdir, "checkpoints")
    return any(int(t.get_final().name) > after for t in ocp.path.step.all_temporary_paths(d))

  def finish(self, timeout=180.0) -> tuple[int, str]:
    out, _ = self.proc.communicate(timeout=timeout)
    self.log.close()
    return self.proc.returncode, out


@pytest.fixture(scope="module")
def config_file(prepared_dir, tmp_path_factory):
  path = tmp_path_factory.mktemp("cfg") / "robust.py"
  path.write_text(textwrap.dedent(f"""
      from tests.conftest import train_config
      def get_config():
        return train_config({prepared_dir!r}, steps={STEPS}, checkpoint_every=4,
                            eval_every=1000, keep_checkpoints=10, log_every=1)
  """))
  return str(path)


def test_kills_and_sigterm_resume_bitwise(config_file, tmp_path):
  whole = str(tmp_path / "whole" / "run")
  assert Run(config_file, whole).finish()[0] == 0

  parts = str(tmp_path / "parts" / "run")
  run = Run(config_file, parts)  # 1: SIGKILL mid-training
  run.wait_for(lambda: run.logged_step() >= 6, "step 6")
  run.proc.kill()
  run.finish()
  run = Run(config_file, parts)  # 2: SIGKILL while a checkpoint is being written
  run.wait_for(lambda: run.writing_checkpoint(after=8), "a checkpoint write after step 8")
  run.proc.kill()
  run.finish()
  run = Run(config_file, parts)  # 3: SIGTERM: finish the step, save, exit 0
  run.wait_for(lambda: run.logged_step() >= 14, "step 14")
  run.proc.send_signal(signal.SIGTERM)
  rc, out = run.finish()
  assert rc == 0 and "SIGTERM received: checkpoint of step" in out and "rerun" in out, out
  saved = int(out.split("checkpoint of step ")[1].split()[0])
  assert saved >= 14
  assert os.path.isdir(os.path.join(parts, "checkpoints", str(saved)))
  run = Run(config_file, parts)  # 4: SIGKILL again, later
  run.wait_for(lambda: run.logged_step() >= 19, "step 19")
  run.proc.kill()
  run.finish()
  rc, out = Run(config_file, parts).finish()  # 5: the same command completes the run
  assert rc == 0 and f"done: step {STEPS}" in out, out

  a, b = train_records(whole), train_records(parts)
  assert [r["step"] for r in b] == list(range(1, STEPS + 1))
  for key in ("loss", "ntp", "nitp", "grad_norm", "lr"):
    assert [r[key] for r in a] == [r[key] for r in b], key
  # TensorBoard, too, shows each step once, with the values of the run that
  # completed it.
  shown = tensorboard_view(os.path.join(parts, "tensorboard"), "train/loss")
  assert shown == [(r["step"], np.float32(r["loss"])) for r in b]
  *_, pa = ckpt_lib.restore_params(whole)
  *_, pb = ckpt_lib.restore_params(parts)
  assert max_abs_diff(pa, pb) == 0.0


def _short_run(prepared_dir, workdir, steps=8, **train_overrides):
  cfg = train_config(prepared_dir, steps=steps, checkpoint_every=4, eval_every=1000,
                     keep_checkpoints=5, **train_overrides)
  return cfg, train.run(cfg, workdir)


def _corrupt(step_dir):
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")


def test_corrupt_latest_falls_back_to_newest_intact(prepared_dir, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  cfg, _ = _short_run(prepared_dir, workdir)
  _corrupt(os.path.join(workdir, "checkpoints", "8"))
  trainer = train.Trainer(cfg, workdir)
  try:
    state = trainer.initial_state()
  finally:
    trainer.close()
  assert int(state["step"]) == 4
  assert any("checkpoints/8 is damaged" in r.getMessage() and "trying an older one"
             in r.getMessage() for r in caplog.records)

  # It was moved aside (tests/test_checkpoint_faults.py); with the older one
  # damaged too, nothing restores: an error, not a fresh start.
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "8"))
  _corrupt(os.path.join(workdir, "checkpoints", "4"))
  with pytest.raises(ckpt_lib.CheckpointError, match="none of the 1 checkpoints .* Not starting "
                     "from scratch"):
    train.run(cfg, workdir)


def test_an_interrupted_checkpoint_write_is_named_and_skipped(tmp_path, caplog):
  """What a kill during a save leaves behind (Orbax's temporary directory)."""
  tmp = tmp_path / "checkpoints" / "12.orbax-checkpoint-tmp"
  tmp.mkdir(parents=True)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path), keep=3)
  try:
    assert ckpt.steps() == []
    assert ckpt.restore_latest(None, None, None) is None
  finally:
    ckpt.close()
  assert any(str(tmp) in r.getMessage() and "incomplete" in r.getMessage()
             for r in caplog.records)


def test_checkpoint_from_another_process_count_restores_with_a_new_order(
    prepared_dir, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  cfg, _ = _short_run(prepared_dir, workdir, steps=4)
  data = os.path.join(workdir, "checkpoints", "4", "data")
  os.rename(os.path.join(data, "process_0-of-1.json"), os.path.join(data, "process_0-of-2.json"))
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  cfg.train.steps = 8
  for w in (workdir, copy):
    assert train.run(cfg, w)["step"] == 8
  assert any("another number of processes" in r.getMessage() for r in caplog.records)
  # Documented policy: the order restarts from a seed derived from the step,
  # so it is deterministic.
  assert [r["loss"] for r in train_records(workdir)] == [r["loss"] for r in train_records(copy)]


def test_nonfinite_steps_are_skipped_and_counted():
  cfg = train_config("", steps=10)
  cfg.model.tie_embeddings = False
  opt = optim.make_optimizer(cfg.train)
  state = step_lib.init_state(cfg, opt, jax.random.key(0))
  poison = 7
  emb = state["params"]["backbone"]["embed"]
  state["params"]["backbone"]["embed"] = emb.at[poison].set(jnp.nan)
  step = jax.jit(step_lib.make_train_step(cfg, opt))
  rows = np.random.default_rng(0).integers(8, 512, (8, 64))
  clean = {"tokens": jnp.asarray(rows, jnp.int32), "segment_ids": jnp.ones((8, 64), jnp.int32),
           "positions": jnp.tile(jnp.arange(64, dtype=jnp.int32), (8, 1))}
  bad = dict(clean, tokens=clean["tokens"].at[0, 3].set(poison))
  s1, m1 = step(state, bad)
  assert not np.isfinite(float(m1["loss"])) and int(m1["skipped_in_a_row"]) == 1
  finite_params = lambda s: jax.tree.map(lambda a: a[jnp.arange(a.shape[0]) != poison]
                                         if a.shape == emb.shape else a, s["params"])
  assert max_abs_diff(finite_params(s1), finite_params(state)) == 0.0  # update skipped
  s2, m2 = step(s1, bad)
  assert (int(m2["skipped_in_a_row"]), int(m2["skipped_total"])) == (2, 2)
  s3, m3 = step(s2, clean)
  assert np.isfinite(float(m3["loss"]))
  assert (int(m3["skipped_in_a_row"]), int(m3["skipped_total"])) == (0, 2)
  assert max_abs_diff(finite_params(s3), finite_params(s2)) > 0  # training goes on
  assert int(s3["step"]) == 3


def test_run_stops_after_too_many_nonfinite_steps_and_saves_none(prepared_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cfg = train_config(prepared_dir, steps=20, checkpoint_every=100, eval_every=1000,
                     lr=1e38, warmup_steps=0, grad_clip=1e30, max_skipped_in_a_row=2)
  with pytest.raises(train.NonFiniteLossError, match="3 non-finite steps in a row .*"
                     "max_skipped_in_a_row=2"):
    train.run(cfg, workdir)
  assert not os.listdir(os.path.join(workdir, "checkpoints"))


def test_elastic_restore_onto_another_mesh(prepared_dir, tmp_path):
  """A checkpoint written under data=8 restores exactly under fsdp=4 x tensor=2."""
  script = textwrap.dedent(f"""
      import jax, numpy as np
      from nitp_jax import checkpoint, train
      from tests.conftest import train_config
      cfg = train_config({prepared_dir!r}, steps=4, checkpoint_every=4, eval_every=1000)
      cfg.mesh.data = 8
      train.run(cfg, {str(tmp_path)!r})
      *_, saved = checkpoint.restore_params({str(tmp_path)!r})
      cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
      cfg.train.steps = 6
      trainer = train.Trainer(cfg, {str(tmp_path)!r})
      state = trainer.initial_state()
      emb = state["params"]["backbone"]["embed"]
      print("SHARDING", emb.sharding.spec)
      same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                          state["params"], saved)
      print("EXACT", all(jax.tree.leaves(same)))
      trainer.close()
      print("STEP", train.run(cfg, {str(tmp_path)!r})["step"])
  """)
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "EXACT True" in out.stdout and "STEP 6" in out.stdout, out.stdout
  assert "SHARDING P('tensor', 'fsdp')" in out.stdout, out.stdout
