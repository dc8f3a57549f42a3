"""The edge controller: the loop that ties transport, sessions, scheduler, verifier and
draft control together.

It owns what a message means: it decodes what the transport hands up, registers devices
(:mod:`edge_controller.sessions`), feeds drafts to the scheduler, runs the batch the
scheduler closes through the verifier in one forward, commits and answers each device, and
pushes draft control's decisions. Handlers run between polls in one thread. Forwards run
in the verifier's thread (:mod:`edge_controller.verifier.worker`): under synchronous rounds
the loop waits for each; under continuous batching it goes on with messages, and forwards
land (are answered) when done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import reprlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from edge_controller import protocol as P
from edge_controller.config import ControllerConfig
from edge_controller.control.estimators import AffineFit
from edge_controller.draft_control import (
    FIXED_POLICY,
    Decision,
    DraftController,
    calibrate_verify_time,
    seed_verify_time,
)
from edge_controller.logs import PeerLog
from edge_controller.metrics import ControllerMetrics
from edge_controller.scheduler import ContinuousScheduler, Scheduler, SyncScheduler
from edge_controller.sessions import RequestStats, Session, SessionRegistry
from edge_controller.transport import Peer, Transport
from edge_controller.verifier.slots import (
    NEAR_TIE_MARGIN,
    CapacityError,
    SamplingParams,
    SlotTable,
    VerifyItem,
    VerifyOutcome,
)
from edge_controller.verifier.worker import Forward, VerifierWorker

log = logging.getLogger(__name__)

REVOKED = "this device's key is no longer on the controller's allowlist"
POLL_TICK_S = 0.05
MAX_MESSAGES_PER_TICK = 256  # bound the work between round checks...
MESSAGE_BUDGET_S = 0.02  # ...and its time, once a round is due
MIN_RIDE_ALONG = 16  # prompt tokens a round carries at least, however small the round
PREFILL_MAX_WAIT_S = 2.0  # a prompt waiting this long is prefilled next, before shorter ones
CLOSING_RETRY_S = 1.0  # devices told the controller is stopping come back after this
CLOSING_LINGER_S = 1.0  # how long the last answers and closings may take to go out


@dataclass(frozen=True)
class TargetInfo:
    name: str
    fingerprint: str
    vocab_size: int
    eos_token_ids: frozenset[int]

    @classmethod
    def from_model(cls, name: str, model, tokenizer) -> TargetInfo:
        """Describe a loaded transformers target: vocabulary, fingerprint, end of sequence."""
        from models.fingerprint import fingerprint_hf

        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        return cls(name, fingerprint_hf(tokenizer), len(tokenizer), frozenset(eos_ids))


@dataclass
class _Round:
    """A forward the loop started (a round of drafts, maybe with a prompt chunk, or a
    prompt chunk alone), and what it needs to answer it."""

    forward: Forward
    batch: list[Session]
    prefilling: Session | None
    tokens: int  # what the forward runs: drafts + 1 each, and the prefill chunk
    opened_at: float | None  # when its oldest draft arrived
    drafted_at: list[float]  # when each draft of the batch arrived
    predrafted: list[int]  # how many of each draft's tokens were pre-drafted


class EdgeController:
    def __init__(self, config: ControllerConfig, verifier: SlotTable, target: TargetInfo,
                 verify_time: AffineFit | None = None, transport: Transport | None = None,
                 torch_threads: int | None = None):
        self.config = config
        self.verifier = verifier
        self.target = target
        self.draft_control = DraftController(config.control, verify_time or AffineFit(),
                                             max_delay_s=config.server.round_deadline_s,
                                             scheduler=config.server.scheduler,
                                             predraft_len=config.server.predraft_len)
        self.continuous = config.server.scheduler in ("continuous", "proactive")
        self.scheduler: Scheduler = (
            ContinuousScheduler(config.server.batch_tokens) if self.continuous
            else SyncScheduler(config.server.round_deadline_s))
        self.worker = VerifierWorker(verifier, torch_threads)  # every forward runs there
        self._round: _Round | None = None  # continuous: the round whose forward is in flight
        self._close_after_forward: list[int] = []  # slots of requests ended mid-forward
        self._deferred: list[tuple[Peer, list[bytes]]] = []  # resumes of slots in a forward...
        self._replaying = False  # ...and what came after them, replayed once it landed
        self.metrics = ControllerMetrics()
        self.sessions = SessionRegistry()
        self.transport = transport or Transport.from_config(config)
        self.endpoint: str | None = None  # the bound address, once serving
        self.rounds_run = 0
        self.largest_batch = 0
        self._timeline = None  # open file of server.timeline while serving
        self._warnings = PeerLog(log)
        self._events = PeerLog(log, logging.INFO)  # what devices do: no device floods the log
        self._started = time.monotonic()

    # ---- the loop --------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, ready_timeout_s: float = 60.0) -> Iterator[EdgeController]:
        """Serve in a background thread until the block ends (tests, benchmarks)."""
        stop, ready = threading.Event(), threading.Event()
        thread = threading.Thread(target=self.serve, args=(stop, ready), daemon=True)
        thread.start()
        if not ready.wait(ready_timeout_s):
            raise RuntimeError("controller did not start serving")
        try:
            yield self
        finally:
            stop.set()
            thread.join(30)

    def serve(self, stop: threading.Event | None = None, ready: threading.Event | None = None):
        """Bind and serve until ``stop`` is set (or KeyboardInterrupt)."""
        stop = stop or threading.Event()
        fit = self.draft_control.verify_time
        try:
            if self.config.control.policy != FIXED_POLICY and not fit.ready:
                if self.config.control.verify_time_file:
                    seed_verify_time(fit, self.config.control.verify_time_file,
                                     context=self.config.limits.max_len // 4)
                else:
                    self.worker.call(calibrate_verify_time, self.verifier,
                                     self.target.vocab_size, fit)
            self.endpoint = self.transport.open()
            server = self.config.server
            if server.metrics_port:
                try:
                    self.metrics.serve(server.metrics_port, server.metrics_bind)
                except OSError as exc:
                    where = f"{server.metrics_bind}:{server.metrics_port}"
                    raise OSError(f"metrics on {where}: {exc.strerror or exc} (choose "
                                  "another --metrics-port)") from None
            if server.timeline:
                self._timeline = open(server.timeline, "a", buffering=1)  # noqa: SIM115
                # Event times count from this start; the wall clock ties restarts together.
                self._record(serving=self.target.name, wall=time.time())
            log.info("serving %s on %s", self.target.name, self.endpoint)
            if ready is not None:
                ready.set()
            while not stop.is_set():
                now = time.monotonic()
                if self.worker.busy:  # wake when its forward is done
                    wait, wake = POLL_TICK_S, self.worker.wake_fd
                else:
                    wait = 0.0 if self._prefill_alone() else self.scheduler.wait_s(
                        now, POLL_TICK_S)
                    wake = None
                if self.transport.poll(wait, wake):
                    self._take_messages()
                self._land()
                now = time.monotonic()
                if self.transport.allowlist_changed(now):
                    self._end_unlisted()
                self._drop_lost(now)
                self._end_idle(now)
                if not self.worker.busy:
                    if self.scheduler.due(self.sessions, now):
                        self.run_round()
                    elif (prefilling := self._prefill_alone()) is not None:
                        self._prefill(prefilling)
                self._replan(now)
            self._close_down()
        finally:
            self._land(wait_s=60.0)
            for session in self.sessions:
                self._end_request(session)
            self.worker.close()
            self.transport.close(linger_s=CLOSING_LINGER_S)
            if self._timeline is not None:
                with contextlib.suppress(OSError):
                    self._timeline.close()
            log.info("controller stopped")

    def _take_messages(self) -> None:
        """Handle waiting messages: at most MAX_MESSAGES_PER_TICK, and no longer than
        MESSAGE_BUDGET_S once a round is due, so that no flood holds a round."""
        started = time.monotonic()
        for _ in range(MAX_MESSAGES_PER_TICK):
            now = time.monotonic()
            if now - started > MESSAGE_BUDGET_S and (
                    self.worker.done
                    or (not self.worker.busy and self.scheduler.due(self.sessions, now))):
                return
            message = self.transport.receive()
            if message is None:
                return
            self._on_frames(*message)

    # ---- one round -------------------------------------------------------------------
    def run_round(self, inline: bool = False) -> None:
        """Verify the drafts the scheduler picks in one batched forward (with one prefill
        chunk of a newcomer's prompt), then answer each device: at once under synchronous
        rounds (or ``inline``), when the forward lands under continuous batching."""
        opened_at = self.scheduler.opened_at
        batch = self.scheduler.close(self.sessions)
        items = [_verify_item(s) for s in batch]
        prefilling = self._prefilling()
        round_tokens = sum(len(i.draft_tokens) + 1 for i in items)
        drafted = sum(len(i.draft_tokens) + 1 for s, i in zip(batch, items, strict=True)
                      if not s.server_decode)
        chunk = self._chunk(prefilling, round_tokens, drafted) if prefilling else 0
        forward = Forward(items, (prefilling.slot, chunk) if chunk else None)
        round_ = _Round(forward, batch, prefilling if chunk else None, round_tokens + chunk,
                        opened_at, [s.drafted_at for s in batch],
                        [s.pending.predrafted for s in batch])
        self._launch(round_, inline)

    def _launch(self, round_: _Round, inline: bool = False) -> None:
        """Under continuous batching, start the forward in the verifier's thread (answered
        when it lands); else (or ``inline``) wait for it there and answer at once."""
        if self.continuous and not inline:
            self._round = round_
            self.worker.submit(round_.forward)
        else:
            self._answer_round(round_, self.worker.run(round_.forward))

    def _chunk(self, prefilling: Session, round_tokens: int, drafted: int) -> int:
        """Prompt tokens that ride along in a forward of ``round_tokens`` tokens, of which
        ``drafted`` are drafting devices'.

        Synchronous: at most as many as the drafting devices' round, so the forward at most
        doubles however many prompts are queued and however often a device restarts one
        (requests decoded here are in every round, so a round of only those takes a whole
        chunk: prompts would otherwise never be prefilled alone). Continuous: what the
        forward's token budget leaves. At least MIN_RIDE_ALONG, so that a busy verifier
        still gets prompts in."""
        limits = self.config.limits
        if self.continuous:
            room = self.config.server.batch_tokens - round_tokens
        else:
            room = drafted or limits.prefill_chunk
        return min(limits.prefill_chunk, max(room, MIN_RIDE_ALONG), prefilling.prefill_left)

    def _land(self, wait_s: float = 0.0) -> None:
        """Answer the forward in flight if it is done (waiting up to ``wait_s``)."""
        forward = self.worker.collect(wait_s)
        if forward is None:
            return
        round_, self._round = self._round, None
        self._answer_round(round_, forward)
        self._replaying = True
        try:  # in order; a frame's handling may drop its session, and its later frames
            while self._deferred:
                peer, body = self._deferred.pop(0)
                self._on_frames(self._as_now(peer), body)
        finally:
            self._replaying = False

    def _as_now(self, peer: Peer) -> Peer:
        """A held frame's sender as the allowlist names it now (revoked keys: no name)."""
        if not self.transport.secure or peer.key is None:
            return peer
        return dataclasses.replace(peer, name=self.transport.allowlist.name_of(peer.key))

    def _answer_round(self, round_: _Round, forward: Forward) -> None:
        """Commit what a forward verified and answer each device. Guarded like the
        handlers: what fails for one session ends that session's request, the others go
        on; a request that ended during the forward gets no answer."""
        batch, prefilling = round_.batch, round_.prefilling
        self.metrics.busy.inc(forward.seconds)
        prefilled = prefilling is not None and prefilling.slot == forward.prefill[0]
        if forward.error is None:
            outcomes = forward.outcomes
            if prefilled:
                try:
                    self._prefilled(prefilling)
                except Exception as exc:
                    self._warnings(prefilling.device_id, "after prefill: %r", exc, exc_info=True)
                    self._fail(prefilling, "internal", f"controller error: {type(exc).__name__}")
        elif batch:
            outcomes = self._isolate(round_, forward.error)
        else:  # a prompt chunk alone
            outcomes = []
            if prefilled:
                self._warnings(prefilling.device_id, "prefill failed: %r", forward.error,
                               exc_info=forward.error)
                self._fail(prefilling, "internal",
                           f"prefill failed: {type(forward.error).__name__}")
        for slot in self._close_after_forward:
            self.verifier.close(slot)
        if self._close_after_forward:
            self.metrics.kv_slots.set(self.verifier.slots_in_use)
        self._close_after_forward.clear()
        if not batch:
            self._record(prefill_s=forward.seconds,
                         started=round(forward.started - self._started, 4))
            return
        try:
            self.draft_control.on_round(round_.tokens, forward.seconds)
        except Exception as exc:  # the estimate is worth less than the round: keep serving
            self._warnings("draft control", "verify-time estimate failed: %r", exc,
                           exc_info=True)
        self.rounds_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        log.debug("round: %d drafts, %d tokens, %.1f ms", len(batch), round_.tokens,
                  forward.seconds * 1e3)
        committed = {}
        items = forward.items
        for session, item, outcome in zip(batch, items, outcomes, strict=True):
            if outcome is None or session.slot != item.slot:  # ended during the forward
                continue
            try:
                committed[session.device_id] = self._answer(session, outcome)
            except Exception as exc:
                self._warnings(session.device_id, "answering failed: %r", exc, exc_info=True)
                self._fail(session, "internal", f"controller error: {type(exc).__name__}")
        self._learn_lengths(round_, items, committed)
        decisions = self.draft_control.decisions
        self._record(verify_s=forward.seconds, started=round(forward.started - self._started, 4),
                     devices=[
            {"device": s.device_id, "draft_len": len(i.draft_tokens),
             "predrafted": predrafted,
             "accepted": o.accepted if o else None, "committed": committed.get(s.device_id, 0),
             "waited_s": round(forward.started - drafted_at, 4),
             "share": decisions[s.device_id].bandwidth_share if s.device_id in decisions
             else None}
            for s, i, o, drafted_at, predrafted in zip(batch, items, outcomes, round_.drafted_at,
                                                       round_.predrafted, strict=True)
        ])
        self.metrics.verify_s.observe(forward.seconds)
        if round_.opened_at is not None:
            self.metrics.round_s.observe(time.monotonic() - round_.opened_at)
        self.metrics.batch.set(len(batch))

    def _isolate(self, round_: _Round, error: Exception) -> list[VerifyOutcome | None]:
        """A batched forward failed: never let one session's bad state take the others
        down. Prefill and verify one by one, and fail only the sessions that fail alone."""
        self._warnings("verifier", "batched verification failed (%r); isolating sessions",
                       error, exc_info=error)
        prefilling, prefill = round_.prefilling, round_.forward.prefill
        if prefilling is not None and prefilling.slot == prefill[0]:
            alone = self.worker.run(Forward([], prefill))  # inline: the loop waits here
            if alone.error is None:
                self._prefilled(prefilling)
            else:
                self._warnings(prefilling.device_id, "prefill failed: %r", alone.error,
                               exc_info=alone.error)
                self._fail(prefilling, "internal", f"prefill failed: {type(alone.error).__name__}")
        outcomes: list[VerifyOutcome | None] = []
        for session, item in zip(round_.batch, round_.forward.items, strict=True):
            if session.slot != item.slot:  # its request ended during the forward
                outcomes.append(None)
                continue
            try:
                outcomes.extend(self.worker.call(self.verifier.verify, [item]))
            except Exception as exc:
                self._warnings(session.device_id, "verification failed: %r", exc,
                               exc_info=True)
                self._fail(session, "internal", f"verification failed: {type(exc).__name__}")
                outcomes.append(None)
        return outcomes

    # ---- prefill -------------------------------------------------------------------------
    def _prefilling(self) -> Session | None:
        """The request whose prompt is prefilled next: the one with the least left (a short
        prompt is not stuck behind long ones), then the one that started first; but one
        that has waited PREFILL_MAX_WAIT_S goes first, oldest first, so that a stream of
        short prompts (new requests cost a device nothing) cannot starve a long one."""
        waiting = [s for s in self.sessions if s.generating and s.prefill_left > 0]
        if not waiting:
            return None
        oldest = min(waiting, key=lambda s: s.started_at)
        if time.monotonic() - oldest.started_at > PREFILL_MAX_WAIT_S:
            return oldest
        return min(waiting, key=lambda s: (s.prefill_left, s.started_at))

    def _prefill_alone(self) -> Session | None:
        """The request to prefill in a forward of its own now: only while no round is open
        (every member is drafting), so that no round waits for more than one chunk."""
        return self._prefilling() if self.scheduler.opened_at is None else None

    def _prefill(self, session: Session) -> None:
        """One chunk of ``session``'s prompt in a forward of its own (no draft waits)."""
        chunk = min(self.config.limits.prefill_chunk, session.prefill_left)
        if self.continuous:
            chunk = min(chunk, self.config.server.batch_tokens)
        self._launch(_Round(Forward([], (session.slot, chunk)), [], session, chunk, None, [],
                            []))

    def _prefilled(self, session: Session) -> None:
        session.prefill_left = self.verifier.prefill_left(session.slot)
        if session.prefill_left == 0:
            log.debug("%s: prompt prefilled", session.device_id)
            self.scheduler.ready(session, time.monotonic())
            self._decode_next(session)

    def _decode_next(self, session: Session) -> None:
        """A request the controller decodes itself gets its next round at once: an empty
        draft (the verdict is the target's next token), queued like a device's draft."""
        if not (session.server_decode and session.in_rounds and session.pending is None):
            return
        session.pending = P.Draft(session.request.request_id, session.next_round,
                                  self.verifier.length(session.slot), [])
        session.pending_bytes = 0
        session.drafted_at = now = time.monotonic()
        self.scheduler.on_draft(session, now)

    def _learn_lengths(self, round_: _Round, items: list, committed: dict[str, int]) -> None:
        """Online policies: credit each member's length with this round (arrivals from the
        members' previous verdicts to these; draft_control.on_round_result). New lengths
        go with the next verdicts, as the device takes its length from each verdict."""
        played = {s.device_id: (len(i.draft_tokens), committed[s.device_id], drafted_at)
                  for s, i, drafted_at in zip(round_.batch, items, round_.drafted_at,
                                              strict=True) if s.device_id in committed}
        try:
            changed = self.draft_control.on_round_result(played, time.monotonic())
        except Exception as exc:  # learning is worth less than the round: keep serving
            self._warnings("draft control", "online update failed: %r", exc, exc_info=True)
            return
        for device_id, decision in changed.items():
            log.debug("online: %s drafts %d next", device_id, decision.draft_len)
            self._show(device_id)

    def _answer(self, session: Session, outcome: VerifyOutcome) -> int:
        """Commit a verified draft, send the verdict; return how many tokens it committed."""
        draft, request = session.pending, session.request
        tokens, done = session.commit_round(outcome, self.target.eos_token_ids)
        if outcome.margin < NEAR_TIE_MARGIN:
            log.warning("%s: near-tie in target logits (margin %.2e) at position %d",
                        session.device_id, outcome.margin, draft.position)
        decision = self.draft_control.decisions[session.device_id]
        if not session.server_decode:
            try:
                self.draft_control.on_verdict(session.device_id, outcome.accepted,
                                              len(draft.tokens), len(tokens), time.monotonic(),
                                              draft.confidence)
            except Exception as exc:  # an estimate is worth less than the verdict
                self._warnings("draft control", "verdict estimate failed: %r", exc,
                               exc_info=True)
            self._show(session.device_id)
        verdict = P.Verdict(request.request_id, draft.round, outcome.accepted, tokens, done,
                            decision.draft_len)
        session.last_verdict = (verdict, draft)
        self._send(session, verdict)
        session.answered_at = time.monotonic()
        if not done:
            self._decode_next(session)
        else:
            stats = session.stats
            self._events(session.device_id, "request %s done: %d tokens in %d rounds, "
                         "acceptance %.2f, smallest top-2 logit margin %.2e",
                         request.request_id, stats.generated, stats.rounds,
                         stats.acceptance_estimate, stats.min_margin)
            self._end_request(session)
        return len(tokens)

    # ---- messages --------------------------------------------------------------------
    def _on_frames(self, peer: Peer, body: list[bytes]) -> None:
        now = time.monotonic()
        msg: P.Message | None = None
        session = self.sessions.get(peer.identity)
        # Our answers go in the device's version: the one it registered with, until the
        # frame tells (a refused frame of a registered device is answered in its version).
        version = session.version if session is not None else P.PROTOCOL_VERSION
        self.sessions.frame_on(peer.route, peer.identity)
        try:
            if self.transport.secure and peer.name is None:
                self._refuse_unlisted(peer)
                return
            if len(body) != 1:
                raise P.ProtocolError("malformed", f"expected 1 frame per message, got {len(body)}")
            msg, version = P.decode_versioned(body[0])
            if session is not None:  # valid traffic: the registration is alive
                session.last_seen = now
                if not isinstance(msg, P.Ping):  # pings are answered where they came from
                    self.sessions.moved(session, peer.route)
            if session is not None and not isinstance(msg, P.Ping) and self._held(session, msg):
                self._deferred.append((peer, body))
                return
            if isinstance(msg, P.Draft) and session is not None:
                session.pending_bytes = len(body[0])
            if isinstance(msg, P.Hello):
                self._on_hello(peer, msg, version)
            elif isinstance(msg, P.Ping):
                self._reply(peer.route, P.Pong(msg.sent_at, len(body[0]), now), version)
            elif session is None and isinstance(msg, P.Bye):
                return  # a refused or already dropped device saying goodbye: nothing to free
            elif session is None:
                raise P.ProtocolError("not_registered", "send hello before anything else")
            elif isinstance(msg, P.Start):
                self._on_start(session, msg)
            elif isinstance(msg, P.Resume):
                self._on_resume(session, msg)
            elif isinstance(msg, P.Cancel):
                self._on_cancel(session, msg)
            elif isinstance(msg, P.Draft):
                self._on_draft(session, msg)
            elif isinstance(msg, P.Telemetry):
                log.debug("%s telemetry: %s", session.device_id, reprlib.repr(msg))
                self.draft_control.on_telemetry(session.device_id, msg.spectral_efficiency,
                                                msg.draft_s_per_token)
                self.metrics.rtt.labels(session.device_id).set(msg.rtt_s)
                self.metrics.uplink.labels(session.device_id).set(msg.uplink_bps)
                self.metrics.show_board(session.device_id, msg.board)
            elif isinstance(msg, P.Bye):
                self._drop(session, "left")
            else:
                raise P.ProtocolError("unexpected", f"{msg.TYPE} is not a device message")
        except P.ProtocolError as exc:
            self._warnings(session.device_id if session else peer.label,
                                "rejected message: [%s] %s", exc.code, exc)
            self.metrics.rejected.labels(exc.code).inc()
            # A refused draft, start or resume names its request: the device can tell an
            # answer about an old request from one about the request it waits on.
            self._reply(peer.route, P.Error(exc.code, str(exc), fatal=exc.fatal,
                                            request_id=getattr(msg, "request_id", "")),
                        exc.answer_version or version)
            if exc.fatal and session is not None:  # it cannot go on: free what it holds
                self._drop(session, f"refused [{exc.code}]; its session is dropped")
        except Exception as exc:  # a bug in a handler must not stop the controller
            self._warnings(session.device_id if session else peer.label, "handler failed: %r",
                           exc, exc_info=True)
            if session is not None:
                self._fail(session, "internal", f"controller error: {type(exc).__name__}")

    def _held(self, session: Session, msg: P.Message) -> bool:
        """A resume rolls the sequence back, so it waits for the forward computing on that
        sequence to land; whatever the device sends after it waits too, in order (a cancel
        must not overtake the resume it follows)."""
        if self._replaying:
            return False
        if any(held.identity == session.identity for held, _ in self._deferred):
            return True
        return (isinstance(msg, P.Resume) and self._round is not None
                and session.slot in self._round.forward.slots)

    def _on_hello(self, peer: Peer, msg: P.Hello, version: int) -> None:
        if msg.tokenizer_fingerprint != self.target.fingerprint:
            raise P.ProtocolError(
                "tokenizer_mismatch",
                f"the draft model's tokenizer fingerprint differs from the target's "
                f"({self.target.name!r}: {self.target.fingerprint[:16]}...): their "
                "vocabularies differ, so its drafts cannot be verified. Use a draft built "
                "from the target's tokenizer.",
                fatal=True,
            )
        name = self.sessions.name_for(peer.identity, peer.name if self.transport.secure
                                      else None, msg.device_id)
        displaced = self.sessions.displaced_by(peer.identity, name)
        if not displaced and len(self.sessions) >= self.config.limits.max_devices:
            raise P.ProtocolError("capacity", f"the controller holds {len(self.sessions)} "
                                  "registrations, its limit: try again later")
        for old in displaced:
            self._drop(old, "registered again; its old session is dropped")
        # Proactive drafting for devices that can (version 6, a drafter): their guesses
        # make drafts arrive at once after a verdict, which only continuous batching uses.
        predraft = (self.config.server.predraft_len if self.config.server.scheduler ==
                    "proactive" and msg.capabilities.get("predraft") is True and version >= 6
                    else 0)
        self.sessions.add(Session(peer.identity, peer.route, name, msg.draft_model,
                                  time.monotonic(), version, predraft))
        self.draft_control.join(name)
        self.metrics.sessions.set(len(self.sessions))
        self._events(name, "registered (draft %s, protocol %d)", reprlib.repr(msg.draft_model),
                     version)
        limits = self.config.limits
        self._reply(peer.route, P.Welcome(
            name, self.target.name, limits.max_new_tokens,
            self.config.control.max_draft_len, sorted(self.target.eos_token_ids), predraft,
        ), version)

    def _on_start(self, session: Session, msg: P.Start) -> None:
        if session.generating:
            raise P.ProtocolError("busy", "a request is already in flight for this device")
        self._open_request(session, msg, msg.prompt_ids)

    def _on_resume(self, session: Session, msg: P.Resume) -> None:
        """The device's transcript is the truth. A request the controller still holds at or
        beyond it is rolled back to it (rounds the device never heard of are undone); any
        other is re-created from it (its prompt and output prefilled again, in chunks)."""
        transcript = msg.prompt_ids + msg.committed_ids
        request, slot = session.request, session.slot
        session.last_verdict = None  # rolled back or re-created: no round is answered yet
        held = self.verifier.tokens(slot) if slot is not None else []
        # Rolled back only as the same request (prompt, limits, sampling): a resume must not
        # move tokens between prompt and output to escape max_new_tokens.
        if (request is not None and msg.as_start() == request
                and held[: len(transcript)] == transcript
                and (len(held) == len(transcript) or session.prefill_left == 0)):
            self.verifier.truncate(slot, len(transcript))
            session.pending, session.next_round = None, msg.round
            self.scheduler.on_draft_gone(self.sessions)
            session.stats.generated = len(msg.committed_ids)
            self._events(session.device_id, "request %s resumed at position %d",
                         msg.request_id, len(transcript))
            self._send(session, _control(self.draft_control.decisions[session.device_id]))
            session.answered_at = time.monotonic()
            self._decode_next(session)
            return
        if request is not None:
            self._end_request(session)
        self._open_request(session, msg.as_start(), transcript, msg.round,
                           generated=len(msg.committed_ids))

    def _open_request(self, session: Session, msg: P.Start, tokens: list[int], round_: int = 0,
                      generated: int = 0) -> None:
        """Check a request, give it a KV slot for ``tokens`` (prefilled later, in chunks),
        and answer with the device's control."""
        limits = self.config.limits
        if msg.max_new_tokens > limits.max_new_tokens:
            raise P.ProtocolError(
                "invalid", f"max_new_tokens {msg.max_new_tokens} exceeds {limits.max_new_tokens}")
        self._check_ids(tokens, "prompt")
        if msg.top_k > self.target.vocab_size:
            raise P.ProtocolError(
                "invalid", f"top_k must be in 0..{self.target.vocab_size} (the vocabulary)")
        need = len(msg.prompt_ids) + msg.max_new_tokens + self.config.control.max_draft_len + 1
        if need > limits.max_len:
            raise P.ProtocolError(
                "too_long", f"prompt + max_new_tokens + draft needs {need} positions; "
                f"this controller holds {limits.max_len} per session")
        try:  # prefilled in chunks, between and inside rounds
            session.slot = self.verifier.open(tokens, prefill=False)
        except CapacityError as exc:
            raise P.ProtocolError("capacity", str(exc)) from None
        self.metrics.kv_slots.set(self.verifier.slots_in_use)
        session.request, session.next_round, session.pending = msg, round_, None
        session.last_verdict = None
        session.prefill_left = self.verifier.prefill_left(session.slot)
        session.missed_rounds = 0
        session.started_at = session.drafted_at = time.monotonic()
        session.stats = RequestStats(generated=generated)
        self._events(session.device_id, "request %s, %d prompt tokens (%d of them output), "
                     "up to %d new, temperature %g", msg.request_id, len(tokens), generated,
                     msg.max_new_tokens, msg.temperature)
        # A request the controller decodes drafts nothing and uploads nothing: draft
        # control does not plan for it.
        others = {} if msg.server_decode else self.draft_control.on_request_start(
            session.device_id)
        self._send(session, _control(self.draft_control.decisions[session.device_id]))
        session.answered_at = time.monotonic()
        self._push_decisions(others)
        self._decode_next(session)

    def _on_cancel(self, session: Session, msg: P.Cancel) -> None:
        """End the request if it is the one in flight; silent either way (idempotent)."""
        if session.request is not None and session.request.request_id == msg.request_id:
            self._events(session.device_id, "request %s cancelled", msg.request_id)
            self._end_request(session)

    def _on_draft(self, session: Session, msg: P.Draft) -> None:
        last = session.last_verdict
        if last is not None and _same_draft(msg, last[1]):
            # A duplicate (its verdict was lost, even the request's last): the same verdict
            # again, no second commit.
            self._send(session, last[0])
            return
        request = session.request
        if request is None or msg.request_id != request.request_id:
            raise P.ProtocolError("stale", "no request of that id in flight")
        if request.server_decode:
            raise P.ProtocolError("invalid", "this request is decoded by the controller "
                                  "(server_decode): it takes no drafts")
        if session.pending is not None or msg.round != session.next_round:
            raise P.ProtocolError(
                "stale", f"draft for round {msg.round}, expected round {session.next_round}")
        expected = self.verifier.length(session.slot)
        if msg.position != expected:
            raise P.ProtocolError(
                "stale", f"draft at position {msg.position}, sequence is at {expected}")
        if len(msg.tokens) > self.config.control.max_draft_len:
            raise P.ProtocolError(
                "invalid", f"draft of {len(msg.tokens)} tokens exceeds max_draft_len "
                f"{self.config.control.max_draft_len}")
        if msg.predrafted > max(session.predraft_len - 1, 0):  # the guess never goes up
            raise P.ProtocolError("invalid", f"{msg.predrafted} tokens pre-drafted; this "
                                  f"device may pre-draft {session.predraft_len} (its guess "
                                  "included)")
        if msg.predrafted and (last is None or last[0].accepted < len(last[1].tokens)):
            raise P.ProtocolError("invalid", "a pre-draft counts only after a verdict that "
                                  "accepted all of the draft before it")
        sampling = request.temperature > 0
        if sampling != bool(msg.q_ids) and msg.tokens:
            raise P.ProtocolError(
                "invalid", "sampling requests need q for every draft token; greedy ones none")
        self._check_ids(msg.tokens, "draft")
        for ids in msg.q_ids:
            self._check_ids(ids, "q")
        session.pending = msg
        now = time.monotonic()
        session.drafted_at = now
        self.draft_control.on_draft(session.device_id, len(msg.tokens), msg.draft_s,
                                    session.pending_bytes, now - session.answered_at,
                                    first_round=msg.round == 0, predrafted=msg.predrafted,
                                    declined=len(msg.confidence) > len(msg.tokens))
        if msg.predrafted:
            self.metrics.predrafts.labels(session.device_id).inc()
            self.metrics.predrafted.labels(session.device_id).inc(msg.predrafted)
        self.scheduler.on_draft(session, now)

    def _check_ids(self, ids: list[int], what: str) -> None:
        vocab = self.target.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise P.ProtocolError(
                "invalid", f"{what} token id outside the vocabulary 0..{vocab - 1}")

    # ---- bookkeeping -----------------------------------------------------------------
    def _end_request(self, session: Session) -> None:
        if session.slot is not None:
            if self._round is not None and session.slot in self._round.forward.slots:
                self._close_after_forward.append(session.slot)  # the forward's until it lands
            else:
                self.verifier.close(session.slot)
                self.metrics.kv_slots.set(self.verifier.slots_in_use)
        session.slot, session.request, session.pending = None, None, None
        self.draft_control.on_request_end(session.device_id)
        self.scheduler.on_draft_gone(self.sessions)

    def _drop(self, session: Session, why: str) -> None:
        """Forget a device: free its slot, its estimates, its metrics and any frames held
        for it (they belong to the registration that is gone)."""
        self._events(session.device_id, "%s", why)
        self._deferred = [(p, b) for p, b in self._deferred if p.identity != session.identity]
        self._end_request(session)
        self.sessions.remove(session)
        self.draft_control.leave(session.device_id)
        self.metrics.forget_device(session.device_id)
        self.metrics.sessions.set(len(self.sessions))

    def _replan(self, now: float) -> None:
        try:
            changed = self.draft_control.maybe_resolve(now)
        except Exception as exc:  # a solver failure must not stop serving: keep the decisions
            self._warnings("draft control", "failed (%r); keeping the current decisions", exc,
                           exc_info=True)
            return
        self._push_decisions(changed)

    def _push_decisions(self, changed: dict[str, Decision]) -> None:
        for session in self.sessions:
            if session.device_id in changed:
                self._show(session.device_id)
                self._send(session, _control(changed[session.device_id]))
        if changed:
            self.metrics.plan_goodput.set(self.draft_control.plan_goodput_tok_s)
            # Every decision in force for the round's members, not only the changed ones: a
            # device whose first decision the plan kept must still be in the record.
            decisions = self.draft_control.decisions
            in_force = sorted((set(changed) | self.draft_control.active) & set(decisions))
            self._record(plan={d: vars(decisions[d]) for d in in_force},
                         predicted_goodput_tok_s=self.draft_control.plan_goodput_tok_s,
                         estimates=self.draft_control.snapshot(),
                         verify_time=self.draft_control.verify_time.coefficients(),
                         max_delay_s=self.draft_control.max_delay_s)

    def _record(self, **event) -> None:
        if self._timeline is None:
            return
        event["t"] = round(time.monotonic() - self._started, 4)
        try:
            self._timeline.write(json.dumps(event) + "\n")
        except OSError as exc:  # a full disk must not stop serving: stop the timeline
            log.error("timeline %s: %s; no more timeline events", self.config.server.timeline,
                      exc)
            with contextlib.suppress(OSError):  # closing flushes: it fails the same way
                self._timeline.close()
            self._timeline = None

    def _show(self, device_id: str) -> None:
        self.metrics.show_device(device_id, self.draft_control.devices[device_id],
                                 self.draft_control.decisions[device_id])

    def _fail(self, session: Session, code: str, message: str) -> None:
        request_id = session.request.request_id if session.request else ""
        self._end_request(session)
        self._send(session, P.Error(code, message, fatal=False, request_id=request_id))

    def _end_idle(self, now: float) -> None:
        limits, deadline = self.config.limits, self.config.server.round_deadline_s
        for session in self.sessions:
            if session.idle(now, limits.idle_rounds, limits.idle_s, deadline):
                self._fail(session, "idle", f"no draft for {limits.idle_rounds} rounds and "
                           f"{limits.idle_s:g} s: the request is ended and its KV slot freed")
            elif session.generating and now - session.started_at > limits.max_request_s:
                self._fail(session, "too_slow", f"the request took more than "
                           f"{limits.max_request_s:g} s: ended, its KV slot freed")

    def _drop_lost(self, now: float) -> None:
        """Drop the registrations whose connection is gone: closed by the device, or by the
        transport after ``session_timeout_s`` without heartbeats (a link down). An idle
        device with a live connection stays registered; one that comes back resumes."""
        for route in self.transport.disconnected():
            session = self.sessions.on_route(route)
            if session is not None:
                self._drop(session, "lost its connection; its session is dropped")
        timeout = self.config.server.session_timeout_s
        for session in self.sessions:  # left without a route (another connection took it)
            if session.route is None and now - session.last_seen > timeout:
                self._drop(session, f"without a connection for {timeout:g} s; dropped")

    def _close_down(self) -> None:
        """Stop: the loop admits nothing more; the round in flight is finished, and every
        device is told to resume against the next start."""
        log.info("closing down: finishing the round in flight, telling %d device(s)",
                 len(self.sessions))
        self._land(wait_s=60.0)
        if any(s.in_rounds and s.pending is not None for s in self.sessions):
            self.run_round(inline=True)
        for session in self.sessions:
            if session.route is not None:
                self._reply(session.route, P.Closing(CLOSING_RETRY_S), session.version)

    def _end_unlisted(self) -> None:
        """The allowlist changed: end the sessions whose key is gone, or listed anew."""
        name_of = self.transport.allowlist.name_of
        for session in self.sessions.no_longer_listed(name_of):
            renamed = name_of(session.identity)
            self._expel(session, REVOKED if renamed is None else
                        f"this device's key is now listed as {renamed!r}: register again")

    def _refuse_unlisted(self, peer: Peer) -> None:
        """A frame on a connection admitted before its key was revoked."""
        self.metrics.rejected.labels("revoked").inc()
        session = self.sessions.get(peer.identity)
        if session is not None:
            self._expel(session, REVOKED)
        else:
            self._reply(peer.route, P.Error("revoked", REVOKED, fatal=True))

    def _expel(self, session: Session, why: str) -> None:
        route = session.route
        self._drop(session, "revoked; its session is dropped")  # gone before it is told
        if route is not None:
            self._reply(route, P.Error("revoked", why, fatal=True), session.version)

    def _send(self, session: Session, msg: P.Message) -> None:
        """Answer a registered device on its route, in its protocol version; a device that
        cannot be reached is dropped."""
        sent = session.route is not None and self._reply(session.route, msg, session.version)
        if not sent and self.sessions.get(session.identity) is session:
            self._drop(session, "unreachable; its session is dropped")

    def _reply(self, route: bytes, msg: P.Message, version: int = P.PROTOCOL_VERSION) -> bool:
        return self.transport.send(route, P.encode(msg, version))


def _same_draft(a: P.Draft, b: P.Draft) -> bool:
    """The same round's draft sent again (its timing may be measured anew)."""
    return (a.request_id, a.round, a.position, a.tokens) == (b.request_id, b.round, b.position,
                                                              b.tokens)


def _control(decision: Decision) -> P.Control:
    return P.Control(decision.draft_len, decision.bandwidth_share, decision.uplink_rate_bps,
                     decision.stop_confidence, decision.report_confidence)


def _verify_item(session: Session) -> VerifyItem:
    draft, request = session.pending, session.request
    return VerifyItem(
        slot=session.slot,
        draft_tokens=draft.tokens,
        sampling=SamplingParams(request.temperature, request.top_p, request.top_k, request.seed),
        q_ids=draft.q_ids or None,
        q_counts=draft.q_counts or None,
    )
