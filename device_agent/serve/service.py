"""The agent as a service: one worker thread owns the link and runs one request at a time.

The controller serves one request per device at a time (DESIGN.md), and a ZeroMQ socket
belongs to one thread, so the HTTP threads never touch the agent: they put a
:class:`Job` in a bounded queue (full: 429) and read its :class:`Job.events`. Between
requests the worker keeps the registration alive (telemetry and a ping every
``check_every_s``; a controller that forgot it, restarted or went away is registered with
again, with backoff). A request while the controller is unreachable is tried as
``device-agent generate`` tries it: reconnecting and resuming until nothing was committed
for the link timeout plus the resume timeout, then 503.

Ending a request early (its client hung up, a stop string matched) cancels it at the
controller (protocol ``cancel``) at the next verdict, so no verifier time is spent on it.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field

from device_agent.agent import (
    ControllerBrokeProtocol,
    ControllerError,
    DeviceAgent,
    GaveUp,
    GenerationResult,
    RequestCancelled,
    SamplingOptions,
    partial_result,
)
from device_agent.link import LinkLost, LinkRefused
from device_agent.serve.api import ApiError
from device_agent.serve.metrics import ServeMetrics
from device_agent.serve.text import CompletionText
from edge_controller.protocol import ProtocolError

log = logging.getLogger(__name__)

CHECK_EVERY_S = 5.0  # between requests: is the registration alive?
RETRY_MAX_S = 30.0  # re-registration backoff: doubling up to this
CLIENT_ERRORS = frozenset({"invalid", "too_long"})  # controller refusals that are the request's
BUSY_ERRORS = frozenset({"capacity", "busy"})


def shutting_down() -> ApiError:
    return ApiError(503, "the agent is shutting down", type_="server_error")


@dataclass
class Outcome:
    """How a job ended: ``finish_reason`` ("stop", "length"; None if it did not finish)
    and token counts, or an ``error`` for the client."""

    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: ApiError | None = None


@dataclass
class Job:
    """One API request as the worker runs it; its client reads ``events``: ("text", str)
    deltas, then one ("end", Outcome)."""

    prompt_ids: list[int]
    max_tokens: int | None  # None: the service's default
    sampling: SamplingOptions
    stops: list[str] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def end(self, outcome: Outcome) -> None:
        self.events.put(("end", outcome))


@dataclass
class Health:
    registered: bool = False
    device_id: str = ""
    target: str | None = None
    last_round_at: float | None = None  # wall clock of the last verified round
    rounds: int = 0
    in_flight: bool = False
    problem: str | None = None  # why it is not registered, when the controller said


class AgentService:
    def __init__(self, agent: DeviceAgent, *, queue_size: int = 8, default_max_tokens: int = 256,
                 check_every_s: float = CHECK_EVERY_S):
        self.agent = agent
        self.default_max_tokens = default_max_tokens
        self.check_every_s = check_every_s
        self.health = Health(device_id=agent.device_id)
        self.metrics = ServeMetrics(self.queue_depth, agent.board)
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        agent.interrupted = self._stopping.is_set  # a stop ends the agent's waits
        self._thread = threading.Thread(target=self._run, name="agent", daemon=True)
        self._retry_at = 0.0
        self._retry_s = 1.0
        self._current: Job | None = None

    # ---- what the HTTP threads call ----------------------------------------------------
    def start(self) -> AgentService:
        self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise shutting_down()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(429, f"{self._queue.maxsize} requests are already waiting for this "
                           "device's agent; try again shortly", type_="rate_limit_error",
                           code="queue_full") from None

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def max_tokens(self, asked: int | None) -> int:
        """What a request may generate: as asked (checked against the controller's limit
        once known), or the service's default within that limit."""
        welcome = self.agent.welcome
        limit = welcome.max_new_tokens if welcome is not None else None
        if asked is None:
            return min(self.default_max_tokens, limit or self.default_max_tokens)
        if limit is not None and asked > limit:
            raise ApiError(400, f"max_tokens {asked} exceeds the controller's limit of {limit}",
                           param="max_tokens")
        return asked

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Cancel what runs and what waits (503), say goodbye, end the worker. A worker
        still waiting on a controller that does not answer after ``timeout_s`` is left
        behind (a daemon thread: the process may exit); then False."""
        self._stopping.set()
        current = self._current
        if current is not None:
            current.cancelled.set()
        self._fail_waiting(shutting_down())
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ---- the worker ----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """The worker runs (HTTP threads give up on a job when it does not)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._register()
            while not self._stopping.is_set():
                try:
                    job = self._queue.get(timeout=self.check_every_s)
                except queue.Empty:
                    job = None
                try:
                    if job is None:
                        self._keep_registered()
                    else:
                        self._current = job
                        self._serve(job)
                except Exception as exc:  # noqa: BLE001 - a bug must not end the service
                    log.exception("agent worker")
                    if job is not None:
                        job.end(Outcome(None, len(job.prompt_ids), 0, ApiError(
                            500, f"internal error: {type(exc).__name__}", type_="server_error")))
                    self._lost(exc)
                finally:
                    self._current = None
        finally:
            self.agent.close()

    def _register(self) -> None:
        """Hello (and a link measurement); on failure, the next try after a backoff."""
        try:
            self.agent.register()
        except RequestCancelled:  # stopping
            return
        except (LinkLost, LinkRefused, ControllerError, ProtocolError) as exc:
            self._lost(exc)
            return
        self._registered()

    def _lost(self, exc: Exception) -> None:
        if self.health.registered or self.health.problem != str(exc):
            log.warning("not registered with %s: %s", self.agent.link.endpoint, exc)
        self.health.registered = False
        self.health.problem = str(exc)
        self.metrics.registered.set(0)
        self._retry_at = time.monotonic() + self._retry_s * random.uniform(0.8, 1.2)
        self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)

    def _keep_registered(self) -> None:
        if self.health.registered:
            try:
                self.agent.check_registered()
                return
            except RequestCancelled:  # stopping
                return
            except (LinkLost, LinkRefused, ControllerError, ProtocolError) as exc:
                self._lost(exc)
                self._retry_at = 0.0  # it was registered a moment ago: at once
        if time.monotonic() >= self._retry_at:
            self.agent.link.reconnect()
            self._register()

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():  # its client hung up while it waited
            job.end(Outcome(None, len(job.prompt_ids), 0))
            self.metrics.finished("cancelled", 0, None, 0)
            return
        drafter = self.agent.drafter
        text = CompletionText(drafter.detokenize, job.stops)

        def on_tokens(tokens: list[int]) -> None:
            self.health.last_round_at = time.time()
            self.health.rounds += 1
            if delta := text.feed(tokens):
                job.events.put(("text", delta))
            if text.stopped:
                raise RequestCancelled("a stop string matched")
            if job.cancelled.is_set():
                raise RequestCancelled("the client hung up")

        self.health.in_flight = True
        result: GenerationResult | None = None
        finish, outcome, error = None, "done", None
        try:
            max_tokens = self.max_tokens(job.max_tokens)
            result = self.agent.generate(job.prompt_ids, max_tokens, job.sampling, on_tokens,
                                         cancelled=job.cancelled.is_set)
            eos = self.agent.welcome.eos_token_ids
            finish = "stop" if result.tokens and result.tokens[-1] in eos else "length"
            self._registered()
        except RequestCancelled as exc:
            result = partial_result(exc)
            finish, outcome = ("stop", "stopped") if text.stopped else (None, "cancelled")
            if self._stopping.is_set() and not text.stopped:
                error = shutting_down()
        except ApiError as exc:
            error, outcome = exc, "refused"
        except Exception as exc:  # noqa: BLE001 - each failure is an answer, never the end
            result = partial_result(exc)
            error, outcome = self._error_for(exc)
        finally:
            self.health.in_flight = False
        if rest := text.finish():
            job.events.put(("text", rest))
        tokens = text.tokens if text.stopped else len(result.tokens) if result else 0
        job.end(Outcome(finish, len(job.prompt_ids), tokens, error))
        self.metrics.finished(outcome, len(job.prompt_ids), result, tokens)
        if outcome == "unavailable" and error is not None:
            self._fail_waiting(error)

    def _fail_waiting(self, error: ApiError) -> None:
        """Every waiting request gets ``error`` now: the controller could not be reached
        for a whole resume timeout (not one timeout each), or the service stops."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            job.end(Outcome(None, len(job.prompt_ids), 0, error))
            self.metrics.finished("unavailable", len(job.prompt_ids), None, 0)

    def _registered(self) -> None:
        """Registered (a welcome, or a request that went through whatever the health
        checks said): health says so, the backoff starts over."""
        self._retry_s = 1.0
        self.health.registered, self.health.problem = True, None
        self.health.device_id = self.agent.device_id
        self.health.target = self.agent.welcome.target_model
        self.metrics.registered.set(1)

    def _error_for(self, exc: Exception) -> tuple[ApiError, str]:
        """The client's answer to a request that failed with ``exc``, and its outcome."""
        if isinstance(exc, ControllerError) and exc.code in CLIENT_ERRORS and not exc.fatal:
            return ApiError(400, f"the controller refused the request: {exc}"), "refused"
        if isinstance(exc, ControllerError) and exc.code in BUSY_ERRORS:
            return ApiError(503, f"the controller is at capacity: {exc}", type_="server_error",
                            code="controller_busy"), "unavailable"
        if isinstance(exc, GaveUp | LinkLost | ControllerError | LinkRefused):
            self._lost(exc)
            return ApiError(503, f"the controller is unreachable or refuses this device: {exc}",
                            type_="server_error", code="controller_unavailable"), "unavailable"
        if isinstance(exc, ProtocolError | ControllerBrokeProtocol):
            self._lost(exc)
            self.agent.link.reconnect()
            return ApiError(502, f"the controller broke the protocol: {exc}",
                            type_="server_error"), "failed"
        if isinstance(exc, ValueError):  # the drafter's own limits (its context)
            return ApiError(400, str(exc)), "refused"
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                        type_="server_error"), "failed"
