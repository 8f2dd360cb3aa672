"""Launchers: shellcheck-clean, `--dry-run` prints exactly the expected
commands, and a real run makes exactly those calls (recorded by fake
`gcloud` / `sbatch` / `srun` / python executables on PATH)."""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "launch", "*.sh")))
RECORDER = """#!/usr/bin/env bash
printf -v line '%q ' "$(basename "$0")" "$@"
echo "${line% }" >> "$CALLS"
"""


def shellcheck() -> str:
  found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  assert os.path.exists(found), "shellcheck missing: pip install -r requirements-test.txt"
  return found


def fake(bin_dir, name: str, extra: str = "", recorder: str = RECORDER) -> None:
  """An executable `name` that appends its command line to $CALLS, then runs `extra`."""
  path = bin_dir / name
  path.write_text(recorder + extra)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def launch(script: str, *args: str, env: dict | None = None, cwd=ROOT
           ) -> subprocess.CompletedProcess:
  return subprocess.run([os.path.join(ROOT, "launch", script), *args], cwd=cwd,
                        env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                        timeout=60)


def recorded(tmp_path) -> list[str]:
  calls = tmp_path / "calls"
  return calls.read_text().splitlines() if calls.exists() else []


@pytest.fixture
def fake_path(tmp_path) -> dict:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(tmp_path / "calls")}


