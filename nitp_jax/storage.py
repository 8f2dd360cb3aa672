"""The one path layer: local paths and `gs://` object storage.

Every module that names a run's files (layout, metrics_log, checkpoint,
data.prepare) goes through here. Local paths use `os` exactly as before;
`gs://` paths use `etils.epath`, whose fsspec backend is `gcsfs` (whole-object
transfers use that same gcsfs filesystem). Orbax writes checkpoints to `gs://`
through tensorstore. Other schemes (`s3://`, ...) are refused by `check`.

GCS objects cannot be appended to and appear whole when written: writers that
append (metrics.jsonl, TensorBoard) stage locally and upload whole files; data
that a library cannot read remotely (ArrayRecord shards) is copied to a local
cache (`cache_dir`).

A gs:// request that still fails after gcsfs's own retries (HTTP 5xx, 408,
429; a dropped connection; a timeout), or that is refused (401, 403, expired
credentials), raises a StorageError of one line naming the path, the cause
and what to do (`remote_failures`), from every function here that talks to GCS and
from reads of `open_binary`'s file. gcsfs's own log of such an error (a
traceback at ERROR) is dropped: the error reaches the caller, which reports it.

Emulator (tests, local trials): STORAGE_EMULATOR_HOST (gcsfs) and
TENSORSTORE_GCS_HTTP_URL (Orbax's tensorstore) both at its http://HOST:PORT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
from typing import Any, Iterator

from nitp_jax import errors
from nitp_jax import remote_failures
from nitp_jax.errors import StorageError

GCSFS_VERSION = "2026.10.1"  # requirements.txt
PROBE_TIMEOUT_S = 30         # a bucket that does not answer within this is an error
CACHE_ENV = "NITP_JAX_CACHE"  # root of local copies of remote data; ~/.cache/nitp_jax
EMULATOR_ENV = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")
_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
_checked: set[str] = set()  # buckets that passed `check` in this process


def is_remote(path: str) -> bool:
  """True for `scheme://...` paths (object storage), False for local ones."""
  return "://" in str(path)


def join(base: str, *parts: str) -> str:
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def absolute(path: str) -> str:
  """A local path made absolute; a remote one without a trailing slash."""
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def _gcsfs():
  """The gcsfs module, set up for this project: plain object access (no
  bucket-type probe over gRPC: against an emulator or without credentials it
  fails, and is retried with a warning on every call), no listing cache
  (Orbax writes behind gcsfs's back, through tensorstore, and other hosts
  write too), anonymous against an emulator."""
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  try:
    import gcsfs  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise StorageError(f"gs:// paths need gcsfs: pip install gcsfs=={GCSFS_VERSION}") from e
  import fsspec  # pylint: disable=import-outside-toplevel
  options = {"use_listings_cache": False}
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    options["token"] = "anon"
  fsspec.config.conf.setdefault("gs", {}).update(options)
  _quiet_reported_failures()
  return gcsfs


class _ReportedFailureFilter(logging.Filter):
  """Drops gcsfs's ERROR record (with its traceback) of a request that failed
  for good: the exception reaches our caller, which reports it in one line.
  Kept when absl logs at DEBUG."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info is None or logging.getLogger("absl").isEnabledFor(logging.DEBUG):
      return True
    message = record.getMessage()
    return not ("out of retries on exception" in message or
                "non-retriable exception" in message)


_filter_installed = False


def _quiet_reported_failures() -> None:
  global _filter_installed
  if not _filter_installed:
    logging.getLogger("gcsfs").addFilter(_ReportedFailureFilter())
    _filter_installed = True


@contextlib.contextmanager
def _failures_as_errors(path: str, action: str = "reading") -> Iterator[None]:
  """Turn a gs:// request that failed for good into a one-line StorageError
  (remote_failures); other errors pass unchanged."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # classified, else re-raised
    failed = remote_failures.as_storage_error(e, path, action)
    if failed is None or failed is e:
      raise
    raise failed from e


class _RemoteFile:
  """A gcsfs file whose reads raise `_failures_as_errors`'s StorageError
  (pyarrow passes a Python exception from `read` through unchanged)."""

  def __init__(self, f, path: str):
    self._f, self._path = f, path

  def read(self, *args) -> bytes:
    with _failures_as_errors(self._path):
      return self._f.read(*args)

  def readinto(self, buffer) -> int:  # io.BufferedReader's read
    with _failures_as_errors(self._path):
      return self._f.readinto(buffer)

  def seek(self, *args) -> int:
    with _failures_as_errors(self._path):
      return self._f.seek(*args)

  def __getattr__(self, name: str) -> Any:
    return getattr(self._f, name)

  def __enter__(self) -> "_RemoteFile":
    return self

  def __exit__(self, *exc) -> None:
    self._f.close()


def _fs():
  """A gcsfs filesystem, configured as the one etils.epath opens (both take
  fsspec's config)."""
  _gcsfs()
  import fsspec  # pylint: disable=import-outside-toplevel
  return fsspec.filesystem("gs")


def _epath(path: str):
  if is_remote(path):
    _gcsfs()
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path)


