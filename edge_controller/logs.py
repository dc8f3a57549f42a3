"""What devices do, in the log: at most a few lines per device and window, then a count
of the rest, so that no device can flood the log (and what it sent is never logged raw)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

PER_WINDOW = 20  # a device's normal life (requests starting, ending) stays visible
WINDOW_S = 10.0
MAX_PEERS = 4096  # windows kept; older ones are forgotten first


@dataclass
class _Window:
    started: float
    shown: int = 0
    hidden: int = 0


class PeerLog:
    """Log lines about devices at ``level``, rate limited per device."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING):
        self.log, self.level = logger, level
        self._windows: dict[str, _Window] = {}

    def __call__(self, peer: str, fmt: str, *args, exc_info: bool = False) -> None:
        now = time.monotonic()
        window = self._windows.get(peer)
        if window is None or now - window.started >= WINDOW_S:
            if window is not None and window.hidden:
                self.log.log(self.level, "%s: %d more lines in %g s not shown", peer,
                             window.hidden, WINDOW_S)
            if len(self._windows) >= MAX_PEERS:
                self._forget(now)
            window = self._windows[peer] = _Window(now)
        if window.shown < PER_WINDOW:
            window.shown += 1
            self.log.log(self.level, "%s: " + fmt, peer, *args, exc_info=exc_info)
        else:
            window.hidden += 1

    def _forget(self, now: float) -> None:
        for peer in [p for p, w in self._windows.items() if now - w.started >= WINDOW_S]:
            del self._windows[peer]
        while len(self._windows) >= MAX_PEERS:
            del self._windows[next(iter(self._windows))]
