"""Confidence stopping (issue 19): the wire (protocol 7), the model and its plan
(control/confidence.py), the estimate, the simulator's replay of real drafts with their
confidences, and a live run on the default models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_controller import protocol as P
from edge_controller.config import ConfigError, ControlConfig, load_config
from edge_controller.control import SystemParams, UserParams, VerifyTime
from edge_controller.control.confidence import (
    BINS,
    confidence_plan,
    expected_draft,
    round_goodput,
    stopping_rates,
)
from edge_controller.control.estimators import AffineFit, ConfidenceEstimate
from edge_controller.control.scenario import load_scenario
from edge_controller.control.solvers import solve
from edge_controller.draft_control import DraftController, _consistent
from edge_controller.simulator import simulate_scenario
from edge_controller.simulator.engine import Decisions, SyncSimulation
from edge_controller.simulator.runs import DraftReplay
from models.traces import default_traces
from tests.test_online_control import live_pair
from tests.test_simulator import SCENARIOS


def test_the_wire_carries_thresholds_and_confidences_from_version_7():
    control = P.Control(4, 0.5, 1e6, stop_confidence=0.3, report_confidence=True)
    assert P.decode(P.encode(control)) == control
    old, version = P.decode_versioned(P.encode(control, 6))
    assert version == 6 and old.stop_confidence == 0.0 and not old.report_confidence
    draft = P.Draft("r1", 2, 10, [5, 6], confidence=bytes([250, 200, 40]))
    assert P.decode(P.encode(draft)).confidence == bytes([250, 200, 40])
    with pytest.raises(P.ProtocolError, match="confidence holds"):
        P.decode(P.encode(P.Draft("r1", 2, 10, [5, 6], confidence=bytes(4))))
    with pytest.raises(P.ProtocolError, match="confidence holds"):
        P.decode(P.encode(P.Draft("r1", 2, 10, [5, 6], confidence=bytes(1))))
    with pytest.raises(P.ProtocolError, match="stop_confidence"):
        P.decode(P.encode(P.Control(4, 0.5, stop_confidence=1.0)))


def test_stopping_rates_and_expected_drafts_match_the_closed_form():
    seen = np.zeros((1, BINS))
    seen[0, 5:] = 1.0  # top-1 probabilities spread evenly over 0.5 .. 1
    reached = seen.copy()
    reached[0, 9] = 3.0  # after an accepted prefix the draft is surer
    rate = np.linspace(0.0, 0.95, BINS)[None]
    p, q = stopping_rates(seen, reached, rate)
    assert p[0, 0] == 1.0 and p[0, 7] == pytest.approx(3 / 5)  # h = 0.7: bins 7, 8, 9
    assert q[0, 7] == pytest.approx((rate[0, 7] + rate[0, 8] + 3 * rate[0, 9]) / 7)
    assert q[0, 0] == pytest.approx((rate[0, 5:8].sum() + rate[0, 8] + 3 * rate[0, 9]) / 7)
    drafted, evaluated, committed = expected_draft(p[0, 7], q[0, 7], np.array(3))
    pp, qq = p[0, 7], q[0, 7]
    assert drafted == pytest.approx(pp + pp**2 + pp**3)
    assert evaluated == pytest.approx(1 + pp + pp**2)
    assert committed == pytest.approx(1 + qq + qq**2 + qq**3)
    assert expected_draft(1.0, 0.5, np.array(4))[:2] == (4.0, 4.0)  # h = 0: a plain draft


def _two_devices(draft_s: float) -> tuple[SystemParams, UserParams, tuple]:
    system = SystemParams(5e6, 264.0, VerifyTime(0.03, 0.0002), 800.0, 16)
    users = UserParams(np.array([0.005, draft_s]), np.array([0.8, 0.6]), np.array([3.0, 3.0]),
                       0.01)
    seen = np.ones((2, BINS))
    # confidence means something: tokens drafted below 0.5 are never accepted
    rate = np.where(np.arange(BINS) < 5, 0.0, (np.arange(BINS) + 0.5) / BINS)
    return system, users, stopping_rates(seen, seen, np.stack([rate, rate]))


def test_the_plan_stops_where_tokens_stop_paying_and_never_scores_below_its_start():
    system, users, (p, q) = _two_devices(draft_s=0.04)
    start = solve("heterogeneous", system, users).draft_len
    plan, h = confidence_plan(system, users, p, q, start)
    at_start, _ = round_goodput(system, users, p[:, 0], q[:, 0], start)
    assert plan.goodput_tok_s > 1.05 * float(at_start)
    drafting = plan.draft_len > 0
    assert drafting.any() and (h[drafting] >= 0.5).all()  # below 0.5 nothing is accepted
    assert plan.bandwidth_share.sum() == pytest.approx(1.0)
    fixed, fixed_h = confidence_plan(system, users, p, q, start, fixed_h=0.3)
    assert (fixed_h == 0.3).all() and fixed.goodput_tok_s <= plan.goodput_tok_s + 1e-9


def test_the_round_waits_for_the_slowest_realised_draft():
    """Two devices whose drafts may stop: the expected round is longer than the max of
    the expected finish times, and a plain draft's round is the deterministic one."""
    system, users, _ = _two_devices(draft_s=0.01)
    cap = np.array([8, 8])
    plain, _ = round_goodput(system, users, np.ones(2), np.full(2, 0.7), cap)
    stopped, shares = round_goodput(system, users, np.full(2, 0.7), np.full(2, 0.6), cap)
    assert shares.sum() == pytest.approx(1.0)
    drafted, evaluated, committed = expected_draft(np.full(2, 0.7), np.full(2, 0.6), cap)
    mean_field = committed.sum() / (
        (evaluated * users.draft_s_per_token + users.delay_s
         + system.upload_bits(drafted) / (shares * system.bandwidth_hz * 3.0)).max()
        + system.verify_time.of_tokens((drafted + 1).sum()))
    assert stopped < mean_field
    expected = (1 + sum(0.7**i for i in range(1, 9))) * 2
    assert plain == pytest.approx(expected / (
        max(8 * users.draft_s_per_token + users.delay_s
            + system.upload_bits(8) / (np.array([0.5, 0.5]) * system.bandwidth_hz * 3.0))
        + system.verify_time.of_tokens(18)), rel=0.05)


