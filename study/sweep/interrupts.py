"""Ctrl-C during a study: known for what it was even when a library turns it into another error."""

from __future__ import annotations

import signal
import threading
from typing import Any


class CtrlC:
    """Remembers that SIGINT arrived (it still raises KeyboardInterrupt as Python's handler does), so an
    exception that replaced the KeyboardInterrupt on its way up is known for what it was."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
