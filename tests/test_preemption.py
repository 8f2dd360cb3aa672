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


def test_a_signal_during_start_up_stops_the_run_after_its_first_step():
  # Restore and the init compile run before the loop's guard: a KeyboardInterrupt
  # inside the XLA compile was a traceback and then a segfault at exit.
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with preemption.StartUp() as startup:
    os.kill(os.getpid(), signal.SIGINT)
    assert startup.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # a second one interrupts at once
      os.kill(os.getpid(), signal.SIGTERM)
  assert {s: signal.getsignal(s) for s in before} == before
  with preemption.PreemptionGuard(0, startup.signal_name) as guard:
    assert guard.requested(1) and guard.reason == "SIGINT"
