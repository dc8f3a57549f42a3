"""The uplink pacer: turns the controller's bandwidth share into a rate limit.

FDMA gives device k the rate ``beta_k B s_k`` (its share of the band times its spectral
efficiency); on a shared physical link the agent emulates that by pacing its uploads with
a token bucket at that rate. The bucket holds at most ``burst_bytes`` (one message, e.g.
the largest frame the agent sends per round), so a stream of small messages is paced
too: after the first burst each message waits for its own bytes' worth of time.

A message larger than the bucket waits for a full bucket, then goes and leaves the bucket
in debt, so the long-run rate stays ``rate_bps`` whatever the message sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class UplinkPacer:
    """Token bucket in bytes. Not thread safe: one sender calls :meth:`wait`."""

    def __init__(
        self,
        rate_bps: float | None = None,
        burst_bytes: int = 64 * 1024,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if burst_bytes < 1:
            raise ValueError("burst_bytes must be >= 1")
        self.burst_bytes = burst_bytes
        self._clock, self._sleep = clock, sleep
        self.rate_bps = 0.0
        self._tokens = float(burst_bytes)  # bytes that may go now; negative = debt
        self._updated = clock()
        self.set_rate(rate_bps)

    @property
    def paced(self) -> bool:
        return self.rate_bps > 0

    def set_rate(self, rate_bps: float | None) -> None:
        """New rate in bit/s from now on; 0 or None = unpaced. Earlier time keeps its rate."""
        if rate_bps is not None and rate_bps < 0:
            raise ValueError("rate_bps must be >= 0")
        if not self.paced:
            self._tokens = float(self.burst_bytes)  # pacing (re)starts with a full bucket
        self._refill()
        self.rate_bps = float(rate_bps or 0.0)

    def wait(self, nbytes: int) -> float:
        """Block until ``nbytes`` may go, take them from the bucket; return seconds waited."""
        if not self.paced:
            return 0.0
        started = self._clock()
        need = min(nbytes, self.burst_bytes)
        self._refill()
        if self._tokens < need:
            ready_at = self._updated + (need - self._tokens) * 8 / self.rate_bps
            while (now := self._clock()) < ready_at:
                self._sleep(ready_at - now)
            self._refill()
        self._tokens -= nbytes
        return self._clock() - started

    def _refill(self) -> None:
        now = self._clock()
        if self.paced:
            earned = (now - self._updated) * self.rate_bps / 8
            self._tokens = min(float(self.burst_bytes), self._tokens + earned)
        self._updated = now
