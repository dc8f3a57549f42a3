"""The device agent's generation loop: draft, upload, apply the verdict, repeat."""

from __future__ import annotations

import logging
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from device_agent.board import BoardMonitor
from device_agent.draft_engine import DraftEngine, DraftResult
from device_agent.link import ControllerLink, LinkLost, LinkTimeout
from device_agent.telemetry import LinkProbe, LinkReport, host_state
from edge_controller import protocol as P

log = logging.getLogger(__name__)


class ControllerError(RuntimeError):
    """The controller refused us (``fatal``) or one of our requests."""

    def __init__(self, error: P.Error):
        super().__init__(f"controller error [{error.code}]: {error.message}")
        self.code = error.code
        self.fatal = error.fatal


RESUME_FIRST_DELAY_S = 0.25  # reconnect backoff: doubling from this...
RESUME_MAX_DELAY_S = 5.0  # ...up to this, with jitter
LOST_STATE = frozenset({"not_registered", "stale", "idle"})  # a controller that forgot us
RETRIED = frozenset({"capacity", "busy", "name_taken"})  # worth another try while resuming
MAX_READ_PER_TOKEN = 64  # messages read between two pre-drafted tokens, at most


class StateLost(LinkLost):
    """The controller answers but lost our registration or request (``code``), or is
    closing down (``retry_after_s``): a resume mends both."""

    def __init__(self, message: str, code: str = "", retry_after_s: float = 0.0):
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


class RequestCancelled(Exception):
    """Raised by an ``on_tokens`` callback to end the request now (its client hung up, a
    stop string matched): the controller is told (``cancel``), and the exception carries
    what was committed (``partial_result``)."""


class GaveUp(RuntimeError):
    """Resuming failed: nothing committed for the link timeout plus the resume timeout."""


def partial_result(exc: BaseException) -> GenerationResult | None:
    """What a request that failed with ``exc`` had committed (None if it had not started)."""
    return getattr(exc, "partial_result", None)


@dataclass
class _Request:
    """A request as the device holds it: its committed output is the truth to resume from."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingOptions
    server_decode: bool = False  # no drafter here: the controller decodes (version 5)
    committed: list[int] = field(default_factory=list)

    def start(self) -> P.Start:
        s = self.sampling
        return P.Start(self.request_id, self.prompt_ids, self.max_new_tokens, s.temperature,
                       s.top_p, s.top_k, s.seed, s.draft_top_k, self.server_decode)

    def resume(self, round_: int) -> P.Resume:
        s = self.sampling
        return P.Resume(self.request_id, self.prompt_ids, list(self.committed), round_,
                        self.max_new_tokens, s.temperature, s.top_p, s.top_k, s.seed,
                        s.draft_top_k, self.server_decode)


class ControllerBrokeProtocol(RuntimeError):
    """The controller sent what no correct controller sends (a verdict for another request
    or round, tokens outside the vocabulary, more tokens than the round allows)."""


def check_verdict(verdict: P.Verdict, request_id: str, round_: int, draft: list[int],
                  welcome: P.Welcome, vocab_size: int, room: int) -> None:
    """Raise ControllerBrokeProtocol unless ``verdict`` can answer round ``round_`` of
    ``request_id`` for ``draft``: the accepted draft prefix and one token of the
    vocabulary, all of it unless cut by the request's ``room`` (tokens it has left) or an
    end of sequence (then ``done``), and a next draft length within the welcome's limit."""
    n, accepted, tokens = len(verdict.tokens), verdict.accepted, verdict.tokens
    full = min(accepted + 1, room)
    cut_at_eos = 1 <= n < full and tokens[-1] in welcome.eos_token_ids and verdict.done
    problems = [
        (verdict.request_id != request_id, "a verdict for another request"),
        (verdict.round != round_, f"a verdict for round {verdict.round}, not {round_}"),
        (not 0 <= accepted <= len(draft), "an accepted count beyond the draft"),
        (n != full and not cut_at_eos, "a token count the round cannot have"),
        (tokens[: min(n, accepted)] != draft[: min(n, accepted)],
         "accepted tokens that are not the draft's"),
        (any(not 0 <= t < vocab_size for t in tokens), "a token outside the vocabulary"),
        (n == room and not verdict.done, "no end with the request's tokens all given"),
        (verdict.draft_len > welcome.max_draft_len, "a draft length beyond its own limit"),
    ]
    for broken, what in problems:
        if broken:
            raise ControllerBrokeProtocol(f"the controller sent {what}")


