"""gs:// workdirs and prepared data, against a real GCS emulator
(gcp-storage-emulator, in memory on 127.0.0.1, see tests/gcs_emulator.py)
started here: kill and resume
bitwise, prepared data uploaded once and reused, and one-line errors for what
cannot work (s3://, no credentials, no gcsfs)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from nitp_jax import errors
from nitp_jax import plot
from nitp_jax import storage
from nitp_jax import train
from nitp_jax.data import prepare
from tests.conftest import CORPUS_GLOB, VOCAB, train_config
from tests.helpers import tensorboard_view

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "nitp-test"
STEPS = 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  """The emulator's URL; this process's storage layer points at it too."""
  port = _free_port()
  log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port), BUCKET],
                          cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      break
    except OSError:
      assert proc.poll() is None and time.time() < deadline, "the emulator did not start"
      time.sleep(0.1)
  url = f"http://127.0.0.1:{port}"
  with pytest.MonkeyPatch.context() as mp:
    for name in storage.EMULATOR_ENV:
      mp.setenv(name, url)
    mp.setenv(storage.CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
    yield url
  proc.terminate()
  proc.wait(timeout=30)
  log.close()


def _env(**extra) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.update(extra)
  return env


def _train(config_file, workdir, env, cwd=ROOT) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "nitp_jax.train", f"--config={config_file}",
       f"--workdir={workdir}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=180) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _records(workdir, kind="train"):
  lines = storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines()
  return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _has_eval(workdir, step) -> bool:
  try:
    return any(r["step"] == step for r in _records(workdir, "eval"))
  except FileNotFoundError:
    return False


def _config(tmp_path, prepared: str, **train) -> str:
  path = tmp_path / "cfg.py"
  path.write_text(textwrap.dedent(f"""
      from tests.conftest import train_config
      def get_config():
        return train_config({prepared!r}, **{train!r})
  """))
  return str(path)


def test_gs_workdir_sigkill_resumes_bitwise(emulator, prepared_dir, tmp_path):
  cfg = _config(tmp_path, prepared_dir, steps=STEPS, checkpoint_every=4, eval_every=4,
                keep_checkpoints=10, log_every=1)
  whole, parts = f"gs://{BUCKET}/whole/run", f"gs://{BUCKET}/parts/run"
  rc, out, err = _finish(_train(cfg, whole, _env()))
  assert rc == 0 and f"done: step {STEPS}" in out, err[-3000:]

  run = _train(cfg, parts, _env())
  # Killed once step 4's checkpoint is committed and its eval record uploaded
  # (a kill between the two loses that eval record on any disk: the resumed
  # run starts after step 4).
  committed = storage.join(parts, "checkpoints", "4", "commit_success.txt")
  deadline = time.time() + 120
  while not (storage.exists(committed) and _has_eval(parts, 4)):
    assert run.poll() is None, run.communicate()[1][-3000:]
    assert time.time() < deadline, "timed out waiting for the checkpoint of step 4"
    time.sleep(0.2)
  run.send_signal(signal.SIGKILL)
  _finish(run)
  rc, out, err = _finish(_train(cfg, parts, _env()))
  assert rc == 0 and f"done: step {STEPS}" in out, err[-3000:]
  assert "resuming from step" in out, out

  a, b = _records(whole), _records(parts)
  assert [r["step"] for r in b] == list(range(1, STEPS + 1))
  for key in ("loss", "ntp", "nitp", "grad_norm", "lr"):
    assert [r[key] for r in a] == [r[key] for r in b], key
  assert [r["ntp"] for r in _records(whole, "eval")] == [r["ntp"] for r in
                                                         _records(parts, "eval")]
  # TensorBoard files are in the bucket and show each step once.
  local_tb = tmp_path / "tb"
  events = storage.glob(storage.join(parts, "tensorboard", "events.out.tfevents.*"))
  assert len(events) >= 2, events  # one per run at least
  for e in events:
    storage.download(e, str(local_tb / os.path.basename(e)))
  shown = tensorboard_view(str(local_tb), "train/loss")
  assert shown == [(r["step"], np.float32(r["loss"])) for r in b]
  assert [r for r in plot.read_records(parts) if r["kind"] == "train"] == b
  assert not os.path.exists(os.path.join(ROOT, "gs:")), "a local gs: folder was made"


def test_gs_prepared_dir_is_uploaded_once_and_reused(emulator, tmp_path, monkeypatch):
  prepared = f"gs://{BUCKET}/prepared/email"
  cfg = train_config(prepared, steps=2, checkpoint_every=100, eval_every=100)
  monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "host1"))
  first = train.run(cfg, str(tmp_path / "run1"))  # prepares, uploads, trains
  manifest = json.loads(storage.read_text(storage.join(prepared, "manifest.json")))
  names = ["manifest.json", "tokenizer.model"] + manifest["shards"]["train"] + \
      manifest["shards"]["validation"]
  fs = storage._fs()  # pylint: disable=protected-access
  generations = {n: fs.info(storage.join(prepared, n))["generation"] for n in names}

  # Another host (an empty cache) reuses the bucket's data, uploading nothing.
  host2 = tmp_path / "host2"
  monkeypatch.setenv(storage.CACHE_ENV, str(host2))
  second = train.run(cfg, str(tmp_path / "run2"))
  assert {n: fs.info(storage.join(prepared, n))["generation"] for n in names} == generations
  cached = host2 / "gs" / BUCKET / "prepared" / "email"
  for n in names:
    assert (cached / n).read_bytes() == fs.cat_file(storage.join(prepared, n)), n
  assert first["eval"] == second["eval"] and first["step"] == second["step"] == 2
  assert _local_losses(tmp_path / "run1") == _local_losses(tmp_path / "run2")
  # Other inputs are refused, naming the bucket's directory (not the cache).
  with pytest.raises(errors.DataError, match=f"'{prepared}' already holds data prepared "
                     "from other inputs .*val_fraction"):
    prepare.prepare(CORPUS_GLOB, prepared, VOCAB, val_fraction=0.2)


def _local_losses(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


def _one_line_error(proc, seconds, limit) -> str:
  rc, _, err = _finish(proc, timeout=120)
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
  assert seconds() < limit, f"took {seconds():.0f} s"
  return lines[0]


def test_s3_workdir_is_one_line(prepared_dir, tmp_path):
  cfg = _config(tmp_path, prepared_dir, steps=2)
  start = time.time()
  line = _one_line_error(_train(cfg, "s3://bucket/run", _env(), cwd=tmp_path),
                         lambda: time.time() - start, 60)
  assert "s3:// is not supported" in line and "Orbax" in line, line
  assert os.listdir(tmp_path) == ["cfg.py"]  # no local s3: folder


def test_missing_credentials_is_one_line_and_quick(prepared_dir, tmp_path):
  cfg = _config(tmp_path, prepared_dir, steps=2)
  env = _env(HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
  for name in storage.EMULATOR_ENV + ("GOOGLE_APPLICATION_CREDENTIALS",):
    env.pop(name, None)
  start = time.time()
  line = _one_line_error(_train(cfg, f"gs://{BUCKET}/run", env, cwd=tmp_path),
                         lambda: time.time() - start, 60)
  assert "gcloud auth application-default login" in line, line
  assert "GOOGLE_APPLICATION_CREDENTIALS" in line, line


def test_missing_gcsfs_names_the_install(prepared_dir, tmp_path):
  cfg = _config(tmp_path, prepared_dir, steps=2)
  script = textwrap.dedent(f"""
      import runpy, sys
      sys.modules["gcsfs"] = None  # as if it were not installed
      sys.argv = ["train", "--config={cfg}", "--workdir=gs://{BUCKET}/run"]
      runpy.run_module("nitp_jax.train", run_name="__main__")
  """)
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  start = time.time()
  line = _one_line_error(proc, lambda: time.time() - start, 60)
  assert f"pip install gcsfs=={storage.GCSFS_VERSION}" in line, line
