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
- the sync point is given the number of steps taken in this run (1, 2, ...),
  not the global step: JAX's counter starts at 0, so a notice during start-up
  (restore, compile) sets the sync point to 1, the run's first step. With
  global step numbers a resumed run would never reach it.

A notice that arrives too late for the sync point (after the last step)
simply lets the run finish. With `jax_enable_preemption_service` turned off
there is nothing to agree through: signals keep their default behaviour.
"""

from __future__ import annotations

import logging
import os
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Context manager for the training loop; call `requested()` once per step
  on every process: True (on all of them at the same step) means save and
  exit."""

  def __init__(self):
    self.signal_name: str | None = None  # the signal this process got, if any
    self._previous = {}
    self._steps = 0
    self._multi = False
    self._enabled = True

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
    return self

  def _handle(self, signum, frame):
    if self.signal_name is not None:
      signal.default_int_handler(signum, frame)
    self.signal_name = signal.Signals(signum).name
    if self._multi:  # hand it to JAX's SIGTERM handler: every process learns of it
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self) -> bool:
    """True once this process (single-process run) or any process (JAX's
    sync point) got a signal. Never blocks except once, when a notice
    arrives in a multi-process run."""
    self._steps += 1
    if not self._multi:
      return self.signal_name is not None
    return self._enabled and multihost_utils.reached_preemption_sync_point(self._steps)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
