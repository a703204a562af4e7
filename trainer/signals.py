"""Signals that stop a run: save a checkpoint at the next step, then exit with a code launchers know.

Owns: every signal handler the trainer installs, and the exit code of a stop that saved first.

- SIGTERM and SIGUSR1 (a scheduler's warning before pre-emption or the time limit; Slurm's
  ``--signal=B:USR1@...``, ``scancel --signal=USR1``) ask the checkpointer for a save at the next
  step; after it the process exits with ``EXIT_CODE_CHECKPOINTED``, on which launchers requeue or
  restart without counting a failure.
- SIGINT (Ctrl-C, or the local launcher passing it on) does the same the first time; a second
  Ctrl-C interrupts at once (``KeyboardInterrupt``).

A handler only counts a request (``Checkpointer.request_save``): a signal may arrive between any
two bytecodes, and on each rank at a different step, so the checkpointer decides at its next
``after_step``, agreed over all ranks, and raises ``CheckpointedExit``. Handlers are installed by
``SaveOnSignal`` in the main thread only (Python allows no other) and ``restore`` puts the previous
ones back, also when the run fails.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

# A process that saved on SIGTERM/SIGUSR1/SIGINT and exits so the scheduler can requeue it exits with
# this code; launchers restart (or requeue) on it without counting a failure.
EXIT_CODE_CHECKPOINTED = 85


class CheckpointedExit(SystemExit):
    """Raised after the save requested by a termination signal: the process exits with
    ``EXIT_CODE_CHECKPOINTED`` (a ``SystemExit``, so a launcher may also catch it)."""

    def __init__(self, step: int):
        super().__init__(EXIT_CODE_CHECKPOINTED)
        self.step = step


class SaveOnSignal:
    """The trainer's handlers: each of ``signals`` (and SIGINT, with ``ctrl_c``) calls
    ``request_save(exit_after=True)``. Installed on construction; ``restore`` removes them."""

    def __init__(self, request_save: Callable[..., None], signals=(signal.SIGTERM, signal.SIGUSR1),
                 ctrl_c: bool = True):
        self._request_save = request_save
        self._previous: list = []  # (signal, the handler before ours)
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in signals:
            self._install(sig, self._on_signal)
        if ctrl_c:
            self._install(signal.SIGINT, self._on_ctrl_c)

    def _install(self, sig, handler) -> None:
        self._previous.append((sig, signal.getsignal(sig)))
        signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self._request_save(exit_after=True)

    def _on_ctrl_c(self, signum, frame) -> None:
        self._request_save(exit_after=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    def restore(self) -> None:
        """Put back the handlers that were there before (idempotent)."""
        for sig, prev in reversed(self._previous):
            try:
                signal.signal(sig, prev)
            except (ValueError, TypeError):  # a handler installed from C (None) cannot be put back
                pass
        self._previous = []
