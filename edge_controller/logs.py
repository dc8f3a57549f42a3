"""Warnings about what devices send: at most a few per device and window, with a count of
the rest, so that no device can flood the log (what it sent is never logged raw)."""

from __future__ import annotations

import logging
import time

PER_WINDOW = 5
WINDOW_S = 10.0
MAX_PEERS = 4096  # windows kept; older ones are forgotten first


class PeerWarnings:
    def __init__(self, logger: logging.Logger):
        self.log = logger
        self._windows: dict[str, list] = {}  # peer -> [window start, warned, suppressed]

    def warn(self, peer: str, fmt: str, *args) -> None:
        now = time.monotonic()
        window = self._windows.get(peer)
        if window is None or now - window[0] >= WINDOW_S:
            if window is not None and window[2]:
                self.log.warning("%s: %d more warnings in %g s not shown", peer, window[2],
                                 WINDOW_S)
            if len(self._windows) >= MAX_PEERS:
                self._forget(now)
            window = self._windows[peer] = [now, 0, 0]
        if window[1] < PER_WINDOW:
            window[1] += 1
            self.log.warning("%s: " + fmt, peer, *args)
        else:
            window[2] += 1

    def _forget(self, now: float) -> None:
        for peer in [p for p, w in self._windows.items() if now - w[0] >= WINDOW_S]:
            del self._windows[peer]
        while len(self._windows) >= MAX_PEERS:
            del self._windows[next(iter(self._windows))]
