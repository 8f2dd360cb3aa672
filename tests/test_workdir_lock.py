"""One run per workdir: a second run refuses a workdir in use (one line,
nothing changed), stale locks are taken over, the lock goes with the run."""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from nitp_jax import train
from nitp_jax import workdir_lock
from nitp_jax.errors import ConfigError, DataError
from tests.conftest import train_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(workdir):
  """(path, size, mtime) of everything under `workdir`."""
  out = set()
  for root, dirs, files in os.walk(workdir):
    for name in dirs + files:
      st = os.stat(os.path.join(root, name))
      out.add((os.path.join(root, name), st.st_size, st.st_mtime_ns))
  return out


def _train(config_file, workdir, **popen):
  return subprocess.Popen([sys.executable, "-m", "nitp_jax.train", f"--config={config_file}",
                           f"--workdir={workdir}"], cwd=ROOT, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), **popen)


def test_a_second_run_on_a_workdir_in_use_exits_at_once_and_changes_nothing(
    prepared_dir, tmp_path):
  config_file = tmp_path / "cfg.py"
  config_file.write_text(textwrap.dedent(f"""
      from tests.conftest import train_config
      def get_config():
        return train_config({prepared_dir!r}, steps=3, checkpoint_every=3, eval_every=1000)
  """))
  workdir = str(tmp_path / "run")
  lock = os.path.join(workdir, "lock.json")
  first = _train(config_file, workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    # Once it has written metrics it is well past taking the lock; stopped,
    # it holds the lock and writes nothing while the second run tries.
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(metrics) and os.path.getsize(metrics)):
      assert first.poll() is None, first.communicate()
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)
    before = _tree(workdir)
    second = _train(config_file, workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --workdir={workdir} is in use by another run: host "
                          f"{socket.gethostname()}, pid {first.pid}, since "), err
    assert "delete " + lock in err, err
    assert _tree(workdir) == before
  finally:
    first.send_signal(signal.SIGCONT)
  out, err = first.communicate(timeout=180)
  assert first.returncode == 0 and "done: step 3" in out, err[-2000:]
  assert not os.path.exists(lock)  # gone after a normal run


def _write_lock(workdir, **fields):
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "process_start": workdir_lock.process_start_time(os.getpid()),
            "started": now, "heartbeat": now, "token": "theirs"} | fields
  with open(os.path.join(workdir, "lock.json"), "w") as f:
    json.dump(record, f)


def _holder(workdir):
  with open(os.path.join(workdir, "lock.json")) as f:
    return json.load(f)


def _minutes_ago(minutes):
  t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=minutes)
  return t.isoformat(timespec="seconds")


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  _write_lock(tmp_path, pid=dead.pid, process_start=None)
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert _holder(tmp_path)["token"] == lock.token and _holder(tmp_path)["pid"] == os.getpid()
  assert not (tmp_path / "lock.json").exists()
  assert any(f"from {socket.gethostname()} pid {dead.pid}" in r.getMessage()
             and f"process {dead.pid} is gone" in r.getMessage() for r in caplog.records)


def test_a_reused_pid_is_not_the_holder(tmp_path):
  """Same pid, alive, but started at another time: another process now."""
  _write_lock(tmp_path, process_start=workdir_lock.process_start_time(os.getpid()) - 1)
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert _holder(tmp_path)["token"] == lock.token


