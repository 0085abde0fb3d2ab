"""Stop requests from signals, agreed by all ranks at a step boundary.

A signal handler runs between two bytecodes of whatever the main thread is doing (a collective, a
checkpoint write), so it only records the signal. At the end of each step every rank contributes
what it received to one all-reduce; if any rank was signalled, all save and leave together.

SIGUSR1 / SIGUSR2 mean "the allocation ends soon" (SLURM's ``--signal``; submitit uses USR2): save,
ask SLURM to requeue the job, exit. SIGTERM / SIGINT mean "stop": save and exit. Either way the
exit code is EXIT_PREEMPTED, and relaunching the same command resumes. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import os
import signal

import torch

from trainer.distributed import all_reduce_max

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later" — a relaunch continues the run
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised by the loop after the checkpoint of ``step`` is complete on every rank."""

    def __init__(self, signum: int, step: int, checkpoint):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint}")

    @property
    def requeue(self) -> bool:
        return self.signum in REQUEUE_SIGNALS


class StopRequests:
    """Install with ``with StopRequests() as stop:``; the previous handlers come back on exit."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        for sig in REQUEUE_SIGNALS + STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        # A requeue request wins over a plain stop: losing it would leave the job dead at its time limit.
        if not (self.signum in REQUEUE_SIGNALS and signum not in REQUEUE_SIGNALS):
            self.signum = signum
        # os.write, not print: print from a handler that interrupted a print raises "reentrant call".
        os.write(2, f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then "
                    f"exiting (Ctrl-C again to stop now)\n".encode())

    def agreed(self) -> int:
        """The signal any rank received (0 if none): one all-reduce; every rank must call it at the same point.

        Requeue signals are numbered so that MAX prefers them: [0 none, 1 stop, 2 requeue] + the signal.
        """
        code = 0 if not self.signum else (2 if self.signum in REQUEUE_SIGNALS else 1) * 256 + self.signum
        agreed = int(all_reduce_max(torch.tensor([code], dtype=torch.int64))[0])
        return agreed % 256
