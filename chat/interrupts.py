"""Ctrl-C while the model reads or writes: the first press asks for a stop at the next safe point, a second
press stops at once.

A safe point is a chunk boundary of a feed or a token boundary of a generation, where the memory matches the
tokens fed. A second press raises KeyboardInterrupt wherever the program is; the conversation then restores
its last snapshot, so the chat stays consistent either way.
"""

from __future__ import annotations

import signal
import threading


class StopGate:
    """Context manager that turns SIGINT into a stop request while the model works (main thread only)."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> StopGate:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        return self.requested