def test_launchers_pass_shellcheck():
  assert {os.path.basename(s) for s in SCRIPTS} >= {"tpu_vm.sh", "gpu_slurm.sh", "local.sh"}
  out = subprocess.run([shellcheck(), *SCRIPTS], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr


def test_every_launcher_explains_itself_and_rejects_unknown_options():
  for script in SCRIPTS:
    name = os.path.basename(script)
    assert launch(name, "--help").stdout.strip().startswith(("Run", "Train")), name
    bad = launch(name, "--bogus")
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr, name


# ---- local.sh ----

LOCAL_ARGS = ("--processes=2", "--devices=2", "--port=2345", "--log_dir=logs", "--",
              "--config=configs/tiny.py", "--workdir=runs/a b")


def local_command(i: int, python: str = "python3") -> str:
  return (f"env XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu {python} "
          "-m nitp_jax.train --config=configs/tiny.py --workdir=runs/a\\ b "
          f"--coordinator_address=127.0.0.1:2345 --num_processes=2 --process_id={i}")


def test_local_dry_run_prints_every_process():
  out = launch("local.sh", "--dry-run", *LOCAL_ARGS, env={"XLA_FLAGS": "", "PYTHON": "python3"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      local_command(0) + " > logs/process_0.log 2>&1 &",
      local_command(1) + " > logs/process_1.log 2>&1 &",
      "wait"]


def test_local_runs_the_dry_run_commands(tmp_path, fake_path):
  with_env = RECORDER.replace('"$(basename "$0")"', 'env "XLA_FLAGS=$XLA_FLAGS" '
                              '"JAX_PLATFORMS=$JAX_PLATFORMS" "$(basename "$0")"')
  fake(tmp_path / "bin", "python3", recorder=with_env)
  out = launch("local.sh", *LOCAL_ARGS, env=dict(fake_path, XLA_FLAGS="", PYTHON="python3"),
               cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert sorted(recorded(tmp_path)) == [local_command(0), local_command(1)]
  assert sorted(os.listdir(tmp_path / "logs")) == ["process_0.log", "process_1.log"]


def test_local_stops_the_others_when_one_fails(tmp_path, fake_path):
  fake(tmp_path / "bin", "python3",
       'if [[ " $* " == *" --process_id=1 "* ]]; then exit 3; fi\nexec sleep 30\n')
  start = time.monotonic()
  out = launch("local.sh", *LOCAL_ARGS, env=dict(fake_path, PYTHON="python3"), cwd=tmp_path)
  assert out.returncode == 3 and "stopping the others" in out.stderr
  assert time.monotonic() - start < 20


# ---- gpu_slurm.sh ----

SLURM_ARGS = ("--nodes=2", "--gpus_per_node=4", "--partition=gpu", "--time=01:00:00", "--",
              "--config=configs/moe_9b.py", "--workdir=/shared/runs/my run")
SRUN = ("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 python3 -m nitp_jax.train "
        "--config=configs/moe_9b.py --workdir=/shared/runs/my\\ run")
SBATCH = ("sbatch --job-name=nitp --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 "
          "--output=runs/slurm/%x-%j.out --partition=gpu --time=01:00:00 "
          "--wrap=srun\\ --nodes=2\\ --ntasks-per-node=1\\ --kill-on-bad-exit=1\\ python3\\ -m\\ "
          "nitp_jax.train\\ --config=configs/moe_9b.py\\ --workdir=/shared/runs/my\\\\\\ run")


def test_gpu_slurm_submits_one_task_per_node(tmp_path, fake_path):
  env = dict(fake_path, PYTHON="python3", SLURM_JOB_ID="")
  dry = launch("gpu_slurm.sh", "--dry-run", *SLURM_ARGS, env=env, cwd=tmp_path)
  assert dry.returncode == 0, dry.stderr
  assert dry.stdout.splitlines() == [SBATCH]
  fake(tmp_path / "bin", "sbatch")
  out = launch("gpu_slurm.sh", *SLURM_ARGS, env=env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert recorded(tmp_path) == [SBATCH]
  # The --wrap string is what the batch job's shell runs: one word per flag.
  wrapped = shlex.split(SBATCH)[-1].removeprefix("--wrap=")
  assert shlex.split(wrapped) == shlex.split(SRUN)
  assert shlex.split(wrapped)[-1] == "--workdir=/shared/runs/my run"


def test_gpu_slurm_inside_an_allocation_runs_srun(tmp_path, fake_path):
  fake(tmp_path / "bin", "srun")
  env = dict(fake_path, PYTHON="python3", SLURM_JOB_ID="42")
  assert launch("gpu_slurm.sh", "--dry-run", *SLURM_ARGS, env=env).stdout.splitlines() == [SRUN]
  out = launch("gpu_slurm.sh", *SLURM_ARGS, env=env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert recorded(tmp_path) == [SRUN]


def test_gpu_slurm_requires_nodes():
  out = launch("gpu_slurm.sh", "--", "--config=configs/tiny.py")
  assert out.returncode == 2 and "--nodes=N" in out.stderr


# ---- tpu_vm.sh ----

TPU_ARGS = ("--name=nitp-a", "--zone=us-central2-b", "--accelerator=v4-16",
            "--version=tpu-ubuntu2204-base", "--project=p1", "--log_dir=logs", "--",
            "--config=configs/moe_9b.py", "--workdir=/mnt/gcs/runs/my run")
WHERE = "--zone=us-central2-b --project=p1"
TPU = "gcloud compute tpus tpu-vm"
SETUP = ("--command=rm\\ -rf\\ nitp_jax\\ \\&\\&\\ mkdir\\ -p\\ nitp_jax\\ \\&\\&\\ tar\\ -xzf\\ "
         "nitp_jax.tar.gz\\ -C\\ nitp_jax\\ \\&\\&\\ python3\\ -m\\ venv\\ nitp_venv\\ \\&\\&\\ "
         "nitp_venv/bin/python\\ -m\\ pip\\ install\\ -q\\ -r\\ nitp_jax/requirements.txt\\ "
         "\\'jax\\[tpu\\]==0.10.2\\'")
TRAIN = ("--command=set\\ -o\\ pipefail\\;\\ cd\\ nitp_jax\\ \\&\\&\\ mkdir\\ -p\\ logs\\ \\&\\&\\ "
         "../nitp_venv/bin/python\\ -m\\ nitp_jax.train\\ --distributed=on\\ "
         "--config=configs/moe_9b.py\\ --workdir=/mnt/gcs/runs/my\\\\\\ run\\ 2\\>\\&1\\ \\|\\ "
         "tee\\ logs/\\$\\(hostname\\).log")
GCLOUD_CALLS = [
    f"{TPU} create nitp-a {WHERE} --accelerator-type=v4-16 --version=tpu-ubuntu2204-base",
    f"{TPU} scp logs/nitp_jax.tar.gz nitp-a:nitp_jax.tar.gz --worker=all {WHERE}",
    f"{TPU} ssh nitp-a --worker=all {WHERE} {SETUP}",
    f"{TPU} ssh nitp-a --worker=all {WHERE} {TRAIN}",
    f"{TPU} scp --recurse nitp-a:nitp_jax/logs logs --worker=all {WHERE}",
    f"{TPU} delete nitp-a {WHERE} --quiet",
]


def test_tpu_vm_dry_run_prints_the_whole_lifecycle():
  out = launch("tpu_vm.sh", "--dry-run", *TPU_ARGS, env={"PYTHON": "python3"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      "mkdir -p logs",
      "tar -czf logs/nitp_jax.tar.gz --exclude=./.git --exclude=./runs --exclude=./.venv "
      f"--exclude=__pycache__ --exclude=nitp_jax.tar.gz -C {ROOT} .",
      *GCLOUD_CALLS]
  # What each worker's shell runs: the training flags arrive intact.
  remote = shlex.split(TRAIN)[0].removeprefix("--command=")
  assert "--workdir=/mnt/gcs/runs/my run" in shlex.split(remote)


def test_tpu_vm_makes_the_dry_run_calls(tmp_path, fake_path):
  fake(tmp_path / "bin", "gcloud")
  out = launch("tpu_vm.sh", *TPU_ARGS, env=dict(fake_path, PYTHON="python3"), cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert recorded(tmp_path) == GCLOUD_CALLS
  listed = subprocess.run(["tar", "-tzf", str(tmp_path / "logs" / "nitp_jax.tar.gz")],
                          capture_output=True, text=True, check=True).stdout.splitlines()
  assert "./nitp_jax/train.py" in listed and "./requirements.txt" in listed
  assert not any(p.startswith(("./.git/", "./runs/")) for p in listed)


def test_tpu_vm_collects_logs_and_deletes_after_a_failed_run(tmp_path, fake_path):
  fake(tmp_path / "bin", "gcloud", 'if [[ "$*" == *nitp_jax.train* ]]; then exit 7; fi\n')
  out = launch("tpu_vm.sh", *TPU_ARGS, env=dict(fake_path, PYTHON="python3"), cwd=tmp_path)
  assert out.returncode == 7
  assert recorded(tmp_path) == GCLOUD_CALLS


def test_tpu_vm_keep_leaves_the_vm(tmp_path, fake_path):
  fake(tmp_path / "bin", "gcloud")
  out = launch("tpu_vm.sh", "--keep", *TPU_ARGS, env=dict(fake_path, PYTHON="python3"),
               cwd=tmp_path)
  assert out.returncode == 0 and recorded(tmp_path) == GCLOUD_CALLS[:-1]
  assert f"{TPU} delete nitp-a" in out.stderr


def test_tpu_vm_requires_its_settings():
  out = launch("tpu_vm.sh", "--zone=z", "--", "--config=configs/tiny.py")
  assert out.returncode == 2 and "--name=... is required" in out.stderr


# ---- tpu_vm.sh --auto_resume: a fake gcloud whose VM is taken away ----

# Each `create` makes a READY VM; the first trainings fail as a preemption
# does, leaving the VM in the state listed in $LOSSES (one word per failure:
# PREEMPTED, or GONE: describe then answers NOT_FOUND); `describe` reports.
FAKE_TPU = """
state="$CALLS.state"; trains="$CALLS.trains"
case "$*" in
  *" create "*) echo READY > "$state" ;;
  *" describe "*)
    if [[ $(cat "$state") == GONE ]]; then echo "ERROR: (gcloud) NOT_FOUND: no such node" >&2; exit 1; fi
    cat "$state" ;;
  *nitp_jax.train*)
    n=$(( $(cat "$trains" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$trains"
    read -ra losses <<< "$LOSSES"
    if (( n <= ${#losses[@]} )); then
      loss=${losses[n-1]}
      if [[ $loss == FAILS ]]; then exit 1; fi
      echo "$loss" > "$state"; exit 255
    fi ;;
esac
"""
RESUME_ARGS = ("--auto_resume", *TPU_ARGS[:-1], "--workdir=gs://b/runs/my run")
RESUME_TRAIN = TRAIN.replace("/mnt/gcs/runs/my", "gs://b/runs/my")
CREATE, COPY, SETUP, _, LOGS, DELETE = GCLOUD_CALLS
ATTEMPT = [COPY, SETUP, f"{TPU} ssh nitp-a --worker=all {WHERE} {RESUME_TRAIN}"]
DESCRIBE = f"{TPU} describe nitp-a {WHERE} --format=value\\(state\\)"


def auto_resume(tmp_path, fake_path, losses: str, *args: str) -> subprocess.CompletedProcess:
  fake(tmp_path / "bin", "gcloud", FAKE_TPU)
  return launch("tpu_vm.sh", *args, *RESUME_ARGS,
                env=dict(fake_path, PYTHON="python3", LOSSES=losses), cwd=tmp_path)


def test_tpu_vm_auto_resume_recreates_a_preempted_or_vanished_vm(tmp_path, fake_path):
  out = auto_resume(tmp_path, fake_path, "PREEMPTED GONE")
  assert out.returncode == 0, out.stderr
  assert recorded(tmp_path) == [
      CREATE, *ATTEMPT, DESCRIBE, DELETE,  # preempted: delete it, then a new one
      CREATE, *ATTEMPT, DESCRIBE,          # gone: nothing to delete
      CREATE, *ATTEMPT, LOGS, DELETE]
  assert "nitp-a was preempted: recreating it (restart 1 of at most 10)" in out.stderr
  assert "nitp-a was gone: recreating it (restart 2 of at most 10)" in out.stderr
  assert "warning" not in out.stderr
  dry = launch("tpu_vm.sh", "--dry-run", *RESUME_ARGS, env={"PYTHON": "python3"})
  assert dry.returncode == 0 and dry.stdout.splitlines()[2:] == [
      CREATE, *ATTEMPT, LOGS, DELETE], dry.stdout


def test_tpu_vm_auto_resume_does_not_retry_a_real_failure(tmp_path, fake_path):
  out = auto_resume(tmp_path, fake_path, "FAILS")
  assert out.returncode == 1 and "recreating" not in out.stderr
  assert recorded(tmp_path) == [CREATE, *ATTEMPT, DESCRIBE, LOGS, DELETE]


def test_tpu_vm_auto_resume_stops_after_max_restarts(tmp_path, fake_path):
  out = auto_resume(tmp_path, fake_path, "PREEMPTED PREEMPTED PREEMPTED", "--max_restarts=1")
  assert out.returncode == 255
  assert "nitp-a was preempted again after 1 restarts (--max_restarts=1)" in out.stderr
  assert recorded(tmp_path) == [CREATE, *ATTEMPT, DESCRIBE, DELETE,
                                CREATE, *ATTEMPT, DESCRIBE, LOGS, DELETE]


def test_tpu_vm_auto_resume_warns_about_a_workdir_on_the_vm():
  out = launch("tpu_vm.sh", "--dry-run", "--auto_resume", *TPU_ARGS, env={"PYTHON": "python3"})
  assert out.returncode == 0 and "--workdir=gs://" in out.stderr
  bad = launch("tpu_vm.sh", "--max_restarts=x", *TPU_ARGS)
  assert bad.returncode == 2 and "--max_restarts=x must be" in bad.stderr
