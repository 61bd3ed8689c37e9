"""Preemption: SIGUSR1 (Slurm's warning before the time limit), SIGTERM or SIGINT (Ctrl-C) ask the run to stop
cleanly.

The handler only sets a flag; the training loop checks it at each step boundary, agrees across ranks,
writes a checkpoint and exits with PREEMPTED_EXIT_CODE so the launcher requeues the job. A second SIGINT
stops at once (KeyboardInterrupt), without the checkpoint; one within REPEAT_S of the first is the same
Ctrl-C (under torchrun every rank gets it from the terminal and again from torchrun).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar, cast

PREEMPTED_EXIT_CODE = 99
REPEAT_S = 1.0


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
F = TypeVar("F", bound=Callable[..., Any])


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._first_sigint = 0.0

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint and now - self._first_sigint > REPEAT_S:
                raise KeyboardInterrupt
            if self._first_sigint:
                return  # the same Ctrl-C, delivered twice
            self._first_sigint = now
            if os.environ.get("RANK", "0") == "0":
                print(
                    "[sft] SIGINT: stopping after this step with a checkpoint (Ctrl-C again stops at once)",
                    flush=True,
                )
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def restores_signal_handlers(fn: F) -> F:
    """Give the stop signals back to their earlier handlers when `fn` returns or raises: after train() in a
    notebook or a test, Ctrl-C interrupts again."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            return fn(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                if handler is not None:  # None: set outside Python; nothing to put back
                    signal.signal(sig, handler)

    return cast(F, wrapper)


class Preempted(Exception):
    """Raised after the checkpoint is written; the CLI turns it into PREEMPTED_EXIT_CODE."""
