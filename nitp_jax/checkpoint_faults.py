"""What went wrong with a checkpoint, in one line, and what may be done
about it: restore failures sorted into damaged / mismatched / unknown,
damaged checkpoints moved aside, a failed save's cause found, and the noise
Orbax and tensorstore print after a failed save kept off the console.

How Orbax 0.12.8 (tensorstore 0.1.86) reports a restore that fails, as
checked by damaging a real checkpoint (tests/test_checkpoint_faults.py):

  damaged (moved aside)
    data file truncated, overwritten or deleted   ValueError "OUT_OF_RANGE: ..."
                                                  / "FAILED_PRECONDITION: ..."
                                                  (tensorstore, under "Encountered
                                                  error while reading array index")
    state/manifest.ocdbt or state/d/* damaged     ValueError "NOT_FOUND: ..." /
                                                  "OUT_OF_RANGE: ..."
    state/_METADATA, config/metadata or the data- JSONDecodeError
    iterator file overwritten
    config/metadata deleted                       FileNotFoundError
    data-iterator file deleted                    ValueError "File ... does not exist."
    state/ deleted                                KeyError 'Item "state" was not found'
  mismatched (never moved)
    other tree (layers, MoE, router bias)         ValueError "... tree structures do
                                                  not match"
    other shape                                   ValueError "Requested shape ... is not
                                                  compatible with the stored shape"
    state/_METADATA deleted                       ValueError "pytree structure error"
                                                  (indistinguishable from a real
                                                  mismatch: not moved)
  anything else (permissions, network, timeouts;  unknown: never moved
  config/metadata replaced by a directory gives
  IsADirectoryError)

Unchanged restores: deleting _CHECKPOINT_METADATA, state/array_metadatas or
damaging state/_sharding does not stop a restore.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging as py_logging
import os
import re
import sys
import warnings
from typing import Iterator

from etils import epath

DAMAGED, MISMATCHED, UNKNOWN = "damaged", "mismatched", "unknown"
KINDS = (DAMAGED, MISMATCHED, UNKNOWN)  # in order of severity


class FailedElsewhere(Exception):
  """A restore that another process of the run could not do (`kind`)."""

  def __init__(self, kind: str):
    super().__init__(f"another process could not restore it ({kind}; see its log)")
    self.kind = kind

_MISMATCH = re.compile(r"tree structures do not match|is not compatible with the stored shape"
                       r"|pytree structure error")
# tensorstore status codes of data that is not there or cannot be decoded;
# not UNAVAILABLE / DEADLINE_EXCEEDED / PERMISSION_DENIED / RESOURCE_EXHAUSTED
# (the storage, not the checkpoint) nor INVALID_ARGUMENT (could be our request).
_DAMAGE = re.compile(r"^(OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|NOT_FOUND): "
                     r"|^File .* does not exist\.|Item \"?'?\w+\"?'? was not found in the checkpoint")
_TENSORSTORE_TAIL = re.compile(r"\s*\[(tensorstore_spec|source locations)=.*$", re.S)
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")


def _chain(error: BaseException) -> Iterator[BaseException]:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def classify_restore_error(error: BaseException) -> str:
  """DAMAGED (the files are missing or unreadable), MISMATCHED (the train
  state asked for differs from the one saved) or UNKNOWN."""
  if isinstance(error, FailedElsewhere):
    return error.kind
  texts = [str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
           for e in _chain(error)]
  if any(_MISMATCH.search(t) for t in texts):
    return MISMATCHED
  for e, text in zip(_chain(error), texts):
    if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError)):
      return DAMAGED
    if _DAMAGE.search(text.strip()):
      return DAMAGED
  return UNKNOWN


def cause(error: BaseException, limit: int = 300) -> str:
  """'Type: first line' of the innermost exception that says something,
  without tensorstore's spec dump."""
  for e in reversed(list(_chain(error))):
    text = (str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)).strip()
    if text and not isinstance(e, StopIteration):
      text = _TENSORSTORE_TAIL.sub("", text.splitlines()[0])
      return f"{type(e).__name__}: {text}"[:limit]
  return type(error).__name__


def save_failure_cause(error: BaseException) -> str:
  """The operating-system error under a failed save ('OSError: [Errno 28]
  No space left on device'), else `cause(error)`."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno:
      return f"OSError: [Errno {e.errno}] {os.strerror(e.errno)}"
    match = _OS_ERROR_CODE.search(str(e))
    if match:
      code = int(match.group(1))
      return f"OSError: [Errno {code}] {os.strerror(code)}"
  return cause(error)


def move_aside(step_dir: str) -> str:
  """Rename a damaged checkpoint `<dir>/<step>` to `<dir>/<step>.corrupt-<UTC
  time>` (a name Orbax never lists as a step) and return the new path."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  source = epath.Path(step_dir)
  target = source.parent / f"{source.name}.corrupt-{stamp}"
  source.rename(target)
  return os.fspath(target)


def remove_partial_save(directory: str, step: int) -> list[str]:
  """Delete what a failed save of `step` left (`<step>.orbax-checkpoint-tmp*`);
  the paths removed."""
  removed = []
  for path in epath.Path(directory).glob(f"{step}.orbax-checkpoint-tmp*"):
    path.rmtree() if path.is_dir() else path.unlink(missing_ok=True)
    removed.append(os.fspath(path))
  return removed


# ---- the noise of a failed save ----
#
# When one write of an async save fails, Orbax logs the exception at ERROR
# with its traceback from four threads, then re-raises it to the caller of
# save() / wait_until_finished() (Checkpointer turns that into one line). The
# other writes were running on an event loop that Orbax has closed by then:
# their tensorstore callbacks raise RuntimeError('Event loop is closed')
# into sys.unraisablehook, and when their coroutines and gathering futures
# are collected they print more tracebacks (at exit: hundreds of lines).

def _from_orbax(tb) -> bool:
  while tb is not None:
    if "/orbax/checkpoint/" in tb.tb_frame.f_code.co_filename:
      return True
    tb = tb.tb_next
  return False


class _OrbaxTracebackFilter(py_logging.Filter):
  """Drops log records with a traceback raised in Orbax (the exception
  reaches our code, which reports it), unless debug logging is on."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if py_logging.getLogger("absl").isEnabledFor(py_logging.DEBUG):
      return True
    exc = record.exc_info
    if exc and exc[1] is not None and record.levelno >= py_logging.ERROR:
      return not (_from_orbax(exc[2]) or "/orbax/checkpoint/" in record.pathname)
    return True


def _closed_loop_noise(unraisable) -> bool:
  value, obj = unraisable.exc_value, unraisable.object
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return True
  code = getattr(obj, "cr_code", None)
  return code is not None and "/orbax/checkpoint/" in code.co_filename


_installed = False


def quiet_failed_save_noise() -> None:
  """Install (once per process) the filters for the noise described above."""
  global _installed
  if _installed:
    return
  _installed = True
  orbax_filter = _OrbaxTracebackFilter()
  for name in ("absl", "asyncio"):
    py_logging.getLogger(name).addFilter(orbax_filter)
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _closed_loop_noise(unraisable):
      previous(unraisable)
  sys.unraisablehook = hook


def collect_orphaned_writes() -> None:
  """Finalize now, while the filters are installed, the coroutines and
  futures a failed save orphaned (else they print at interpreter exit).
  Writes that Orbax had not started when the loop closed may stay referenced
  until exit and then warn "coroutine ... was never awaited": after a failed
  save that warning says nothing the one-line error does not, so it is
  ignored from here on (the run is about to stop)."""
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)
  gc.collect()
