"""One training run per workdir: `<workdir>/lock.json`, taken by process 0
of a run before it writes anything else and removed when the run ends.

The lock file holds who owns it (host, pid, the process's start time and
boot id where /proc has them, a random token) and when (started, heartbeat).
The owner rewrites the heartbeat every `HEARTBEAT_S` seconds from a daemon
thread. Another run refuses the workdir with one line naming the owner,
unless the lock is stale:

  same host    the owning pid is gone, or it is another process now (its
               start time differs: the pid was reused), or the host rebooted
  other host   the heartbeat is older than `STALE_AFTER_S` (10 minutes)

A stale lock is taken over with a warning. To take over a lock by hand
(e.g. a run on another host that you know is dead, before 10 minutes have
passed), delete `<workdir>/lock.json`.

Guarantees. On a local or NFS-like disk the lock is created with O_EXCL: of
two runs starting at once exactly one gets it, and a stale lock is claimed
by an atomic rename. On gs:// the lock is created with gcsfs's exclusive
mode (`ifGenerationMatch=0`: GCS refuses to create an object that exists,
gcsfs raises FileExistsError), after an existence check and followed by a
read-back; a store that ignores the precondition (the GCS emulator) narrows
to the window between that check and the write. Not guaranteed: on object
storage a stale lock is re-read, deleted and created anew (there is no
atomic rename), so two runs taking over the same stale lock at the same
moment can both proceed; the other-host staleness test compares the clocks
of two hosts (keep them within a few minutes of each other); several
containers sharing one host name and boot but not their pid namespace look
like one host (a holder's pid is then judged in the wrong namespace).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import uuid
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath

from nitp_jax import remote_failures
from nitp_jax.errors import ConfigError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.timezone.utc)


def _iso(t: datetime.datetime) -> str:
  return t.isoformat(timespec="seconds")


def process_start_time(pid: int) -> int | None:
  """Start time of `pid` in clock ticks since boot (field 22 of
  /proc/<pid>/stat); None without /proc or when there is no such process."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) is in parentheses and may hold spaces.
  return int(stat.rsplit(")", 1)[1].split()[19])


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
      return f.read().strip()
  except OSError:
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _is_time(text: Any) -> bool:
  try:
    datetime.datetime.fromisoformat(text)
  except (TypeError, ValueError):
    return False
  return True


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def create_exclusive(path: epath.Path, data: bytes) -> None:
  """Write a new file; FileExistsError if `path` exists. Local disks:
  O_CREAT | O_EXCL. Object storage: fsspec's exclusive mode "xb" (gcsfs sends
  ifGenerationMatch=0 and maps GCS's 412 to FileExistsError; epath's own
  open() has no "x" mode), after an existence check for stores that ignore
  that precondition."""
  name = os.fspath(path)
  if _is_local(path):
    with os.fdopen(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
      f.write(data)
    return
  fs = epath.backend.fsspec_backend.fs(name)
  if fs.exists(name):  # for stores that ignore the precondition (the GCS emulator)
    raise FileExistsError(name)
  with fs.open(name, "xb") as f:
    f.write(data)


def stale_reason(holder: dict[str, Any], now: datetime.datetime | None = None) -> str | None:
  """Why the lock `holder` wrote is stale, or None while it is held."""
  now = now or _now()
  if holder.get("host") == socket.gethostname():
    boot = _boot_id()
    if holder.get("boot_id") and boot and holder["boot_id"] != boot:
      return "this host rebooted since"
    try:
      pid = int(holder.get("pid", -1))
    except (TypeError, ValueError):
      return f"its pid {holder.get('pid')!r} is not a number"
    if pid <= 0 or not _pid_alive(pid):
      return f"process {pid} is gone"
    started = process_start_time(pid)
    if holder.get("process_start") is not None and started is not None and (
        started != holder["process_start"]):
      return f"pid {pid} is another process now"
    return None
  if not _is_time(holder.get("heartbeat")):
    return "it has no readable heartbeat"
  beat = datetime.datetime.fromisoformat(holder["heartbeat"])
  if beat.tzinfo is None:
    beat = beat.replace(tzinfo=datetime.timezone.utc)
  age = (now - beat).total_seconds()
  if age > STALE_AFTER_S:
    return f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
  return None


class WorkdirLock:
  """`with WorkdirLock(workdir):` (or acquire()/release()) holds the workdir
  for this process; ConfigError when another live run holds it."""

  def __init__(self, workdir: str):
    self.workdir = str(workdir)
    self.path = epath.Path(workdir) / LOCK_FILE
    self.token = uuid.uuid4().hex
    self.lost = False
    self._record: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def _new_record(self) -> dict[str, Any]:
    now = _iso(_now())
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "process_start": process_start_time(os.getpid()), "boot_id": _boot_id(),
            "started": now, "heartbeat": now, "token": self.token}

  def _read(self, path: epath.Path | None = None) -> dict[str, Any] | None:
    """The lock's record; None when there is no lock file; {} when it
    cannot be parsed (half written, or not ours)."""
    try:
      text = (path or self.path).read_text()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
    except ValueError:
      return {}
    return record if isinstance(record, dict) else {}

  def _create(self, record: dict[str, Any]) -> bool:
    """Create the lock file holding `record` unless one exists; then read it
    back. False when another run's lock is there."""
    try:
      create_exclusive(self.path, (json.dumps(record, indent=2) + "\n").encode())
    except FileExistsError:
      return False
    return (self._read() or {}).get("token") == self.token

  def acquire(self) -> None:
    """Take the lock, taking over a stale one (with a warning)."""
    record = self._new_record()
    for _ in range(3):  # a lock can vanish between our create and our read
      if self._create(record):
        break
      holder = self._read()
      if holder is None:
        continue
      if holder == {}:
        holder = self._unreadable_holder()
      elif not _is_time(holder.get("heartbeat")):  # not written by us: judge by its age
        holder = dict(holder, heartbeat=self._unreadable_holder()["heartbeat"])
      reason = stale_reason(holder)
      if reason is None:
        raise ConfigError(self._in_use_message(holder))
      self._take_over(holder, reason, record)
      break
    else:
      raise ConfigError(f"could not create {self.path} (it keeps appearing and vanishing): "
                        "is another run starting on this --workdir? Retry, or use another "
                        "--workdir")
    self._record = record
    self._thread = threading.Thread(target=self._beat, name="workdir_lock_heartbeat",
                                    daemon=True)
    self._thread.start()

  def _unreadable_holder(self) -> dict[str, Any]:
    """A lock file that does not parse: being written right now, or damaged.
    Its modification time stands in for the heartbeat."""
    try:
      mtime = self.path.stat().mtime
    except FileNotFoundError:
      mtime = 0.0
    beat = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
    return {"host": "(unreadable lock file)", "pid": "?", "started": _iso(beat),
            "heartbeat": _iso(beat)}

  def _take_over(self, holder: dict[str, Any], reason: str, record: dict[str, Any]) -> None:
    self._remove_stale(holder)
    if not self._create(record):
      raise ConfigError(self._in_use_message(self._read() or {}))
    logging.warning("took over the lock of --workdir=%s from %s pid %s (since %s): %s",
                    self.workdir, holder.get("host"), holder.get("pid"),
                    holder.get("started"), reason)

  def _remove_stale(self, holder: dict[str, Any]) -> None:
    """Remove the lock judged stale, unless another run replaced it first
    (then ConfigError naming that run). Local disks: an atomic rename claims
    it. Object storage (no atomic rename): read it again, then delete it."""
    if not _is_local(self.path):
      current = self._read() or {}
      if current.get("token") != holder.get("token"):
        raise ConfigError(self._in_use_message(current))
      self.path.unlink(missing_ok=True)
      return
    aside = self.path.parent / f"{LOCK_FILE}.stale-{self.token}"
    try:
      self.path.rename(aside)
    except FileNotFoundError:  # another run removed it first; the create decides
      return
    moved = self._read(aside) or {}
    if moved.get("token") != holder.get("token"):
      # Another run took over first and we moved its fresh lock: put it back.
      try:
        create_exclusive(self.path, aside.read_bytes())
      except FileExistsError:
        pass
      aside.unlink(missing_ok=True)
      raise ConfigError(self._in_use_message(moved))
    aside.unlink(missing_ok=True)

  def _in_use_message(self, holder: dict[str, Any]) -> str:
    return (f"--workdir={self.workdir} is in use by another run: host {holder.get('host')}, "
            f"pid {holder.get('pid')}, since {holder.get('started')} (last heartbeat "
            f"{holder.get('heartbeat')}). Wait for it to finish or stop it, or use another "
            f"--workdir; if that run is dead on another host, delete {self.path} (it is "
            f"taken over by itself {STALE_AFTER_S / 60:.0f} minutes after its last heartbeat)")

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self.refresh()
      except Exception as e:  # pylint: disable=broad-except  # keep training
        logging.warning("could not refresh the heartbeat of %s: %s", self.path, e)

  def refresh(self) -> None:
    """Rewrite the heartbeat (the daemon thread does this every HEARTBEAT_S)."""
    if self._record is None or self.lost:
      return
    current = self._read()
    if (current or {}).get("token") != self.token:
      self.lost = True
      logging.error("the lock %s is no longer this run's (now: %s): another run may be "
                    "writing this workdir", self.path, current)
      return
    self._record["heartbeat"] = _iso(_now())
    text = json.dumps(self._record, indent=2) + "\n"
    if _is_local(self.path):  # readers never see half a file
      tmp = self.path.parent / f"{LOCK_FILE}.{self.token}.tmp"
      tmp.write_text(text)
      tmp.replace(self.path)
    else:  # an object is replaced whole (and a rename would be copy + delete)
      self.path.write_text(text)

  def release(self) -> None:
    """Stop the heartbeat and delete the lock if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._record is None:
      return
    self._record = None
    try:
      if (self._read() or {}).get("token") == self.token:
        self.path.unlink(missing_ok=True)
    except Exception as e:  # pylint: disable=broad-except  # OSError; gs://: gcsfs HttpError, ...
      logging.warning("could not remove the lock %s: %s; delete it by hand", self.path, e)


def hold_for_run(workdir: str) -> WorkdirLock | None:
  """The lock of a training run: process 0 takes it (and gets it back to
  release), the others get None; if process 0 cannot take it, every
  process raises the ConfigError."""
  lock, error = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      lock.acquire()
    except ConfigError as e:
      lock, error = None, e
    except OSError as e:
      lock, error = None, ConfigError(
          f"cannot write the lock file {epath.Path(workdir) / LOCK_FILE} "
          f"({type(e).__name__}: {e}): pass a --workdir this run can write to")
    except Exception as e:  # pylint: disable=broad-except  # a gs:// request that failed
      failed = remote_failures.as_storage_error(e, os.fspath(lock.path), "writing")
      if failed is None:
        raise
      lock, error = None, failed
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = ConfigError(f"process 0 could not take the lock of --workdir={workdir}: see its "
                          "message")
  if error is not None:
    raise error
  return lock