def test_the_estimate_counts_bins_seen_reached_tried_and_accepted():
    est = ConfidenceEstimate(forget=1.0)
    # 4 tokens (0.98, 0.9, 0.63, 0.3 as bytes), then a declined one at 0.1; 2 accepted
    est.update(bytes([250, 230, 160, 77, 26]), drafted=4, accepted=2)
    assert est.seen.sum() == 5 and est.seen[[1, 3, 6, 9]].tolist() == [1, 1, 1, 2]
    assert est.tried.sum() == 3 and est.accepted.sum() == 2  # positions 1-3 judged
    assert est.reached.tolist() == est.tried.tolist()
    assert est.accepted[9] == 2 and est.tried[6] == 1 and est.accepted[6] == 0
    est.update(bytes([250, 26]), drafted=1, accepted=1)  # all accepted: the declined too
    assert est.reached[1] == 1 and est.tried[1] == 0 and est.reached[9] == 3
    est.update(bytes(7), drafted=4, accepted=0)  # not one byte per token: ignored
    assert est.drafts == 2
    rate = est.accept_rate()
    assert rate[9] > 0.95 - 0.1 and rate[6] < 0.65  # shrunk towards the bins' midpoints


def _controller(**config) -> DraftController:
    fit = AffineFit()
    fit.update(1, 0.05)
    fit.update(20, 0.25)
    control = DraftController(ControlConfig(policy="confidence", resolve_interval_s=0,
                                            **config), fit)
    for device in ("sure", "new"):
        control.join(device)
        control.on_request_start(device)
    return control


def _drafts(control: DraftController, device: str, n: int, confidence: bytes,
            accepted: int) -> None:
    for _ in range(n):
        drafted = len(confidence)
        control.on_draft(device, drafted, 0.02 * drafted, 60 + 30 * drafted, gap_s=0.2)
        control.on_verdict(device, accepted, drafted, accepted + 1, 0.0, confidence)


