"""gs:// requests that fail for good end in one line: real 5xx / 401 / 403
answers and dropped connections from a proxy (tests/gcs_faults.py) between
gcsfs and the GCS emulator of tests/test_object_storage.py."""

import os
import textwrap
import time

import fsspec.asyn
import pytest

from nitp_jax import errors
from nitp_jax import remote_failures
from nitp_jax import storage
from nitp_jax.data import streaming
from tests.gcs_faults import DROP, FaultProxy
from tests.test_object_storage import BUCKET, emulator  # noqa: F401  # pylint: disable=unused-import
from tests.test_object_storage import _env, _finish, _one_line_error, _train
from tests.test_streaming import corpus, gs_corpus, tokenizer_path  # noqa: F401  # pylint: disable=unused-import

OBJECT = f"gs://{BUCKET}/faults/doc.jsonl"


@pytest.fixture
def proxy(emulator, monkeypatch):  # pylint: disable=redefined-outer-name
  """gcsfs of this process (and of child processes given
  STORAGE_EMULATOR_HOST=proxy.url) goes through a FaultProxy; OBJECT exists."""
  p = FaultProxy(emulator)
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", p.url)
  storage.write_text(OBJECT, '{"text": "one"}\n{"text": "two"}\n')
  yield p
  p.close()


def _unretried(path: str) -> Exception:
  """What one GET of `path` raises, without gcsfs's retries around it: the
  retry loop re-raises the last error unchanged, after 31-36 s of backoff
  (checked: a 503 through storage.read_bytes took 6 requests and 34 s)."""
  fs = storage._fs()  # pylint: disable=protected-access
  bucket, key = path[len("gs://"):].split("/", 1)
  with pytest.raises(Exception) as e:
    fsspec.asyn.sync(fs.loop, type(fs)._request.__wrapped__, fs, "GET", "b/{}/o/{}",  # pylint: disable=protected-access
                     bucket, key, alt="media")
  return e.value


@pytest.mark.parametrize("status,kind,cause", [
    (503, remote_failures.TRANSIENT, "HTTP 503: We encountered an internal error"),
    (500, remote_failures.TRANSIENT, "HTTP 500: error"),
    (429, remote_failures.TRANSIENT, "HTTP 429: The rate of change"),
    (502, remote_failures.TRANSIENT, "HTTP 502: bad gateway"),
    (DROP, remote_failures.TRANSIENT, "ServerDisconnectedError: Server disconnected"),
    (401, remote_failures.PERMISSION, "HTTP 401: Anonymous caller does not have"),
    (403, remote_failures.PERMISSION, "HTTP 403: test@example.iam.gserviceaccount.com does "
     "not have storage.objects.get access")])
def test_what_gcsfs_raises_is_classified(proxy, status, kind, cause):  # pylint: disable=redefined-outer-name
  proxy.fail(status, "faults/doc.jsonl")
  error = _unretried(OBJECT)
  assert remote_failures.classify(error)[0] == kind
  message = errors.one_line(remote_failures.as_storage_error(error, OBJECT))
  assert message.startswith(f"reading {OBJECT} ") and cause in message, message
  hint = "rerun the same command" if kind == remote_failures.TRANSIENT else "credentials"
  assert hint in message and "\n" not in str(remote_failures.as_storage_error(error, OBJECT))
  assert remote_failures.classify(FileNotFoundError(OBJECT)) is None  # callers handle these
  assert remote_failures.classify(OSError(28, "No space left on device")) is None


@pytest.mark.parametrize("status", [401, 403])
def test_refused_reads_and_writes_are_one_line_and_quick(proxy, status, caplog, tmp_path):  # pylint: disable=redefined-outer-name
  """Every way the storage layer reads an object, and writes one: gcsfs does
  not retry these, and its traceback log is kept off the console."""
  f = storage.open_binary(OBJECT)  # opened before the fault: its reads fail
  proxy.fail(status, "faults/doc.jsonl")
  start = time.time()
  reads = {"read_bytes": lambda: storage.read_bytes(OBJECT),
           "read_text": lambda: storage.read_text(OBJECT),
           "isfile": lambda: storage.isfile(OBJECT),
           "size": lambda: storage.size(OBJECT),
           "download": lambda: storage.download(OBJECT, str(tmp_path / "copy")),
           "open_binary": lambda: storage.open_binary(OBJECT),
           "open_binary().read": lambda: f.read(5)}
  for name, read in reads.items():
    with pytest.raises(errors.StorageError) as e:
      read()
    assert str(e.value).startswith(f"reading {OBJECT} was refused (HTTP {status}: "), name
    assert "credentials" in str(e.value) and "\n" not in str(e.value), name
  proxy.fail(status, "uploadType")  # uploads name the object in their body
  with pytest.raises(errors.StorageError, match=f"^writing {OBJECT} was refused"):
    storage.write_text(OBJECT, "new")
  assert time.time() - start < 10
  assert not [r for r in caplog.records if r.exc_info], "gcsfs logged a traceback"


