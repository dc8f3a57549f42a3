"""The verifier's forwards in a thread of their own.

Under continuous batching the controller's loop goes on receiving drafts, answering pings
and doing its bookkeeping while a forward runs (vLLM separates its engine core from the
API server the same way); torch releases the GIL while it computes. One forward at a time:
the loop hands over a :class:`Forward`, and learns that it is done through ``wake_fd``,
which it polls next to its socket. Under synchronous rounds the loop hands a forward over
and waits for it (``run``).

Every forward, and any other torch work of the loop (``call``: calibration, verifying
sessions one by one), runs in this one thread, under every scheduler. On a CPU that
matters: torch's OpenMP keeps a team of threads per calling thread, and once the loop's
thread had a team of its own (loading the model builds one), forwards in a second thread
ran 1.3-1.8x slower on this project's 2-core host (docs/scheduling.md, "One thread for
torch"). So the caller that loads the model keeps one intra-op thread and hands torch's
default count to this thread (``threads``): :func:`torch_to_the_verifier`, called before
loading (edge-controller start, and the benchmarks that run a controller in-process).

What the loop must not do while a forward runs: touch the slots in it (their K/V and
sequences are the forward's). It closes them after the forward instead
(``EdgeController._end_request``), and any other slot is its own.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_controller.verifier.slots import SlotTable, VerifyItem, VerifyOutcome

log = logging.getLogger(__name__)


@dataclass
class Forward:
    """One forward: drafts to verify and/or a prefill chunk ``(slot, tokens)``; after it
    ran, their outcomes or the error it raised, and when it ran (monotonic clock)."""

    items: list[VerifyItem]
    prefill: tuple[int, int] | None = None
    outcomes: list[VerifyOutcome] = field(default_factory=list)
    error: Exception | None = None
    started: float = 0.0
    finished: float = 0.0

    @property
    def slots(self) -> set[int]:
        """The slots this forward computes on."""
        return {item.slot for item in self.items} | ({self.prefill[0]} if self.prefill else set())

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    def run(self, verifier: SlotTable) -> Forward:
        self.started = time.monotonic()
        try:
            if self.items:
                self.outcomes = verifier.verify(self.items, prefill=self.prefill)
            elif self.prefill is not None:
                verifier.prefill(*self.prefill)
        except Exception as exc:  # the loop decides what it means for each session
            self.error = exc
        self.finished = time.monotonic()
        return self


def torch_to_the_verifier() -> int:
    """Leave this thread one torch intra-op thread and return torch's default count, for the
    verifier's thread (``VerifierWorker(threads=...)``). Call it before loading the model."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


class _Job(Protocol):
    def run(self, verifier: SlotTable) -> Any: ...


@dataclass
class _Call:
    """``fn()`` as a job of the verifier's thread: its result or what it raised."""

    fn: Callable[[], Any]
    result: Any = None
    error: BaseException | None = None

    def run(self, verifier: SlotTable) -> _Call:
        try:
            self.result = self.fn()
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc
        return self


class VerifierWorker:
    """Runs forwards on ``verifier`` in a daemon thread, one at a time. ``threads``: torch's
    intra-op threads in that thread (None: leave torch as it is, e.g. no torch at all)."""

    def __init__(self, verifier: SlotTable, threads: int | None = None):
        self.verifier = verifier
        self.threads = threads
        self.in_flight: _Job | None = None
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._wake: tuple[int, int] | None = None  # (read, write) pipe, with the thread
        self._thread: threading.Thread | None = None  # started by the first submit

    @property
    def wake_fd(self) -> int | None:
        """Readable once the forward in flight is done (poll it with the socket); None
        before the first forward was submitted."""
        return self._wake[0] if self._wake else None

    @property
    def busy(self) -> bool:
        return self.in_flight is not None

    @property
    def done(self) -> bool:
        """The forward in flight has finished and waits to be collected."""
        return self._done.is_set()

    def run(self, forward: Forward) -> Forward:
        """Run ``forward`` and wait for it (synchronous rounds)."""
        self.submit(forward)
        self.collect(timeout_s=None)
        return forward

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the verifier's thread, waited for; what it raises is raised here."""
        job = _Call(lambda: fn(*args))
        self.submit(job)
        self.collect(timeout_s=None)
        if job.error is not None:
            raise job.error
        return job.result

    def submit(self, job: _Job) -> None:
        """Start ``job`` (a :class:`Forward`, or a call) in the worker thread."""
        assert not self.busy, "one forward at a time"
        if self._thread is None:
            self._wake = os.pipe()
            os.set_blocking(self._wake[0], False)
            self._thread = threading.Thread(target=self._serve, name="verifier", daemon=True)
            self._thread.start()
        self.in_flight = job
        self._queue.put(job)

    def collect(self, timeout_s: float | None = 0.0) -> _Job | None:
        """The forward in flight once it is done (waiting up to ``timeout_s``; None: until
        it is), else None."""
        if self.in_flight is None or not self._done.wait(timeout_s):
            return None
        forward, self.in_flight = self.in_flight, None
        self._done.clear()
        os.read(self._wake[0], 1)  # its one byte, written before the event was set
        return forward

    def close(self) -> None:
        """Finish the forward in flight (if any) and stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(60)
        if not self._thread.is_alive():  # else it may still write: leave its pipe open
            os.close(self._wake[0])
            os.close(self._wake[1])
            self._thread = self._wake = None  # a later submit starts a new one

    def _serve(self) -> None:
        if self.threads is not None:
            try:
                import torch

                torch.set_num_threads(self.threads)
            except Exception as exc:  # slower, not wrong: serve at torch's own count
                log.error("verifier thread: cannot set %d torch threads: %r", self.threads, exc)
        while (job := self._queue.get()) is not None:
            try:  # a Forward keeps its own errors; whatever escapes must not hang the loop
                job.run(self.verifier)
            except BaseException as exc:
                log.error("verifier thread: %r escaped a job", exc)
            finally:
                os.write(self._wake[1], b"!")  # first: a collect that sees the event finds it
                self._done.set()
