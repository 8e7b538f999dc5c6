"""Preemption: SIGTERM asks for a checkpoint and a clean exit, at the end of the current iteration.

The handler only records the signal; the train loop asks every rank at each iteration boundary (one
all-reduce it makes anyway), so all ranks stop after the same iteration even if the signal reached them at
different moments, or reached only some of them.
"""
from __future__ import annotations

import signal


class StopRequest:
    """Context manager installing the handlers; `requested` is the name of the signal received, or None."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
