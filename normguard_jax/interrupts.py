"""Turns SIGTERM (preemption, ``kill``) into a flag that a training loop polls between steps.

The loop then writes a checkpoint of the last completed step and returns, so a preempted TPU VM
or a cancelled job loses nothing. Ctrl-C (KeyboardInterrupt) is handled the same way by the loops.
"""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """Context manager that sets ``self.requested`` when SIGTERM arrives (main thread only)."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self._signals = signals
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        self.requested = True
        self.signal = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
