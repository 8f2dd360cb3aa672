"""Multi-host in miniature: two OS processes × 2 CPU devices, started by
launch/local.sh and joined through jax.distributed on localhost, train the
small config and log the same losses as one process with 4 devices fed the
same global batches.

The two-process run uses a hybrid mesh (fsdp across the processes as a DCN
factor, tensor inside each) and writes one checkpoint together; the
one-process reference (`python -m tests.test_multiprocess`) has the same
mesh shape and reads each process's rows of every batch.

A preemption notice (SIGTERM) or Ctrl-C (SIGINT) on any one process stops
all of them at one step through JAX's preemption sync point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from nitp_jax import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA = "--xla_backend_optimization_level=0"
STEPS = 3
CONFIG = """\
from tests.conftest import train_config


def get_config(variant=""):
  c = train_config({prepared!r}, steps={steps}, eval_every={steps},
                   checkpoint_every={steps}, eval_batches=2)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.dcn_fsdp = 1, 1, 2, 2
  if variant == "one_process":
    c.mesh.fsdp, c.mesh.dcn_fsdp = 2, 1
  return c
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read_metrics(workdir: str, kind: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_two_processes_log_the_same_losses_as_one(prepared_dir, tmp_path):
  config = tmp_path / "config.py"
  config.write_text(CONFIG.format(prepared=prepared_dir, steps=STEPS))
  two, one, logs = tmp_path / "two", tmp_path / "one", tmp_path / "logs"
  env = dict(os.environ, PYTHON=sys.executable, XLA_FLAGS=FAST_XLA)
  reference = subprocess.Popen(
      [sys.executable, "-m", "tests.test_multiprocess", f"{config}:one_process", str(one)],
      cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu",
                         XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count=4"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  launched = subprocess.run(
      ["launch/local.sh", "--processes=2", "--devices=2", f"--port={free_port()}",
       f"--log_dir={logs}", "--", f"--config={config}", f"--workdir={two}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  ref_out = reference.communicate(timeout=600)[0]
  assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
  assert reference.returncode == 0, ref_out[-3000:]

  for kind, keys in (("train", ("loss", "ntp", "nitp", "grad_norm")), ("eval", ("ntp", "nitp"))):
    a, b = read_metrics(str(two), kind), read_metrics(str(one), kind)
    assert [r["step"] for r in a] == [r["step"] for r in b] and a, kind
    for key in keys:
      np.testing.assert_allclose([r[key] for r in a], [r[key] for r in b], rtol=1e-5,
                                 err_msg=f"{kind} {key}")
  assert os.path.isdir(two / "checkpoints" / str(STEPS))
  worker_log = (logs / "process_1.log").read_text()
  assert "step 1/" not in worker_log  # only process 0 logs
  assert "done: step 3" in (logs / "process_0.log").read_text()


# ---- preemption: every process stops at the same step ----


GUARD_PROCESS = """\
import sys, time
from nitp_jax import distributed, preemption
distributed.maybe_initialize(coordinator_address=sys.argv[1], num_processes=2,
                             process_id=int(sys.argv[2]))
print("initialized", flush=True)
time.sleep(float(sys.argv[3]))  # start-up (restore, compile): a notice may arrive here
start = 5  # a resumed run
with preemption.PreemptionGuard(start) as guard:
  for step in range(start + 1, 400):
    print("step", step, flush=True)
    if guard.requested(step):
      print("stop", step, guard.reason, flush=True)
      break
    time.sleep(0.05)
"""


class GuardProcess:
  """One of two processes running GUARD_PROCESS, its output in a file."""

  def __init__(self, address: str, process_id: int, startup_s: float, log_dir):
    self.log = log_dir / f"guard_{address.split(':')[1]}_{process_id}.log"
    with open(self.log, "w", encoding="utf-8") as out:
      self.proc = subprocess.Popen(
          [sys.executable, "-c", GUARD_PROCESS, address, str(process_id), str(startup_s)],
          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=out,
          stderr=subprocess.STDOUT)

  def wait_for(self, line: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while line not in self.log.read_text().splitlines():
      assert self.proc.poll() is None and time.time() < deadline, self.log.read_text()[-3000:]
      time.sleep(0.01)

  def stop_line(self) -> str:
    """`stop STEP REASON`, once the process has exited 0."""
    assert self.proc.wait(timeout=120) == 0, self.log.read_text()[-3000:]
    stopped = [l for l in self.log.read_text().splitlines() if l.startswith("stop ")]
    assert stopped, self.log.read_text()[-3000:]
    return stopped[0]


def start_guard_processes(startup_s: float, log_dir) -> list[GuardProcess]:
  address = f"127.0.0.1:{free_port()}"
  return [GuardProcess(address, i, startup_s, log_dir) for i in range(2)]


def test_a_signal_on_one_process_stops_both_at_one_step(tmp_path):
  """SIGINT (which JAX ignores) on process 0 mid-loop; SIGTERM on both during
  the start-up of a resumed run, which must stop after its first step."""
  ctrl_c, early = start_guard_processes(0.0, tmp_path), start_guard_processes(6.0, tmp_path)
  try:
    for p in early:
      p.wait_for("initialized")
      p.proc.send_signal(signal.SIGTERM)
    ctrl_c[0].wait_for("step 9")
    ctrl_c[0].proc.send_signal(signal.SIGINT)
    a, b = (p.stop_line().split(maxsplit=2) for p in ctrl_c)
    assert a[1] == b[1] and int(a[1]) > 9, (a, b)
    assert (a[2], b[2]) == ("SIGINT", "preemption notice")
    assert [p.stop_line() for p in early] == ["stop 6 preemption notice"] * 2
  finally:
    for p in ctrl_c + early:
      p.proc.kill()


def start_two(config: str, workdir: str, log_dir) -> list[subprocess.Popen]:
  """The two processes launch/local.sh starts, as children we can signal."""
  address = f"--coordinator_address=127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count=2")
  procs = []
  for i in range(2):
    with open(log_dir / f"process_{i}.log", "a", encoding="utf-8") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "nitp_jax.train", f"--config={config}", f"--workdir={workdir}",
           address, "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env,
          stdout=log, stderr=subprocess.STDOUT))
  return procs


def finish(procs: list[subprocess.Popen], log_dir) -> str:
  for i, p in enumerate(procs):
    assert p.wait(timeout=300) == 0, (log_dir / f"process_{i}.log").read_text()[-3000:]
  return (log_dir / "process_0.log").read_text()


def logged_step(workdir) -> int:
  try:
    return max((r["step"] for r in read_metrics(str(workdir), "train")), default=0)
  except (OSError, ValueError):
    return 0


def saved_step(log: str) -> int:
  """The step of the last 'preemption notice received' line in a log."""
  assert "preemption notice received: checkpoint of step" in log, log[-3000:]
  return int(log.split("checkpoint of step ")[-1].split()[0])


def test_sigterm_on_one_process_checkpoints_both_and_resumes_bitwise(prepared_dir, tmp_path):
  """A preemption notice on one process mid-run; the rerun completes, equal to
  an uninterrupted run. (A notice while a resumed run starts up is tested
  above, on the guard alone: each two-process training launch costs ~30 s of
  CPU.)"""
  steps = 16
  config = tmp_path / "config.py"
  config.write_text(CONFIG.format(prepared=prepared_dir, steps=steps).replace(
      f"checkpoint_every={steps}, eval_batches=2", "checkpoint_every=4, eval_batches=1, "
      "geometry_every=0"))
  whole, parts = tmp_path / "whole", tmp_path / "parts"
  for d in (whole, parts):
    d.mkdir()
  reference = start_two(str(config), str(whole / "run"), whole)
  run = start_two(str(config), str(parts / "run"), parts)
  started = reference + run
  try:
    deadline = time.time() + 300
    while logged_step(parts / "run") < 1:
      assert time.time() < deadline and all(p.poll() is None for p in run), "no step 1"
      time.sleep(0.01)
    run[1].send_signal(signal.SIGTERM)  # the worker that logs nothing
    saved = saved_step(finish(run, parts))
    assert 1 < saved < steps and os.path.isdir(parts / "run" / "checkpoints" / str(saved))
    started += (run := start_two(str(config), str(parts / "run"), parts))
    assert f"done: step {steps}" in finish(run, parts)
    assert f"done: step {steps}" in finish(reference, whole)
  finally:
    for p in started:
      p.kill()

  a, b = read_metrics(str(whole / "run"), "train"), read_metrics(str(parts / "run"), "train")
  assert [r["step"] for r in b] == list(range(1, steps + 1))
  for key in ("loss", "ntp", "nitp", "grad_norm", "lr"):
    assert [r[key] for r in a] == [r[key] for r in b], key


# ---- how a process learns it is one of several ----


SLURM_PROCESS = """\
import json
import jax
from jax.experimental import multihost_utils
from nitp_jax import distributed
launch = distributed.maybe_initialize()
ranks = multihost_utils.process_allgather(jax.numpy.int32(jax.process_index()))
print(json.dumps({"source": launch.source, "count": jax.process_count(),
                  "index": jax.process_index(), "ranks": ranks.tolist()}))
"""


def free_slurm_port() -> int:
  """A free port where JAX's SLURM detection looks: 61440 + job id % 4096."""
  for port in np.random.default_rng().permutation(np.arange(61440, 65536)):
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", int(port)))
      except OSError:
        continue
      return int(port)
  raise RuntimeError("no free port in [61440, 65536)")


def test_slurm_variables_alone_bring_up_two_processes():
  """srun's environment on one host: JAX's own SLURM detection (through
  maybe_initialize) finds the coordinator, the count and the ranks."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "JAX_"))}
  env |= {"JAX_PLATFORMS": "cpu", "SLURM_JOB_ID": str(free_slurm_port() - 61440),
          "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "1"}
  procs = [subprocess.Popen([sys.executable, "-c", SLURM_PROCESS], cwd=ROOT, text=True,
                            env=env | {"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert [json.loads(out.splitlines()[-1]) for out, _ in outs] == [
      {"source": "slurm", "count": 2, "index": i, "ranks": [0, 1]} for i in range(2)]


def test_slurm_one_task_per_node_uses_every_gpu():
  env = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "gpu[03-06]",
         "SLURM_JOB_ID": "4097", "SLURM_LOCALID": "0", "SLURM_NNODES": "4",
         "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
  launch = distributed.detect(env)
  assert launch == distributed.Launch("slurm", local_device_ids=(0, 1, 2, 3),
                                      cluster_detection_method="slurm")
  assert launch.kwargs() == {"local_device_ids": [0, 1, 2, 3], "cluster_detection_method": "slurm"}


def test_slurm_one_task_per_gpu_uses_its_own():
  env = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "a,b",
         "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_LOCALID": "1"}
  assert distributed.detect(env).local_device_ids == (1,)
  assert distributed.detect(env | {"CUDA_VISIBLE_DEVICES": "1"}).local_device_ids == (0,)


def test_slurm_without_srun_variables_says_so():
  with pytest.raises(distributed.LaunchError, match="SLURM_STEP_NODELIST, SLURM_LOCALID not set"):
    distributed.detect({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1"})


def test_single_process_tpu_pod_and_flags():
  assert distributed.detect({}) is None
  assert distributed.detect({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "w0"}) is None
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == distributed.Launch("tpu")
  assert distributed.detect({"MEGASCALE_COORDINATOR_ADDRESS": "x"}) == distributed.Launch("tpu")
  assert distributed.detect({}, mode="on") == distributed.Launch("auto")
  assert distributed.detect({"TPU_WORKER_HOSTNAMES": "w0,w1"}, mode="off") is None
  assert distributed.detect({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_NODELIST": "a"},
                            coordinator_address="h:1", num_processes=3, process_id=0
                            ) == distributed.Launch("flags", "h:1", 3, 0)
  with pytest.raises(distributed.LaunchError, match="go together"):
    distributed.detect({}, coordinator_address="h:1")
  with pytest.raises(distributed.LaunchError, match=r"--process_id=2 must be in \[0"):
    distributed.detect({}, coordinator_address="h:1", num_processes=2, process_id=2)
  with pytest.raises(distributed.LaunchError, match="use auto, on or off"):
    distributed.detect({}, mode="yes")


def one_process_reference(config_path: str, workdir: str) -> None:
  """Train like the two-process run: batch rows [0, B/2) are what process 0
  of 2 reads, [B/2, B) what process 1 reads."""
  import grain  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from nitp_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from nitp_jax import train  # pylint: disable=import-outside-toplevel
  from nitp_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  assert jax.device_count() == 4 and jax.process_count() == 1
  cfg = config_lib.load_config_file(config_path)
  trainer = train.Trainer(cfg, workdir)
  t = cfg.train
  halves = [pipeline.make_train_dataset(trainer.data_dir, t.seq_len, t.global_batch,
                                        seed=config_lib.order_seed(cfg), process_index=p,
                                        process_count=2,
                                        shuffle_window=cfg.data.shuffle_window)
            for p in range(2)]
  trainer.train_iter = iter(grain.experimental.ZipIterDataset(halves).map(
      lambda pair: {k: np.concatenate([pair[0][k], pair[1][k]]) for k in pair[0]}))
  try:
    trainer.run()
  finally:
    trainer.close()


if __name__ == "__main__":
  one_process_reference(sys.argv[1], sys.argv[2])
