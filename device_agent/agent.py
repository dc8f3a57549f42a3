"""The device agent's generation loop: draft, upload, apply the verdict, repeat."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from device_agent.drafter import Drafter
from device_agent.link import ControllerLink
from device_agent.telemetry import LinkProbe, LinkReport, host_state
from edge_controller import protocol as P

log = logging.getLogger(__name__)


class ControllerError(RuntimeError):
    """The controller refused us (``fatal``) or one of our requests."""

    def __init__(self, error: P.Error):
        super().__init__(f"controller error [{error.code}]: {error.message}")
        self.code = error.code
        self.fatal = error.fatal


class ControllerBrokeProtocol(RuntimeError):
    """The controller sent what no correct controller sends (a verdict for another request
    or round, tokens outside the vocabulary, more tokens than the round allows)."""


def check_verdict(verdict: P.Verdict, request_id: str, round_: int, draft: list[int],
                  vocab_size: int, room: int) -> None:
    """Raise ControllerBrokeProtocol unless ``verdict`` can answer round ``round_`` of
    ``request_id`` for ``draft``: its committed tokens are the accepted draft prefix and one
    token of the vocabulary, cut at most to ``room`` (the tokens the request has left)."""
    n = len(verdict.tokens)
    problems = [
        (verdict.request_id != request_id, "a verdict for another request"),
        (verdict.round != round_, f"a verdict for round {verdict.round}, not {round_}"),
        (not 0 <= verdict.accepted <= len(draft), "an accepted count beyond the draft"),
        (not 1 <= n <= min(verdict.accepted + 1, room), "a token count the round cannot have"),
        (verdict.tokens[: min(n, verdict.accepted)] != draft[: min(n, verdict.accepted)],
         "accepted tokens that are not the draft's"),
        (any(not 0 <= t < vocab_size for t in verdict.tokens), "a token outside the vocabulary"),
    ]
    for broken, what in problems:
        if broken:
            raise ControllerBrokeProtocol(f"the controller sent {what}")


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


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    stats: GenerationStats

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


class DeviceAgent:
    def __init__(self, drafter: Drafter, link: ControllerLink, device_id: str | None = None,
                 telemetry: TelemetryOptions | None = None):
        self.drafter = drafter
        self.link = link
        self.device_id = device_id or ""  # with keys, the controller names us (welcome)
        self.telemetry = telemetry or TelemetryOptions()
        self.welcome: P.Welcome | None = None
        self.control: P.Control | None = None  # the controller's latest decision for us
        self.link_report: LinkReport | None = None
        self._held: list[P.Message] = []  # messages that arrived during a link probe
        self._draft_s = self._drafted = 0.0  # totals over this agent's life: its speed
        self._telemetry_sent_at = -float("inf")

    def register(self) -> P.Welcome:
        """Hello -> welcome, then measure the link and send the first telemetry."""
        self.link.send(P.Hello(
            self.device_id, self.drafter.model_id, self.drafter.fingerprint,
            self.drafter.vocab_size, {"sampling": True, "max_top_k": P.MAX_TOP_K},
        ))
        self.welcome = self._expect(P.Welcome)
        self.device_id = self.welcome.device_id
        log.info("registered with %s as %s (target %s)", self.link.endpoint, self.device_id,
                 self.welcome.target_model)
        self.measure_link()
        return self.welcome

    def measure_link(self) -> LinkReport:
        """Round trip (and uplink capacity if configured) by pings; then telemetry.

        Run between requests: pongs are told apart from other messages, which are held."""
        probe = LinkProbe(self.link)
        opts = self.telemetry
        self.link_report = probe.measure(rtt_count=3, burst_bytes=opts.probe_bytes,
                                         burst_count=opts.probe_bursts)
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
        ))
        self._telemetry_sent_at = time.monotonic()

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingOptions | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Run one request to completion; ``on_tokens`` sees each round's committed tokens."""
        sampling = sampling or SamplingOptions()
        request_id = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        self.link.send(P.Start(
            request_id, prompt_ids, max_new_tokens, sampling.temperature, sampling.top_p,
            sampling.top_k, sampling.seed, sampling.draft_top_k,
        ))
        draft_len = self._expect(P.Control).draft_len
        self.drafter.begin(prompt_ids)
        tokens: list[int] = []
        stats = GenerationStats()
        draft_s = 0.0
        first_draft_at = time.perf_counter()
        while True:
            draft = self.drafter.draft(
                draft_len, temperature=sampling.temperature, top_k=sampling.draft_top_k,
                seed=sampling.seed,
            )
            draft_s += draft.seconds
            self._draft_s += draft.seconds
            self._drafted += len(draft.tokens)
            self.link.send(P.Draft(
                request_id, stats.rounds, len(prompt_ids) + len(tokens), draft.tokens,
                draft.q_ids, draft.q_counts, draft.seconds,
            ))
            verdict = self._expect(P.Verdict)
            check_verdict(verdict, request_id, stats.rounds, draft.tokens,
                          self.drafter.vocab_size, max_new_tokens - len(tokens))
            stats.rounds += 1
            stats.drafted += len(draft.tokens)
            stats.accepted += verdict.accepted
            stats.draft_len.append(len(draft.tokens))
            self.drafter.accept(verdict.tokens)
            tokens += verdict.tokens
            if on_tokens is not None:
                on_tokens(verdict.tokens)
            draft_len = verdict.draft_len
            if verdict.done:
                break
            if time.monotonic() - self._telemetry_sent_at > self.telemetry.interval_s:
                self.send_telemetry()
        finished = time.perf_counter()
        stats.acceptance_rate = stats.accepted / stats.drafted if stats.drafted else 0.0
        stats.tokens_per_round = len(tokens) / stats.rounds
        stats.tokens_per_s = len(tokens) / (finished - started)
        stats.draft_tokens_per_s = stats.drafted / draft_s if draft_s > 0 else 0.0
        stats.goodput_tok_s = len(tokens) / (finished - first_draft_at)
        text = self.drafter.detokenize(tokens).decode("utf-8", errors="replace")
        return GenerationResult(prompt_ids, tokens, text, stats)

    def close(self) -> None:
        """Say goodbye if the link can take it now (never blocks)."""
        self.link.send(P.Bye(), wait=False)

    def _expect(self, kind: type[P.Message]) -> P.Message:
        """Wait for a message of ``kind``; errors raise, control updates are applied."""
        while True:
            msg = self._held.pop(0) if self._held else self.link.receive()
            if isinstance(msg, P.Control):
                self._apply(msg)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, P.Error):
                raise ControllerError(msg)
            if not isinstance(msg, P.Control):
                log.debug("ignoring %s while waiting for %s", msg.TYPE, kind.TYPE)

    def _apply(self, control: P.Control) -> None:
        """The controller's decision: draft length (from the next verdict on) and the
        uplink rate our share of the band buys, which the pacer enforces."""
        self.control = control
        self.link.pacer.set_rate(control.uplink_rate_bps)
        log.info("control: draft length %d, share %.3f, uplink %.0f bit/s", control.draft_len,
                 control.bandwidth_share, control.uplink_rate_bps)