def test_a_live_process_on_this_host_keeps_its_lock(tmp_path):
  _write_lock(tmp_path)
  with pytest.raises(ConfigError, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert _holder(tmp_path)["token"] == "theirs"


def test_another_host_holds_the_lock_until_its_heartbeat_is_stale(tmp_path, caplog):
  _write_lock(tmp_path, host="other-host", pid=1, heartbeat=_minutes_ago(9))
  with pytest.raises(ConfigError, match="in use by another run: host other-host, pid 1, since"):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert _holder(tmp_path)["token"] == "theirs"

  _write_lock(tmp_path, host="other-host", pid=1, heartbeat=_minutes_ago(11))
  lock = workdir_lock.WorkdirLock(str(tmp_path))
  lock.acquire()
  try:
    assert _holder(tmp_path)["token"] == lock.token
    assert any("from other-host pid 1" in r.getMessage() and "heartbeat is 6" in r.getMessage()
               for r in caplog.records)
    # A lock that is not ours any more is left alone.
    _write_lock(tmp_path, host="third-host", heartbeat=_minutes_ago(0), token="third")
    lock.refresh()
    assert lock.lost and _holder(tmp_path)["token"] == "third"
  finally:
    lock.release()
  assert _holder(tmp_path)["token"] == "third"


def test_a_lock_file_without_a_readable_heartbeat_is_judged_by_its_age(tmp_path):
  path = tmp_path / "lock.json"
  for text in ("{", json.dumps({"host": "other-host", "pid": 3})):
    path.write_text(text)  # half written, or not written by nitp_jax
    with pytest.raises(ConfigError, match="is in use by another run"):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - 11 * 60
    os.utime(path, (old, old))
    with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
      assert _holder(tmp_path)["token"] == lock.token


def test_the_holder_rewrites_its_heartbeat(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    _write_lock(tmp_path, heartbeat=_minutes_ago(30), token=lock.token)
    deadline = time.time() + 10
    while workdir_lock.stale_reason(dict(_holder(tmp_path), host="other-host")) is not None:
      assert time.time() < deadline, _holder(tmp_path)
      time.sleep(0.05)
    assert _holder(tmp_path)["token"] == lock.token


def test_the_lock_goes_when_a_run_fails_with_a_user_error(prepared_dir, tmp_path):
  cfg = train_config(prepared_dir)
  cfg.data.prepared_dir = str(tmp_path / "nothing-prepared-here")
  cfg.data.input = str(tmp_path / "no-such-corpus" / "*.txt")
  with pytest.raises(DataError):
    train.run(cfg, str(tmp_path / "run"))
  assert os.path.isdir(tmp_path / "run") and not os.path.exists(tmp_path / "run" / "lock.json")


def test_the_lock_on_object_storage(tmp_path):
  """gs:// through gcsfs against the GCS emulator started here (which
  ignores ifGenerationMatch: the existence check refuses the second run)."""
  script = textwrap.dedent("""
      import json, os, socket
      os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # no 60 s gRPC probe
      from gcp_storage_emulator.server import create_server
      with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
      server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
      server.start()
      os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
      import fsspec
      fsspec.config.conf["gcs"] = {"token": "anon"}
      from etils import epath
      from nitp_jax import workdir_lock
      from nitp_jax.errors import ConfigError
      path = epath.Path("gs://bucket/run/lock.json")
      try:
        lock = workdir_lock.WorkdirLock("gs://bucket/run")
        lock.acquire()
        assert json.loads(path.read_text())["token"] == lock.token
        try:
          workdir_lock.WorkdirLock("gs://bucket/run").acquire()
        except ConfigError as e:
          print("REFUSED", e)
        lock.refresh()
        lock.release()
        assert not path.exists()
        path.write_text(json.dumps({"host": "other-host", "pid": 7, "token": "old",
                                    "started": "2020-01-01T00:00:00+00:00",
                                    "heartbeat": "2020-01-01T00:00:00+00:00"}))
        with workdir_lock.WorkdirLock("gs://bucket/run") as lock:
          assert json.loads(path.read_text())["token"] == lock.token
        print("LEFT", fsspec.filesystem("gcs").find("bucket"))
      finally:
        server.stop()
  """)
  out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=180)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (f"REFUSED --workdir=gs://bucket/run is in use by another run: host "
          f"{socket.gethostname()}, pid ") in out.stdout, out.stdout
  assert "took over the lock of --workdir=gs://bucket/run from other-host pid 7" in out.stderr
  assert "LEFT []" in out.stdout, out.stdout
