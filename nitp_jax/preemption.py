"""Stop cleanly on a preemption notice (SIGTERM) or Ctrl-C (SIGINT): finish
the step, checkpoint, exit 0. A second SIGINT interrupts at once.

One process: Python handlers for SIGTERM and SIGINT set a flag that the loop
reads after each step.

Several processes (after `jax.distributed.initialize()`): all must stop at the
same step, and exchanging the flag every step (an allgather) would block the
host on the device every step. JAX's preemption service agrees on a step
without that: its own SIGTERM handler (installed by `initialize`) tells the
coordination service, which picks the step after the furthest process's
(one barrier, once), and `multihost_utils.reached_preemption_sync_point(n)`
turns True at that step on every process. Until a notice arrives a call costs
well under a microsecond and synchronizes nothing. Hence:

- no Python SIGTERM handler: one installed after `initialize` silences JAX's;
- SIGINT, which JAX ignores, is forwarded: our handler sends this process a
  SIGTERM, so a Ctrl-C on any process stops them all at one step, exactly
  like a preemption notice;
- the sync point is max(last step id each process passed) + 1. We pass the
  global step, as Orbax's CheckpointManager does from its save path (it
  calls the same function with the step it saves), so the ids agree.
- start-up: a process that has not called yet has passed 0, so a notice
  during restore or compile sets the sync point to 1, which a resumed run
  never reaches. So the guard's first call (it must be the process's first)
  asks about step 1, True meaning exactly that case, and then reports the
  start step. The answer is the same on every process: the point is computed
  from all processes' reported steps, and a call waits while the protocol
  runs. After such a notice every process stops after its first step.

A notice too late for the sync point (after the last step) lets the run
finish. Not guaranteed: Orbax's async finalize thread reports the saved step
again when the write completes; a notice whose protocol catches every process
between that and its next step gets a sync point already passed, and the run
goes on until it is killed (it resumes from the last checkpoint). With
`jax_enable_preemption_service` off there is nothing to agree through:
signals keep their default behaviour.
"""

from __future__ import annotations

import logging
import os
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Context manager for a training loop that starts after `start_step`;
  call `requested(step)` after each step on every process: True (on all of
  them at the same step) means save and exit."""

  def __init__(self, start_step: int = 0, signal_name: str | None = None):
    self.signal_name = signal_name  # the signal this process got, if any (`StartUp`'s)
    self._start_step = start_step
    self._previous = {}
    self._multi = False
    self._enabled = True
    self._notice_at_start_up = False

  @property
  def reason(self) -> str:
    """What stopped the run, for the log line."""
    return self.signal_name or "preemption notice"

  def __enter__(self) -> PreemptionGuard:
    self._multi = jax.process_count() > 1
    if self._multi and not jax.config.jax_enable_preemption_service:
      logging.warning("jax_enable_preemption_service is off: SIGTERM and SIGINT stop this "
                      "run without a checkpoint")
      self._enabled = False
      return self
    signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    if self._multi:
      self._notice_at_start_up = multihost_utils.reached_preemption_sync_point(1)
      multihost_utils.reached_preemption_sync_point(self._start_step)
    return self

  def _handle(self, signum, frame):
    if self.signal_name is not None:
      signal.default_int_handler(signum, frame)
    self.signal_name = signal.Signals(signum).name
    if self._multi:  # hand it to JAX's SIGTERM handler: every process learns of it
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """True once this process (single-process run) or any process (JAX's
    sync point) got a signal. Never blocks except once, when a notice
    arrives in a multi-process run."""
    if not self._multi:
      return self.signal_name is not None
    if not self._enabled:
      return False
    return multihost_utils.reached_preemption_sync_point(step) or self._notice_at_start_up

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


class StartUp:
  """Context manager for a one-process run's start-up (restore, init
  compile): SIGTERM or SIGINT is kept in `signal_name`, for `PreemptionGuard`
  to stop after the first step, instead of a KeyboardInterrupt inside an XLA
  compile (a traceback, then a segfault at exit). A second signal interrupts
  at once. Several processes: nothing (JAX's preemption service covers it)."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self) -> StartUp:
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal_name is not None:
      signal.default_int_handler(signum, frame)
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
