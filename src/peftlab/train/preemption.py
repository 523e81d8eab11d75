"""Graceful preemption: SIGTERM (and a first Ctrl-C) end training after the current optimiser step.

Clusters preempt jobs with SIGTERM and a grace period (Slurm, Kubernetes, spot instances). Inside
`stop_requests()` such a signal only sets a flag; the training loop looks at it after each optimiser
step and at each epoch end, and the epoch's evaluations between two batches (evaluate.scoring's
EvaluationStopped; their finished batches are journalled, so a 2000-review test pass is neither waited
for nor redone), saves a checkpoint and raises `Preempted`. The CLI then exits with
EXIT_PREEMPTED, so that a scheduler can requeue the same command with `--resume`. A second Ctrl-C
interrupts at once, as a user pressing it twice expects.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass

# sysexits.h EX_TEMPFAIL, "temporary failure; the user is invited to retry": requeue with --resume.
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; not a failure (a sweep does not record it so)."""

    def __init__(self, signal_name: str, epoch: int, step: int):
        super().__init__(f"stopped by {signal_name} at epoch {epoch}, optimiser step {step}, after saving a "
                         "checkpoint; run the same command with --resume to continue")
        self.signal_name, self.epoch, self.step = signal_name, epoch, step


@dataclass
class StopRequest:
    signal: str | None = None  # the name of the signal that asked training to stop, once one has


@contextlib.contextmanager
def stop_requests():
    """Catch SIGTERM and SIGINT as stop requests while the block runs (main thread only: elsewhere the
    handlers cannot be installed and signals keep their usual effect)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def ask_to_stop(signum, frame):
        if request.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: now
        request.signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
