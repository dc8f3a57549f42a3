"""The uplink pacer: turns the controller's bandwidth share into a rate limit.

FDMA gives device k the rate ``beta_k B s_k`` (its share of the band times its spectral
efficiency); on a shared physical link the agent emulates that by pacing its uploads with
a token bucket at that rate. A message goes once the bucket holds all of its bytes; idle
time fills the bucket up to ``burst_bytes`` at most (no more than one message).

The default depth is 0: every message then waits its own bytes' time on the air, however
long the device was idle before, which is what the system model's upload term
``(b0 + L b) / (beta B s)`` says an FDMA channel costs (docs/system-model.md). A deeper
bucket lets that much credit from idle time pass at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MIN_RATE_BPS = 8_000.0  # a positive rate is never slower than this: a granted share must let
# a draft through in well under a second, however small the share (or its sender's mistake)


class UplinkPacer:
    """Token bucket in bytes. Not thread safe: one sender calls :meth:`wait`."""

    def __init__(
        self,
        rate_bps: float | None = None,
        burst_bytes: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if burst_bytes < 0:
            raise ValueError("burst_bytes must be >= 0")
        self.burst_bytes = burst_bytes
        self._clock, self._sleep = clock, sleep
        self.rate_bps = 0.0
        self._tokens = float(burst_bytes)  # credit in bytes, 0..burst_bytes
        self._updated = clock()
        self.set_rate(rate_bps)

    @property
    def paced(self) -> bool:
        return self.rate_bps > 0

    def set_rate(self, rate_bps: float | None) -> None:
        """New rate in bit/s from now on; 0 or None = unpaced (positive rates are at least
        MIN_RATE_BPS). Earlier time keeps its rate."""
        if rate_bps is not None and not 0 <= rate_bps < float("inf"):
            raise ValueError("rate_bps must be >= 0 and finite")
        if not self.paced:
            self._tokens = float(self.burst_bytes)  # pacing (re)starts with a full bucket
        self._refill()
        self.rate_bps = max(float(rate_bps), MIN_RATE_BPS) if rate_bps else 0.0

    def wait(self, nbytes: int) -> float:
        """Block until ``nbytes`` may go, take them from the bucket; return seconds waited."""
        if not self.paced:
            return 0.0
        started = self._clock()
        self._refill()
        if self._tokens < nbytes:
            ready_at = self._updated + (nbytes - self._tokens) * 8 / self.rate_bps
            while (now := self._clock()) < ready_at:
                self._sleep(ready_at - now)
            self._tokens, self._updated = float(nbytes), ready_at  # earned exactly by then
        self._tokens -= nbytes
        return self._clock() - started

    def _refill(self) -> None:
        now = self._clock()
        if self.paced:
            earned = (now - self._updated) * self.rate_bps / 8
            self._tokens = min(float(self.burst_bytes), self._tokens + earned)
        self._updated = now
