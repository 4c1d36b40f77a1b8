"""Stop requests: SIGTERM and SIGINT turned into a flag that a long loop polls.

A signal handler that raised at an arbitrary bytecode could leave a cell half-way through a
step, with no consistent state to save. Inside :class:`StopOnSignals` the two signals only set
``requested``; the loop checks it between steps, saves, and stops.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

__all__ = ["StopOnSignals", "SIGNALS"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignals:
    """Context manager: while open, SIGTERM and SIGINT set :attr:`requested` (and
    :attr:`signal_name`) instead of their usual effect; the previous handlers come back on exit.
    Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            # None: the old handler was installed outside Python; the default is the best guess
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