def test_a_refused_corpus_file_stops_the_read_instead_of_being_skipped(proxy):  # pylint: disable=redefined-outer-name
  """A 403 is an OSError: it must not pass for an unreadable (bad) file."""
  unit = streaming.Unit(OBJECT)
  assert [d for _, d in streaming.read_documents(unit, "text")] == ["one", "two"]
  proxy.fail(403, "faults/doc.jsonl")
  with pytest.raises(errors.StorageError, match=f"^reading {OBJECT} was refused"):
    list(streaming.read_documents(unit, "text"))


def test_a_refusal_between_range_reads_of_a_jsonl_stops_the_read(proxy):  # pylint: disable=redefined-outer-name
  """JSONL is read in ranges (line_stream): a refusal after the first range
  is the one-line StorageError too, not 'lines from N on cannot be read'."""
  big = f"gs://{BUCKET}/faults/big.jsonl"
  line = '{"text": "%s"}\n' % ("x" * 1000)
  storage.write_text(big, line * (6 * 1024))  # ~6 MiB: two 4 MiB ranges
  docs = streaming.read_documents(streaming.Unit(big), "text")
  next(docs)  # the first range is read
  proxy.fail(403, "faults/big.jsonl")
  with pytest.raises(errors.StorageError, match=f"^reading {big} was refused"):
    list(docs)


GS_STEPS = 24


def test_a_run_whose_reads_fail_stops_in_one_line_and_resumes(gs_corpus, proxy, tmp_path):  # pylint: disable=redefined-outer-name
  """A streaming run from gs:// whose corpus reads are refused mid-run exits
  with one `error:` line naming the object; rerun once they pass again, it
  resumes from its last checkpoint and completes."""
  config_file = tmp_path / "cfg.py"
  config_file.write_text(textwrap.dedent(f"""
      from tests.test_streaming import _gs_config
      def get_config():
        c = _gs_config({gs_corpus!r}, shuffle_window=4)  # reads as it trains
        c.train.update(steps={GS_STEPS}, checkpoint_every=2, eval_every=1000,
                       keep_checkpoints=2, log_every=1, eval_batches=1, geometry_every=0)
        return c
  """))
  workdir = str(tmp_path / "run")
  env = _env(STORAGE_EMULATOR_HOST=proxy.url)
  run = _train(str(config_file), workdir, env)
  deadline = time.time() + 120
  while not os.path.isdir(os.path.join(workdir, "checkpoints", "2")):
    assert run.poll() is None, run.communicate()[1][-3000:]
    assert time.time() < deadline, "timed out waiting for the checkpoint of step 2"
    time.sleep(0.02)
  proxy.fail(403, "/streaming/")
  start = time.time()
  line = _one_line_error(run, lambda: time.time() - start, 60)
  assert f"gs://{BUCKET}/streaming/" in line and "was refused (HTTP 403" in line, line
  assert "rerun the same command" in line, line

  proxy.clear()
  rc, out, err = _finish(_train(str(config_file), workdir, env))
  assert rc == 0 and f"done: step {GS_STEPS}" in out and "resuming from step" in out, err[-3000:]
  assert proxy.count("GET", "streaming/tokenizer.model?alt=media") == 2  # once per run


def test_a_refused_checkpoint_save_is_one_line(proxy, tmp_path):  # pylint: disable=redefined-outer-name
  """Orbax's writes to gs:// refused: checkpoint.py's one line of a failed
  save, even though listing the checkpoints fails too."""
  import grain  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from nitp_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from tests.conftest import train_config  # pylint: disable=import-outside-toplevel
  ckpt = checkpoint.Checkpointer(f"gs://{BUCKET}/faults/run", keep=2)
  data = iter(grain.MapDataset.range(4).to_iter_dataset())
  state, cfg = {"w": jnp.ones((2, 2))}, train_config(str(tmp_path))
  ckpt.save(1, state, data, cfg)
  ckpt.wait()
  proxy.fail(403, "")
  with pytest.raises(errors.CheckpointError) as e:
    ckpt.save(2, state, data, cfg)
    ckpt.wait()
  proxy.clear()
  ckpt.close()
  message = str(e.value)
  assert message.startswith("saving the checkpoint of step 2 failed: HTTP 403: "), message
  assert "credentials may write there, then rerun the same command" in message, message
  assert "\n" not in message


def test_a_gs_tokenizer_is_downloaded_once_per_generation(proxy, tokenizer_path):  # pylint: disable=redefined-outer-name
  """A streaming run asks for its gs:// tokenizer several times as it starts
  (held-out set, train iterator): one download, until the object changes."""
  from nitp_jax.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel
  path = f"gs://{BUCKET}/faults/tokenizer.model"
  storage.upload(tokenizer_path, path)
  downloads = lambda: proxy.count("GET", "faults/tokenizer.model?alt=media")
  local = tok_lib.local_tokenizer(path)
  assert tok_lib.local_tokenizer(path) == local and downloads() == 1
  storage.upload(tokenizer_path, path)  # the same bytes, a new generation
  assert tok_lib.local_tokenizer(path) == local and downloads() == 2
  assert tok_lib.load_tokenizer(local).vocab_size > 0