def test_the_controller_asks_for_confidences_and_plans_h_only_for_devices_that_sent_them():
    control = _controller()
    assert all(d.report_confidence and d.stop_confidence == 0
               for d in control.decisions.values())
    # "sure": sure tokens accepted, unsure ones (the last two) rejected
    _drafts(control, "sure", 40, bytes([240, 240, 30, 20]), accepted=2)
    for _ in range(3):  # "new" drafts, its confidences never arrive (a version 6 agent)
        control.on_draft("new", 4, 0.08, 180, gap_s=0.2)
        control.on_verdict("new", 2, 4, 3, 0.0)
    control.maybe_resolve(now=10.0)
    sure, new = control.decisions["sure"], control.decisions["new"]
    assert new.stop_confidence == 0.0 and new.report_confidence
    assert control.devices["sure"].confidence.drafts == 40
    assert control.devices["new"].confidence.drafts == 0
    assert sure.report_confidence and sure.stop_confidence >= 0.0


def test_an_impossible_report_is_not_learnt_from():
    control = _controller()
    control.on_draft("sure", 2, 0.04, 100, gap_s=0.3)  # the draft's (cap, h): (4, 0)
    cap = control.decisions["sure"].draft_len
    # a decline at the cap, and a decline with no threshold in force: both impossible
    control.on_verdict("sure", 1, cap, 2, 0.0, bytes([200] * cap + [10]))
    control.on_verdict("sure", 1, 2, 2, 0.0, bytes([200, 200, 10]))
    assert control.devices["sure"].confidence.drafts == 0
    control.on_verdict("sure", 1, 2, 2, 0.0, bytes([200, 200]))
    assert control.devices["sure"].confidence.drafts == 1


def test_a_stopped_drafts_speed_counts_the_declined_evaluation():
    control = _controller()
    control.on_draft("sure", 3, 0.04, 100, gap_s=0.3, declined=True)  # no h: no decline
    assert control.devices["sure"].draft_s_per_token.value == pytest.approx(0.04 / 3)
    control = _controller()
    control.decisions["sure"] = replace(control.decisions["sure"], stop_confidence=0.5)
    control.on_draft("sure", 3, 0.04, 100, gap_s=0.3, declined=True)  # 4 evaluations
    assert control.devices["sure"].draft_s_per_token.value == pytest.approx(0.01)


@pytest.mark.parametrize(("confidence", "drafted", "cap", "h", "consistent"), [
    (bytes([200, 130]), 2, 4, 0.5, True),  # both at or above 0.5 (byte 125)
    (bytes([200, 120]), 2, 4, 0.5, False),  # a drafted token below h
    (bytes([200, 130, 100]), 2, 4, 0.5, True),  # declined below h, below the cap
    (bytes([200, 130, 125]), 2, 4, 0.5, False),  # "declined" at h
    (bytes([200, 130, 100]), 2, 2, 0.5, False),  # declined at the cap
    (bytes([200, 130, 0]), 2, 4, 0.0, False),  # declined with no h
])
def test_reports_a_device_could_not_have_made_are_told_apart(confidence, drafted, cap, h,
                                                             consistent):
    assert _consistent(confidence, drafted, cap, h) is consistent


def test_bins_below_the_threshold_keep_their_acceptance():
    est = ConfidenceEstimate(forget=0.5)
    est.update(bytes([40, 40]), drafted=2, accepted=0)  # bin 1: tried once, rejected
    before = est.accept_rate()[1]
    for _ in range(20):  # then h = 0.5: bin 1 is never drafted again
        est.update(bytes([240, 240, 40]), drafted=2, accepted=2, stop_confidence=0.5)
    assert est.accept_rate()[1] == pytest.approx(before) and est.tried[1] == 1.0
    assert est.seen[1] == pytest.approx(2.0, rel=1e-3)  # still seen: each draft declines it


@pytest.mark.parametrize("value", [0.25, 1.0, -0.1])
def test_a_fixed_threshold_must_be_a_bin_edge(value):
    with pytest.raises(ConfigError, match="stop_confidence"):
        load_config(None, control__stop_confidence=value)


def test_the_confidence_policy_needs_synchronous_rounds():
    with pytest.raises(ConfigError, match="confidence policy"):
        load_config(None, control__policy="confidence", server__scheduler="continuous")