def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  with _failures_as_errors(path):
    return _epath(path).exists()


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  with _failures_as_errors(path):
    return _epath(path).is_dir()


def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  with _failures_as_errors(path):
    return _epath(path).is_file()


def size(path: str) -> int:
  """A file's size in bytes."""
  if not is_remote(path):
    return os.path.getsize(path)
  with _failures_as_errors(path):
    return _fs().size(path)


def glob(pattern: str) -> list[str]:
  if not is_remote(pattern):
    import glob as glob_lib  # pylint: disable=import-outside-toplevel
    return glob_lib.glob(pattern)
  with _failures_as_errors(pattern, "listing"):
    return ["gs://" + p for p in _fs().glob(pattern)]


def open_binary(path: str):
  """A seekable binary file: local, or a gs:// object fetched in exactly the
  ranges read, no read-ahead (a Parquet reader fetches only the footer and
  the row groups it reads; fsspec's default read-ahead cache also leaves a
  pending prefetch task behind)."""
  if not is_remote(path):
    return open(path, "rb")
  with _failures_as_errors(path):
    return _RemoteFile(_fs().open(path, "rb", cache_type="none"), path)


def makedirs(path: str) -> None:
  """Create a local directory (and parents); nothing to do on object storage,
  where directories are name prefixes."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
  if is_remote(path):
    with _failures_as_errors(path):
      return _epath(path).read_text(encoding="utf-8")
  with open(path, encoding="utf-8") as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  if is_remote(path):
    with _failures_as_errors(path):
      return _fs().cat_file(path)
  with open(path, "rb") as f:
    return f.read()


def write_text(path: str, text: str) -> None:
  """Write a whole file atomically: a reader sees the old or the new text.
  (Locally through a temporary file and a rename; an object always appears
  whole.)"""
  if is_remote(path):
    with _failures_as_errors(path, "writing"):
      _epath(path).write_text(text, encoding="utf-8")
    return
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def remove(path: str) -> None:
  if is_remote(path):
    with _failures_as_errors(path, "deleting"):
      _fs().rm_file(path)
  else:
    os.remove(path)


def upload(local_path: str, remote_path: str) -> None:
  """Copy a local file to an object (replacing it whole)."""
  with _failures_as_errors(remote_path, "writing"):
    _fs().put_file(local_path, remote_path)


def download(remote_path: str, local_path: str) -> None:
  """Copy an object to a local file, atomically (a partial download is never
  seen under `local_path`, even with several processes on one host)."""
  os.makedirs(os.path.dirname(local_path) or ".", exist_ok=True)
  tmp = f"{local_path}.download-{os.getpid()}"
  try:
    with _failures_as_errors(remote_path):
      _fs().get_file(remote_path, tmp)
    os.replace(tmp, local_path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def upload_tree(local_dir: str, remote_dir: str, last: tuple[str, ...] = ()) -> None:
  """Copy every file under `local_dir` to `remote_dir`; the names in `last`
  (relative paths, e.g. a manifest that marks the copy complete) go last."""
  names = []
  for root, _, files in os.walk(local_dir):
    names += [os.path.relpath(os.path.join(root, f), local_dir) for f in files]
  for name in sorted(names, key=lambda n: (n in last, n)):
    upload(os.path.join(local_dir, name), posixpath.join(remote_dir, *name.split(os.sep)))


def cache_dir(remote_path: str) -> str:
  """This machine's copy of a remote path: $NITP_JAX_CACHE (default
  ~/.cache/nitp_jax)/<scheme>/<bucket>/<key>."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                   "nitp_jax")
  scheme, _, rest = absolute(remote_path).partition("://")
  return os.path.join(root, scheme, *rest.split("/"))


_copied: dict[str, Any] = {}  # gs:// path -> the generation this process downloaded