def confirmed_predraft(pre: DraftResult, uploaded: list[int],
                       verdict: P.Verdict) -> DraftResult | None:
    """What was drafted past the guess, if ``verdict`` confirmed it (all of ``uploaded``
    accepted, the bonus token the guess ``pre.tokens[0]``, the request not done): the next
    round's draft, already drafted. None otherwise: it is dropped."""
    if verdict.done or verdict.tokens != uploaded + pre.tokens[:1]:
        return None
    return pre.part(1)


@dataclass
class _Predrafts:
    """The tokens a device drafted past its uploads, until each is settled: the right
    guess (``predraft_paid``), uploaded in the next draft (``predraft_used``) or dropped
    (``predraft_wasted``); so ``predrafted`` = paid + used + wasted however a request ends."""

    stats: GenerationStats
    pre: DraftResult | None = None  # drafted while the last upload is verified
    ahead: DraftResult | None = None  # past a confirmed guess: the next draft starts with it

    def drafted(self, pre: DraftResult | None) -> None:
        if pre is not None:
            s, self.pre = self.stats, pre
            s.predraft_rounds += 1
            s.predraft_cut += pre.stopped
            s.predrafted += len(pre.tokens)
            s.predraft_s += pre.seconds

    def answered(self, uploaded: list[int], verdict: P.Verdict) -> None:
        """The verdict of ``uploaded`` (checked): the pre-draft goes ahead or is dropped."""
        if self.pre is not None:
            self.ahead = confirmed_predraft(self.pre, uploaded, verdict)
            if self.ahead is None:
                self.stats.predraft_wasted += len(self.pre.tokens)
            else:  # the guess was right; the rest is settled when the next draft goes up
                self.stats.predraft_paid += 1
            self.pre = None

    def uploaded(self, used: int) -> None:
        """A draft that began with ``used`` tokens of ``ahead`` went up; the rest is dropped."""
        if self.ahead is not None:
            self.stats.predraft_used += used
            self.stats.predraft_wasted += len(self.ahead.tokens) - used
            self.ahead = None

    def drop(self) -> None:
        """The request ends or the link was lost: nothing unsettled goes up any more."""
        for result in (self.pre, self.ahead):
            if result is not None:
                self.stats.predraft_wasted += len(result.tokens)
        self.pre = self.ahead = None


@dataclass
class GenerationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float = 0.0  # accepted / drafted
    tokens_per_round: float = 0.0
    tokens_per_s: float = 0.0  # generated tokens / wall time of the request (prefill included)
    draft_tokens_per_s: float = 0.0  # drafted tokens / time spent drafting
    goodput_tok_s: float = 0.0  # generated tokens / time from the first draft to the last verdict
    draft_len: list[int] = field(default_factory=list)  # draft length used in each round
    stopped_early: int = 0  # drafts ended on low confidence (control.stop_confidence)
    # Proactive drafting (the controller allows it: welcome.predraft_len > 0)
    predraft_rounds: int = 0  # rounds whose verification the device drafted through
    predraft_cut: int = 0  # of those, pre-drafts a message (the verdict) ended early
    predraft_paid: int = 0  # of those, verdicts that confirmed its guess
    # predrafted = predraft_paid (right guesses) + predraft_used + predraft_wasted
    predrafted: int = 0  # tokens drafted past uploads (guesses included)
    predraft_used: int = 0  # of those, tokens that went up in the next draft
    predraft_wasted: int = 0  # tokens drafted past uploads that were dropped
    predraft_s: float = 0.0  # time spent drafting past uploads


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    stats: GenerationStats
    partial: bool = False  # the request failed: ``tokens`` is what was committed

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SamplingOptions:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    draft_top_k: int = 32


@dataclass
class TelemetryOptions:
    spectral_efficiency: float = 0.0  # bit/s/Hz of this device's radio; 0 = unknown
    interval_s: float = 5.0  # host state and draft speed, this often during a request
    probe_bursts: int = 0  # uplink capacity probe at registration: pings of probe_bytes
    probe_bytes: int = 16 * 1024


