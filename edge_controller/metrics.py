"""Prometheus metrics of the controller (one registry per controller instance)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from device_agent.board import BOARD_FIGURES, board_figures

if TYPE_CHECKING:
    from edge_controller.draft_control import Decision, DeviceEstimates

PREFIX = "multispin"
ROUND_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, d = self.registry, ["device"]
        self.goodput = Gauge(f"{PREFIX}_device_goodput_tok_s", "committed tokens/s", d, registry=r)
        self.acceptance = Gauge(f"{PREFIX}_device_acceptance",
                                "censored per-token acceptance estimate", d, registry=r)
        self.draft_len = Gauge(f"{PREFIX}_device_draft_len", "draft length in force", d,
                               registry=r)
        self.share = Gauge(f"{PREFIX}_device_bandwidth_share", "uplink share in force", d,
                           registry=r)
        self.stop_confidence = Gauge(f"{PREFIX}_device_stop_confidence", "confidence policy: "
                                     "the stopping threshold h in force (0: none)", d,
                                     registry=r)
        self.draft_s = Gauge(f"{PREFIX}_device_draft_s_per_token", "drafting time per token", d,
                             registry=r)
        self.delay = Gauge(f"{PREFIX}_device_delay_s", "per-round delay estimate d_k", d,
                           registry=r)
        self.rtt = Gauge(f"{PREFIX}_device_rtt_s", "round trip the device measured by pings",
                         d, registry=r)
        self.uplink = Gauge(f"{PREFIX}_device_uplink_bps", "uplink capacity the device probed "
                            "(0 = not probed)", d, registry=r)
        self.round_s = Histogram(f"{PREFIX}_round_seconds", "round time, first draft in to "
                                 "verdicts out", buckets=ROUND_BUCKETS, registry=r)
        self.verify_s = Histogram(f"{PREFIX}_verify_seconds", "batched verification time",
                                  buckets=ROUND_BUCKETS, registry=r)
        self.batch = Gauge(f"{PREFIX}_round_devices", "devices in the last round", registry=r)
        self.busy = Counter(f"{PREFIX}_verifier_busy_seconds", "time the verifier spent in "
                            "forwards (verification and prefill): its busy fraction is the "
                            "rate of this", registry=r)
        self.sessions = Gauge(f"{PREFIX}_sessions", "registered devices", registry=r)
        self.kv_slots = Gauge(f"{PREFIX}_kv_slots_in_use", "verifier KV slots held by requests",
                              registry=r)
        self.rejected = Counter(f"{PREFIX}_rejected_messages", "messages refused, by code",
                                ["code"], registry=r)
        self.board = Gauge(f"{PREFIX}_device_board", "a Jetson device's tegrastats figure "
                           "(cpu_percent, gpu_percent, emc_percent, ram_used_mb, "
                           "power_total_mw, temperature_max_c)", d + ["figure"], registry=r)
        self.plan_goodput = Gauge(f"{PREFIX}_plan_goodput_tok_s",
                                  "sum goodput the current plan predicts", registry=r)
        self.online_plays = Gauge(f"{PREFIX}_device_online_plays", "online policies: rounds "
                                  "each draft length was played (discounted, all delay "
                                  "buckets)", d + ["draft_len"], registry=r)
        self._online_arms: dict[str, set[str]] = {}  # labels set, to remove them
        self.predrafts = Counter(f"{PREFIX}_device_predrafts", "proactive: drafts drafted "
                                 "(partly) before the verdict before them, which confirmed "
                                 "the device's guess", d, registry=r)
        self.predrafted = Counter(f"{PREFIX}_device_predrafted_tokens", "proactive: tokens of "
                                  "those drafts drafted before that verdict", d, registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def show_board(self, device_id: str, board: dict) -> None:
        """The figures of a device's ``Telemetry.board`` worth a time series."""
        for name, value in board_figures(board).items():
            self.board.labels(device_id, name).set(value)

    def show_device(self, device_id: str, estimates: DeviceEstimates,
                    decision: Decision) -> None:
        """A device's estimates (draft_control.DeviceEstimates) and decision in force."""
        self.goodput.labels(device_id).set(estimates.goodput_tok_s)
        self.acceptance.labels(device_id).set(estimates.acceptance.mean)
        self.draft_len.labels(device_id).set(decision.draft_len)
        self.share.labels(device_id).set(decision.bandwidth_share)
        self.stop_confidence.labels(device_id).set(decision.stop_confidence)
        self.draft_s.labels(device_id).set(estimates.draft_s_per_token.value or 0.0)
        self.delay.labels(device_id).set(estimates.delay_s.value or 0.0)
        if estimates.bandits:
            plays = sum(bandit.plays for bandit in estimates.bandits.values())
            for arm in map(int, plays.nonzero()[0]):
                self.online_plays.labels(device_id, str(arm)).set(float(plays[arm]))
                self._online_arms.setdefault(device_id, set()).add(str(arm))

    def forget_device(self, device_id: str) -> None:
        for gauge in (self.goodput, self.acceptance, self.draft_len, self.share,
                      self.stop_confidence, self.draft_s,
                      self.delay, self.rtt, self.uplink, self.predrafts, self.predrafted):
            with contextlib.suppress(KeyError):  # never reported yet
                gauge.remove(device_id)
        for figure in (*BOARD_FIGURES, "temperature_max_c"):
            with contextlib.suppress(KeyError):
                self.board.remove(device_id, figure)
        for arm in self._online_arms.pop(device_id, ()):
            self.online_plays.remove(device_id, arm)