def test_replayed_drafts_take_the_nearest_recorded_draft_and_its_true_curve():
    scenario = load_scenario(SCENARIOS / "steady-6.toml")
    replay = DraftReplay.of(scenario.users_at(0.0), default_traces(), 16)
    rates = scenario.users_at(0.0).acceptance.position_probs(1)[0]
    assert len(replay.drafts) == len(rates)
    recorded = {d: replay.trace.runs[replay.drafts.index(d)] for d in set(replay.drafts)}
    # a better-accepted scenario device never replays a worse-accepted draft
    order = np.argsort(rates)
    means = [recorded[replay.drafts[i]].mean() for i in order]
    assert means == sorted(means)
    assert all(c.shape[1] == 16 and (c > 0).all() and (c <= 1).all()
               for c in replay.trace.confidence)
    assert (np.diff(replay.curve.probs, axis=0) < 0.5).all() and (replay.curve.probs <= 1).all()


class _Held:
    """A decider holding one set of decisions (caps, shares, thresholds)."""

    def __init__(self, decisions: Decisions) -> None:
        self.decisions = decisions

    def start(self, system, users) -> Decisions:
        return self.decisions

    def after_round(self, now, record) -> None:
        self.records = getattr(self, "records", 0) + 1
        self.last = record

    def on_drift(self, now, users) -> None:
        return None


def test_replayed_drafts_stop_where_their_recorded_confidence_falls_below_h():
    scenario = load_scenario(SCENARIOS / "steady-6.toml")
    users = scenario.users_at(0.0)
    replay = DraftReplay.of(users, default_traces(), 16)
    cap, share = np.full(6, 8), np.full(6, 1 / 6)
    results = {}
    for h in (0.0, 0.5):
        decider = _Held(Decisions(cap, share, np.full(6, h)))
        results[h] = SyncSimulation(scenario.system, replay.users_at(scenario.users_at),
                                    decider, (), 0, replay.trace).run(30.0)
        record = decider.last
        for k in range(6):  # what the draft reported: a byte a token, one more if it stopped
            conf = np.frombuffer(record.confidence[k], np.uint8) / 255
            assert len(conf) == record.draft_len[k] + (record.draft_len[k] < 8)
            assert (conf[:record.draft_len[k]] >= h - 1 / 255).all()
    plain, stopped = results[0.0], results[0.5]
    assert (plain.drafted == 8 * plain.rounds).all()  # h = 0: every draft is the cap
    per_round = stopped.drafted / stopped.rounds
    assert (per_round < 6).all() and (per_round > 0.5).all()
    wasted = (stopped.drafted - stopped.accepted).sum() / stopped.rounds
    assert wasted < 0.5 * (plain.drafted - plain.accepted).sum() / plain.rounds


def test_the_confidence_policy_in_the_simulator_keeps_the_heterogeneous_goodput():
    """On real drafts with their confidences the policy plans from the heterogeneous plan
    and moves only where its model says stopping pays: in a shared round that is seldom
    (docs/results.md has the figures), and it must not cost goodput."""
    scenario = load_scenario(SCENARIOS / "steady-6.toml")
    traces = default_traces()
    ours = [simulate_scenario(scenario, "confidence", 60.0, seed=s, traces=traces)
            for s in (0, 1)]
    base = [simulate_scenario(scenario, "heterogeneous", 60.0, seed=s, traces=traces)
            for s in (0, 1)]
    assert ours[0]["replayed_drafts"] == base[0]["replayed_drafts"]
    assert np.mean([r["goodput_tok_s"] for r in ours]) > 0.98 * np.mean(
        [r["goodput_tok_s"] for r in base])
    with pytest.raises(ValueError, match="replay"):
        simulate_scenario(scenario, "confidence", 10.0)


def test_confidence_stopping_live_is_lossless(run_controller, target, default_models, lab_keys):
    """Every device stops below h = 0.5 (a fixed threshold: the test does not depend on
    what the plan would choose); outputs are the target's greedy ones."""
    results = live_pair(run_controller, target, default_models, lab_keys, 40,
                        "Once upon a time, in a village at the edge",
                        control__policy="confidence", control__stop_confidence=0.5,
                        control__resolve_interval_s=0.0)
    assert sum(r["stats"]["stopped_early"] for r in results) > 0