def device_name(given: str | None, secure: bool) -> str | None:
    """The name a device asks for: as given; with keys none (the controller names it by
    its key); without keys one from the host name, made unique."""
    if given or secure:
        return given or None
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class DeviceAgent:
    def __init__(self, drafter: DraftEngine, link: ControllerLink,
                 device_id: str | None = None, telemetry: TelemetryOptions | None = None,
                 resume_timeout_s: float = 60.0, keepalive_s: float = 2.0,
                 board: BoardMonitor | None = None):
        self.drafter = drafter
        self.board = board  # a Jetson's tegrastats, reported with the telemetry
        self.link = link
        self.resume_timeout_s = resume_timeout_s
        self.keepalive_s = keepalive_s
        self.device_id = device_id or ""  # with keys, the controller names us (welcome)
        self.telemetry = telemetry or TelemetryOptions()
        self.welcome: P.Welcome | None = None
        self.control: P.Control | None = None  # the controller's latest decision for us
        self.link_report: LinkReport | None = None
        self._held: list[P.Message] = []  # messages that arrived during a link probe
        self._draft_s = self._drafted = 0.0  # totals over this agent's life: its speed
        self._telemetry_sent_at = -float("inf")
        self._progress_at = time.monotonic()  # the request's start or last verdict
        self._request_id = ""  # the request in flight (errors about others are ignored)
        self._cancelled: Callable[[], bool] = lambda: False  # the request in flight's
        self.resuming = False  # a lost link is being mended (read by serve's /health)
        # Asked wherever the agent waits, requests or not (a service stopping): True ends
        # the wait with RequestCancelled.
        self.interrupted: Callable[[], bool] = lambda: False

    def register(self, measure: bool = True) -> P.Welcome:
        """Hello -> welcome, then (``measure``) measure the link and send telemetry."""
        self.link.send(P.Hello(
            self.device_id, self.drafter.model_id, self.drafter.fingerprint,
            self.drafter.vocab_size,
            {"sampling": True, "max_top_k": P.MAX_TOP_K, "predraft": self.drafter.drafts},
        ))
        self.welcome = self._expect(P.Welcome)
        self.device_id = self.welcome.device_id
        log.info("registered with %s as %s (target %s)", self.link.endpoint, self.device_id,
                 self.welcome.target_model)
        if measure:
            self.measure_link()
        return self.welcome

    def measure_link(self) -> LinkReport:
        """Round trip (and uplink capacity if configured) by pings; then telemetry.

        Run between requests: pongs are told apart from other messages, which are held."""
        probe = LinkProbe(self.link)
        opts = self.telemetry
        try:
            self.link_report = probe.measure(rtt_count=3, burst_bytes=opts.probe_bytes,
                                             burst_count=opts.probe_bursts)
        except ValueError as exc:  # pongs that cannot time a burst: no uplink figure
            log.warning("uplink probe: %s; reporting no uplink capacity", exc)
            self.link_report = LinkReport(probe.rtt(3), 0.0, time.monotonic())
        self._held += probe.held
        self.send_telemetry()
        return self.link_report

    def send_telemetry(self) -> None:
        report = self.link_report
        self.link.send(P.Telemetry(
            draft_s_per_token=self._draft_s / self._drafted if self._drafted else 0.0,
            rtt_s=report.rtt_s if report else 0.0,
            uplink_bps=report.uplink_bps if report else 0.0,
            spectral_efficiency=self.telemetry.spectral_efficiency,
            host=host_state().to_dict(),
            board=board.to_dict() if (board := self.board and self.board.state()) else {},
        ))
        self._telemetry_sent_at = time.monotonic()

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingOptions | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Run one request to completion; ``on_tokens`` sees each round's committed tokens
        (and may end the request: RequestCancelled). ``cancelled`` is asked while the
        agent waits (for a verdict, between resume attempts): True ends the request too.

        A lost link (no answer for the link's timeout, its connection closed, the
        controller closing or restarted, before or during the request) is survived: the
        agent reconnects with backoff and resumes the request from its own transcript. It
        gives up (GaveUp) once nothing was committed for the link's timeout plus
        ``resume_timeout_s``. Whatever ends a request early carries what it had committed:
        ``partial_result(exc)``."""
        sampling = sampling or SamplingOptions()
        server_decode = not self.drafter.drafts
        request = _Request(uuid.uuid4().hex[:12], prompt_ids, max_new_tokens, sampling,
                           server_decode)
        self._request_id = request.request_id
        self._cancelled = cancelled or (lambda: False)
        started = time.perf_counter()
        self._progress_at = time.monotonic()
        tokens = request.committed
        stats = GenerationStats()
        draft_s = 0.0

        def result(partial: bool = False) -> GenerationResult:
            finished = time.perf_counter()
            stats.acceptance_rate = stats.accepted / stats.drafted if stats.drafted else 0.0
            stats.tokens_per_round = len(tokens) / stats.rounds if stats.rounds else 0.0
            stats.tokens_per_s = len(tokens) / (finished - started)
            drafting_s = draft_s + stats.predraft_s  # every token drafted, uploaded or not
            stats.draft_tokens_per_s = (stats.drafted - stats.predraft_used + stats.predrafted
                                        ) / drafting_s if drafting_s > 0 else 0.0
            stats.goodput_tok_s = len(tokens) / (finished - first_draft_at)
            text = self.drafter.detokenize(tokens).decode("utf-8", errors="replace")
            return GenerationResult(prompt_ids, list(tokens), text, stats, partial)

        first_draft_at = started
        book = _Predrafts(stats)
        try:
            draft_len = self._start(request)
            self.drafter.begin(prompt_ids)
            first_draft_at = time.perf_counter()
            while True:
                # Without a drafter the controller decodes: each verdict answers a round
                # with an empty draft that it made itself, one per forward.
                draft, predrafted = (DraftResult([]), 0) if server_decode else self._draft(
                    draft_len, sampling, book.ahead)
                draft_s += draft.seconds
                self._draft_s += draft.seconds
                self._drafted += len(draft.tokens) - predrafted
                try:
                    if not server_decode:
                        self.link.send(P.Draft(
                            request.request_id, stats.rounds, len(prompt_ids) + len(tokens),
                            draft.tokens, draft.q_ids, draft.q_counts, draft.seconds,
                            predrafted, draft.confidence_bytes() if self.control
                            and self.control.report_confidence else b"",
                        ))
                        book.uploaded(predrafted)
                        book.drafted(self._predraft(request, draft.tokens, draft_len))
                    verdict = self._expect(P.Verdict)
                except LinkLost as lost:
                    book.drop()
                    draft_len = self._resume(request, stats.rounds, lost)
                    continue  # the same round, drafted again (from the same transcript)
                check_verdict(verdict, request.request_id, stats.rounds, draft.tokens,
                              self.welcome, self.drafter.vocab_size, max_new_tokens - len(tokens))
                book.answered(draft.tokens, verdict)
                self._progress_at = time.monotonic()
                stats.rounds += 1
                stats.drafted += len(draft.tokens)
                stats.accepted += verdict.accepted
                stats.draft_len.append(len(draft.tokens))
                stats.stopped_early += draft.declined is not None
                self.drafter.accept(verdict.tokens)
                tokens += verdict.tokens
                if on_tokens is not None:
                    on_tokens(verdict.tokens)
                draft_len = verdict.draft_len
                if verdict.done:
                    return result()
                if time.monotonic() - self._telemetry_sent_at > self.telemetry.interval_s:
                    self.send_telemetry()
        except (KeyboardInterrupt, Exception) as exc:
            # Whatever ends it early: the controller frees it now (if the link can take a
            # word: a cancel is idempotent), and what it committed goes with the exception.
            self.link.send(P.Cancel(request.request_id), wait=False)
            book.drop()
            exc.partial_result = result(partial=True)
            raise

    def _draft(self, n: int, sampling: SamplingOptions,
               ahead: DraftResult | None) -> tuple[DraftResult, int]:
        """The next round's draft of ``n`` tokens and how many of them were pre-drafted:
        the first of ``ahead`` (drafted past a confirmed guess), the rest drafted now.
        ``seconds`` is the time spent now, the time the round waits for."""
        s = sampling
        used = min(n, len(ahead.tokens)) if ahead is not None else 0
        if (used and used == len(ahead.tokens) and ahead.declined is not None
                and ahead.declined < self._min_confidence()):
            rest = DraftResult([], declined=ahead.declined)  # it stopped there: so would we
        elif n > used:
            rest = self.drafter.draft(
                n - used, temperature=s.temperature, top_k=s.draft_top_k, seed=s.seed,
                after=ahead.tokens[:used] if used else (), min_confidence=self._min_confidence())
        else:
            rest = DraftResult([])
        if not used:
            return rest, 0
        return ahead.part(0, used).then(rest), used

    def _predraft(self, request: _Request, uploaded: list[int],
                  draft_len: int) -> DraftResult | None:
        """While ``uploaded`` is verified, draft on past it, guessing that all of it is
        accepted and that the bonus token is our own next one: the guess, then up to
        ``draft_len`` more, within the controller's cap (welcome.predraft_len) and the
        request's room. Stops at the first message that is not a pong or a control
        (the verdict, most likely), which is held for ``_expect``."""
        cap = self.welcome.predraft_len if self.welcome is not None else 0
        if not cap:
            return None
        room = request.max_new_tokens - len(request.committed) - len(uploaded)
        context = len(request.prompt_ids) + len(request.committed) + len(uploaded)
        n = min(cap, 1 + draft_len, room, self.drafter.n_ctx - context)
        ends = set(self.welcome.eos_token_ids) if self.welcome is not None else set()
        # The guess alone buys nothing; a draft that ends the request, if accepted, is never
        # followed; a verdict already in is answered at once.
        if n < 2 or ends.intersection(uploaded) or self._held or self._message_in():
            return None
        s = request.sampling
        options = {"temperature": s.temperature, "top_k": s.draft_top_k, "seed": s.seed}
        # The guess is never uploaded: however unsure, it is drafted. Past it, with
        # confidence stopping, the pre-draft stops where the next draft would, so what it
        # drafted past a confirmed guess is that draft's beginning.
        guess = self.drafter.draft(1, after=uploaded, **options)
        rest = (DraftResult([], stopped=True) if self._message_in() else self.drafter.draft(
            n - 1, after=[*uploaded, *guess.tokens], stop=self._message_in,
            min_confidence=self._min_confidence(), **options))
        pre = guess.then(rest)
        pre.seconds = guess.seconds + rest.seconds
        self._draft_s += pre.seconds
        self._drafted += len(pre.tokens)
        return pre

    def _min_confidence(self) -> float:
        """h of confidence stopping, as the controller set it (0: draft the whole cap)."""
        return self.control.stop_confidence if self.control is not None else 0.0

    def _message_in(self) -> bool:
        """True once a message that ``_expect`` must see has arrived (it is held for it),
        or the request is to end; controls are applied and pongs dropped on the way, at
        most MAX_READ_PER_TOKEN of them per call, so no flood holds a pre-draft (it
        ends after its tokens: ``_expect`` then deals with the flood, within its limits)."""
        if self._cancelled() or self.interrupted():
            return True
        for _ in range(MAX_READ_PER_TOKEN):
            if not self.link.pending():
                return False
            msg = self.link.receive()
            if isinstance(msg, P.Control):
                self._apply(msg)
            elif not isinstance(msg, P.Pong):
                self._held.append(msg)
                return True
        return False

    def _start(self, request: _Request) -> int:
        """Start ``request``; its first draft length. A link lost before the answer (the
        controller restarted between requests, say) resumes it at its first round."""
        try:
            self.link.send(request.start())
            return self._expect(P.Control).draft_len
        except LinkLost as lost:
            return self._resume(request, 0, lost)

    def _resume(self, request: _Request, round_: int, lost: LinkLost) -> int:
        """Reconnect with backoff and resume ``request`` at ``round_``; its draft length.

        Raises GaveUp once nothing was committed for the link's timeout plus
        ``resume_timeout_s``; refusals that cannot pass (a key no longer listed, a fatal
        error) raise as they are."""
        log.warning("link lost (%s); resuming request %s at round %d", lost,
                    request.request_id, round_)
        self.resuming = True
        try:
            return self._resume_until(request, round_, lost)
        finally:
            self.resuming = False

    def _resume_until(self, request: _Request, round_: int, lost: LinkLost) -> int:
        give_up_at = self._progress_at + self.link.timeout_s + self.resume_timeout_s
        delay = RESUME_FIRST_DELAY_S
        exc: Exception = lost
        if isinstance(lost, StateLost) and lost.retry_after_s > 0:  # closing: as it asked
            time.sleep(min(lost.retry_after_s, RESUME_MAX_DELAY_S))
        # Resumes that succeed but never lead to a verdict (a controller that fails on this
        # request each time) end too: the limit counts from the last commit, not this loss.
        while time.monotonic() < give_up_at:
            if self._cancelled() or self.interrupted():
                raise RequestCancelled("cancelled while resuming")
            try:
                self.link.reconnect()
                draft_len = self._ask_resume(request, round_)
                log.info("resumed request %s at position %d", request.request_id,
                         len(request.prompt_ids) + len(request.committed))
                return draft_len
            except (LinkLost, ControllerError) as failed:
                if isinstance(failed, ControllerError) and (failed.fatal
                                                            or failed.code not in RETRIED):
                    raise
                exc = failed
                if time.monotonic() + delay > give_up_at:
                    break
                log.info("resume failed (%s); again in %.1f s", exc, delay)
                time.sleep(delay * random.uniform(0.8, 1.2))  # jitter: not all at once
                delay = min(delay * 2, RESUME_MAX_DELAY_S)
        raise GaveUp(f"gave up resuming request {request.request_id}: nothing committed for "
                     f"{time.monotonic() - self._progress_at:.0f} s (--timeout "
                     f"{self.link.timeout_s:g} + --resume-timeout {self.resume_timeout_s:g}): "
                     f"{exc}")

    def _ask_resume(self, request: _Request, round_: int) -> int:
        """Resume on the new connection. With keys the controller keeps our registration
        across a reconnect (it is keyed by our key), so the resume goes first and the
        request keeps its KV cache, rolled back to our transcript; a controller that lost
        us (restarted, or dropped us when the heartbeats stopped) hears a hello first."""
        if self.link.curve is not None:
            self.link.send(request.resume(round_))
            try:
                return self._expect(P.Control).draft_len
            except StateLost as exc:
                if exc.code != "not_registered":
                    raise
        self.register(measure=False)
        self.link.send(request.resume(round_))
        return self._expect(P.Control).draft_len

    def check_registered(self) -> None:
        """Between requests: telemetry, then a ping answered by a pong. A controller that
        no longer holds our registration answers the telemetry with ``not_registered``
        first (StateLost); one that is gone does not answer (LinkLost)."""
        self.send_telemetry()
        self.link.send(P.Ping(time.monotonic()), wait=False)
        self._expect(P.Pong)

    def close(self) -> None:
        """Say goodbye if the link can take it now (never blocks)."""
        self.link.send(P.Bye(), wait=False)

    def _expect(self, kind: type[P.Message]) -> P.Message:
        """Wait for a message of ``kind``; control updates are applied on the way.

        While it waits it pings every ``keepalive_s``, so that a controller busy with a
        long prefill still answers; the link counts as lost (LinkLost) after the link's
        timeout without any answer, when its connection closes, when the controller says
        it is closing, or when its answer shows it lost our registration or request
        (it restarted): all of which a resume mends. Other errors raise ControllerError."""
        quiet_since = waiting_since = time.monotonic()
        while True:
            if time.monotonic() - waiting_since > max(self.link.timeout_s, self.resume_timeout_s):
                # Answers, but never the one we wait for: as good as lost (a resume asks
                # again; a controller that never answers it ends with GaveUp).
                raise LinkLost(f"no {kind.TYPE} from the controller in "
                               f"{time.monotonic() - waiting_since:.0f} s")
            if self._held:
                msg = self._held.pop(0)
            else:
                try:
                    msg = self.link.receive(self.keepalive_s)
                except LinkTimeout:
                    if self._cancelled() or self.interrupted():
                        raise RequestCancelled("cancelled while waiting") from None
                    silent = time.monotonic() - quiet_since
                    if silent >= self.link.timeout_s:
                        raise LinkTimeout(self.link.silence(silent)) from None
                    self.link.send(P.Ping(time.monotonic()), wait=False)
                    continue
                quiet_since = time.monotonic()
            if isinstance(msg, P.Control):
                self._apply(msg)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, P.Closing):
                raise StateLost("the controller is closing down",
                                retry_after_s=msg.retry_after_s)
            if isinstance(msg, P.Error) and msg.request_id not in ("", self._request_id):
                log.debug("ignoring an error about an earlier request: %s", msg.message)
                continue
            if isinstance(msg, P.Error):
                if not msg.fatal and msg.code in LOST_STATE:
                    raise StateLost(f"the controller lost our state ({msg.code})", msg.code)
                raise ControllerError(msg)
            if not isinstance(msg, P.Control | P.Pong):
                log.debug("ignoring %s while waiting for %s", msg.TYPE, kind.TYPE)

    def _apply(self, control: P.Control) -> None:
        """The controller's decision: draft length (from the next verdict on) and the
        uplink rate our share of the band buys, which the pacer enforces."""
        self.control = control
        self.link.pacer.set_rate(control.uplink_rate_bps)
        log.debug("control: draft length %d, share %.3f, uplink %.0f bit/s, stop below %.2f",
                  control.draft_len, control.bandwidth_share, control.uplink_rate_bps,
                  control.stop_confidence)
