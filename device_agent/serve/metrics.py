"""The board's /metrics: what its agent does for the programs that use it, and its board."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from device_agent.agent import GenerationResult
from device_agent.board import BoardMonitor, board_figures

PREFIX = "multispin_agent"
OUTCOMES = ("done", "stopped", "cancelled", "refused", "unavailable", "failed")


class ServeMetrics:
    def __init__(self, queue_depth: Callable[[], int], board: BoardMonitor | None = None):
        self.registry = r = CollectorRegistry()
        self._board = board
        self.requests = Counter(f"{PREFIX}_requests", "API requests by outcome: done, stopped "
                                "(a stop string), cancelled (the client hung up), refused (by "
                                "the controller), unavailable (controller unreachable), failed",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of requests",
                                     registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens",
                                         "tokens generated (committed by the controller)",
                                         registry=r)
        self.drafted = Counter(f"{PREFIX}_drafted_tokens", "tokens drafted", registry=r)
        self.accepted = Counter(f"{PREFIX}_accepted_tokens", "drafted tokens accepted",
                                registry=r)
        self.acceptance = Gauge(f"{PREFIX}_acceptance", "accepted / drafted, last request",
                                registry=r)
        self.draft_speed = Gauge(f"{PREFIX}_draft_tokens_per_s", "drafting speed, last request",
                                 registry=r)
        self.goodput = Gauge(f"{PREFIX}_goodput_tok_s", "generated tokens/s of the last "
                             "request, first draft to last verdict", registry=r)
        self.tokens_per_round = Gauge(f"{PREFIX}_tokens_per_round", "tokens per verified "
                                      "round, last request", registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "requests waiting for the agent",
                                 registry=r)
        self.queue_depth.set_function(queue_depth)
        self.registered = Gauge(f"{PREFIX}_registered", "1 while registered with the "
                                "controller", registry=r)
        self.board = Gauge(f"{PREFIX}_board", "this Jetson's tegrastats figures", ["figure"],
                           registry=r)

    def finished(self, outcome: str, prompt_tokens: int, result: GenerationResult | None,
                 completion_tokens: int) -> None:
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)
        if result is None or not result.stats.rounds:
            return
        stats = result.stats
        self.drafted.inc(stats.drafted)
        self.accepted.inc(stats.accepted)
        self.acceptance.set(stats.acceptance_rate)
        self.draft_speed.set(stats.draft_tokens_per_s)
        self.goodput.set(stats.goodput_tok_s)
        self.tokens_per_round.set(stats.tokens_per_round)

    def render(self) -> bytes:
        state = self._board.state() if self._board is not None else None
        if state is not None:
            for name, value in board_figures(state.to_dict()).items():
                self.board.labels(name).set(value)
        return generate_latest(self.registry)
