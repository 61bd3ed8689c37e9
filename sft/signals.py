"""Preemption: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM ask the run to stop cleanly.

The handler only sets a flag; the training loop checks it at each step boundary, agrees across ranks,
writes a checkpoint and exits with PREEMPTED_EXIT_CODE so the launcher requeues the job.
"""

from __future__ import annotations

import signal
from types import FrameType

PREEMPTED_EXIT_CODE = 99


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


class Preempted(Exception):
    """Raised after the checkpoint is written; the CLI turns it into PREEMPTED_EXIT_CODE."""
