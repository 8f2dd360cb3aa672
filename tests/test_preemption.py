"""The single-process PreemptionGuard: signals become a request to stop after
the step; a second one interrupts; the previous handlers come back. (The
multi-process path is tested with real processes in test_multiprocess.py.)"""

import os
import signal

import pytest

from nitp_jax import preemption


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_one_process_stops_after_the_step_and_restores_handlers(sig):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with preemption.PreemptionGuard() as guard:
    assert not guard.requested(1) and guard.reason == "preemption notice"
    os.kill(os.getpid(), sig)  # Python runs the handler before the next line
    assert guard.requested(2) and guard.reason == sig.name
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), sig)
  assert {s: signal.getsignal(s) for s in before} == before