def local_copy(path: str) -> str:
  """A local path to read `path` from: itself, or (remote) its cached
  download, fetched once per process and object generation (a run asks for
  its tokenizer several times as it starts)."""
  if not is_remote(path):
    return path
  local = cache_dir(path)
  with _failures_as_errors(path):
    generation = _fs().info(path).get("generation")
  if generation is None or _copied.get(path) != generation or not os.path.isfile(local):
    download(path, local)
    _copied[path] = generation
  return local


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
  """Raise these loggers' level while probing: their retries and fallbacks
  would print warnings (and tracebacks) around the one line we report."""
  saved = {name: logging.getLogger(name).level for name in loggers}
  for name in loggers:
    logging.getLogger(name).setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for name, level in saved.items():
      logging.getLogger(name).setLevel(level)


def check(path: str) -> None:
  """Nothing for a local path; for object storage, StorageError (one line)
  unless this machine can use it: the scheme is gs://, gcsfs is installed,
  credentials exist (or an emulator is set) and the bucket answers. A bucket
  that passed is not probed again by this process."""
  if not is_remote(path) or _bucket(path) in _checked:
    return
  scheme = path.partition("://")[0]
  if scheme != "gs":
    raise StorageError(
        f"{path}: {scheme}:// is not supported, only gs:// (Orbax 0.12.8, which writes the "
        "checkpoints, rejects such paths: 'Checkpoint path should be absolute'); use "
        "gs://BUCKET/... or a local or mounted directory")
  _gcsfs()
  emulator = [name for name in EMULATOR_ENV if os.environ.get(name)]
  if len(emulator) == 1:
    other = next(n for n in EMULATOR_ENV if n not in emulator)
    raise StorageError(f"{emulator[0]} is set but {other} is not: for a GCS emulator set "
                       "both to its http://HOST:PORT (gcsfs reads the first, Orbax's "
                       "tensorstore the second); for real GCS set neither")
  if not emulator:
    _check_credentials(path)
  _probe(path)
  _checked.add(_bucket(path))


def _bucket(path: str) -> str:
  """'gs://bkt' of 'gs://bkt/a/b'."""
  scheme, _, rest = path.partition("://")
  return f"{scheme}://{rest.split('/', 1)[0]}"


def _check_credentials(path: str) -> None:
  import google.auth  # pylint: disable=import-outside-toplevel
  from google.auth import exceptions  # pylint: disable=import-outside-toplevel
  try:
    with _quiet("google.auth", "google.auth._default", "google.auth.compute_engine._metadata"):
      google.auth.default(scopes=[_SCOPE])
  except exceptions.DefaultCredentialsError as e:
    given = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    detail = f" ({errors.one_line(e)[:200]})" if given else ""
    raise StorageError(
        f"no Google Cloud credentials for {path}{detail}: run `gcloud auth "
        "application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a "
        "service-account key file (GCE and TPU VMs use their service account)") from e


def _probe(path: str) -> None:
  """List at most one object under `path`, within PROBE_TIMEOUT_S: the bucket
  exists and these credentials may list it."""
  import fsspec.asyn  # pylint: disable=import-outside-toplevel
  import fsspec.exceptions  # pylint: disable=import-outside-toplevel
  fs = _fs()
  bucket, _, key = absolute(path)[len("gs://"):].partition("/")
  try:
    with _quiet("gcsfs", "google.auth"):
      fsspec.asyn.sync(fs.loop, fs._call, "GET", "b/{}/o", bucket,  # pylint: disable=protected-access
                       prefix=key, maxResults=1, json_out=True, timeout=PROBE_TIMEOUT_S)
  except fsspec.exceptions.FSTimeoutError as e:
    raise StorageError(f"gs://{bucket} did not answer within {PROBE_TIMEOUT_S} s: check the "
                       "network (and STORAGE_EMULATOR_HOST if you use an emulator)") from e
  except FileNotFoundError as e:
    raise StorageError(f"bucket gs://{bucket} does not exist: create it (gcloud storage "
                       f"buckets create gs://{bucket}) or fix the path {path}") from e
  except Exception as e:  # pylint: disable=broad-except  # 401/403, connection errors
    if (remote_failures.classify(e) or ("",))[0] == remote_failures.TRANSIENT:
      raise remote_failures.as_storage_error(e, f"gs://{bucket}", "listing") from e
    raise StorageError(f"cannot use {path} ({type(e).__name__}: {errors.one_line(e)[:200]}): "
                       "check the bucket name and that your credentials may read and write "
                       "it") from e


def epath(path: str):
  """An etils.epath.Path for `path` (for gs://, set up as this module uses it)."""
  return _epath(path)
