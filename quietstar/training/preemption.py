"""Preemption: SIGTERM or SIGUSR1 (what SLURM and cloud schedulers send before they kill a job) make the run
finish its current optimizer step, save a checkpoint on every rank and exit cleanly.

The handler only records the signal. The recipe adds ``Preemption.requested()`` to the numbers it
sums over ranks after each step, so a signal that reached any one rank stops every rank after the
same step (the DeepSpeed launcher, given SIGTERM, passes it to its ranks one at a time).
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """A context manager: inside it, the signals are recorded instead of ending the process; on leaving it,
    the previous handlers come back."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> float:
        """1.0 once a signal has arrived on this rank, else 0.0 (summed over ranks by the recipe)."""
        return 1.0 if self.signal_name else 0.0
