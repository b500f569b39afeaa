"""Preemption: SIGTERM or SIGUSR1 (what SLURM and cloud schedulers send before they kill a job), Ctrl-C (SIGINT)
and a closed terminal (SIGHUP) make the run finish its current optimizer step, save a checkpoint on every rank and
exit cleanly.

The handler only records the signal. The recipe adds ``Preemption.requested()`` to the numbers it
sums over ranks after each step, so a signal that reached any one rank stops every rank after the
same step (the DeepSpeed launcher, given SIGTERM or SIGINT, passes SIGTERM to its ranks one at a time).

Ctrl-C says on stderr (rank 0) that the run is saving; a second Ctrl-C stops at once, without the
save (``KeyboardInterrupt``: the last complete checkpoint stays). SIGHUP, sent when the terminal a run
was started from closes, also sends what the run prints to a terminal to ``/dev/null`` from then on, as
``nohup`` would have: writing to a terminal that is gone fails, and would end the run before its save.
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
SAVING = ("\nCtrl-C: finishing this step and saving a checkpoint, then stopping (continue with --resume); "
          "Ctrl-C again stops at once, without saving\n")


class Preemption:
    """A context manager: inside it, the signals are recorded instead of ending the process; on leaving it,
    the previous handlers come back."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._terminals: list[int] = []
        self._interrupted = False

    def __enter__(self) -> "Preemption":
        self._terminals = [fd for fd in (1, 2) if os.isatty(fd)]  # asked now: once the terminal hangs up, isatty says no
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT:
            if self._interrupted:
                raise KeyboardInterrupt  # the second Ctrl-C
            self._interrupted = True
            if os.environ.get("RANK", "0") == "0":
                os.write(2, SAVING.encode())  # not print: the handler may run inside a print to the same stream
        if signum == signal.SIGHUP:
            self._leave_terminal()
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def _leave_terminal(self) -> None:
        """Point the standard output and error that were a terminal at /dev/null."""
        if self._terminals:
            devnull = os.open(os.devnull, os.O_WRONLY)
            for fd in self._terminals:
                os.dup2(devnull, fd)
            os.close(devnull)
            self._terminals = []

    def requested(self) -> float:
        """1.0 once a signal has arrived on this rank, else 0.0 (summed over ranks by the recipe)."""
        return 1.0 if self.signal_name else 0.0
