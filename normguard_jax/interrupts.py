"""Turns SIGTERM (preemption, ``kill``) and Ctrl-C into a flag a training loop polls between steps.

The loop then writes a checkpoint of the last completed step, so a preempted TPU VM or a
cancelled job loses nothing: on SIGTERM it returns, on Ctrl-C it raises ``KeyboardInterrupt``
after the checkpoint. Stopping at a step boundary matters: a ``KeyboardInterrupt`` raised inside
a jitted step whose inputs are donated would leave no valid state to save. A second Ctrl-C
raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import signal
import threading


class StopFlag:
    """Context manager that sets ``self.requested`` when SIGTERM or SIGINT arrives.

    Handlers are installed in the main thread only (elsewhere the flag never rises).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal = None
        self._signals = signals
        self._previous = {}

    def _handle(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: stop now
        self.requested = True
        self.signal = signum

    @property
    def interrupted(self) -> bool:
        """Whether the stop was asked by Ctrl-C (SIGINT) rather than SIGTERM."""
        return self.signal == signal.SIGINT

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
