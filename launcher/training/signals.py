"""Stopping a run: SIGTERM and Ctrl-C (SIGINT) ask for a checkpoint and a clean exit after the current iteration.

The handler only records the signal; the train loop asks every rank at each iteration boundary (one
all-reduce it makes anyway), so all ranks stop after the same iteration even if the signal reached them at
different moments, or reached only some of them. Repeated SIGTERMs are ignored (a cluster signals every
process, sometimes twice); a second Ctrl-C stops at once: `latest` only ever names a complete checkpoint, so
the last one is kept even if a save was under way.

Before training begins there is nothing to save: a request then raises `StartupStopped` at once (installed
as the first thing a worker does, so a signal never meets Python's defaults: a KeyboardInterrupt traceback, or
death by SIGTERM that torchrun reports as a failure). Only this module is imported before the handler is in
place; signals are kept blocked until then (the launcher starts the job with them blocked).
"""
from __future__ import annotations

import os
import signal
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CTRL_C_HINT = "interrupted: stopping after this iteration, with a checkpoint (Ctrl-C again: stop at once)"


class StartupStopped(BaseException):
    """A stop request before the first iteration. A BaseException, so `except Exception` cannot swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Installs the handlers (a context manager, or `install()`); `requested` is the first signal's name, or None.

    startup=True: until `training_begins()`, a signal raises StartupStopped in the main thread.
    hint=True: a first Ctrl-C says what happens next (where this process is the one the terminal signals).
    """

    def __init__(self, signals=STOP_SIGNALS, startup: bool = False, hint: bool = False):
        self.signals = tuple(signals)
        self.requested: str | None = None
        self.in_startup = startup
        self.hint = hint
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.in_startup:
            self.requested = signal.Signals(signum).name
            raise StartupStopped(signum)
        if self.requested is not None and signum == signal.SIGINT:
            # A second Ctrl-C: no more waiting. os._exit: no cleanup may block (a collective, a save).
            print("interrupted again: stopped at once, without waiting for this iteration's checkpoint; the newest "
                  "complete checkpoint (checkpoints/latest) is kept", file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            if self.hint and signum == signal.SIGINT:
                print(CTRL_C_HINT, file=sys.stderr, flush=True)

    def training_begins(self) -> None:
        """From here a signal is recorded and acted on at the next iteration boundary."""
        self.in_startup = False

    def install(self) -> "StopRequest":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        unblock(self.signals)
        return self

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


def blocked(signals=STOP_SIGNALS):
    """Block `signals` in this thread (they stay pending, and are inherited blocked by processes started
    now); returns the previous mask for `signal.pthread_sigmask(signal.SIG_SETMASK, ...)`."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, signals)


def unblock(signals=STOP_SIGNALS) -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
