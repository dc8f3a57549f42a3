"""Simulation runs: a policy on a scenario, scored against the oracle in the same simulator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import numpy as np

from edge_controller.config import CONFIDENCE_POLICY, ControlConfig
from edge_controller.control import POLICIES, Plan, SystemParams, UserParams, solve
from edge_controller.control.bandit import ONLINE_POLICIES
from edge_controller.control.model import PositionAcceptance
from edge_controller.control.scenario import Scenario
from edge_controller.control.serving import DEFAULT_PREDRAFT_LEN, plan_for
from edge_controller.simulator.deciders import Controlled, FixedPlan, Oracle
from edge_controller.simulator.engine import (
    AcceptanceTrace,
    Decider,
    ServingSimulation,
    SimulationResult,
    SyncSimulation,
)
from models.traces import TraceSet

BEST_FIXED = "best-fixed-L"  # fixed-L with the L tuned on the scenario's first phase
SIMULATED_POLICIES = (*POLICIES, *ONLINE_POLICIES, CONFIDENCE_POLICY, BEST_FIXED)
ORACLE_POLICY = "heterogeneous"  # within 0.1% of brute force (docs/benchmarks.md)
MAX_REPORTED_CHANGES = 500
DEFAULT_BATCH_TOKENS = 256  # the controller's server.batch_tokens default
MAX_SECONDS = 86_400.0  # a simulated day: minutes of real time for a handful of devices


def simulate_plan(system: SystemParams, users: UserParams, plan: Plan, seconds: float,
                  seed: int = 0, scheduler: str = "sync",
                  predraft_len: int = DEFAULT_PREDRAFT_LEN,
                  batch_tokens: int = DEFAULT_BATCH_TOKENS) -> SimulationResult:
    """One plan, held for ``seconds`` of steady parameters, under ``scheduler``."""
    return _simulation(system, lambda _: users, FixedPlan(plan), (), seed, scheduler,
                       predraft_len, batch_tokens).run(seconds)


def _simulation(system: SystemParams, users_at: Callable[[float], UserParams],
                decider: Decider, change_times: list[float], seed: int, scheduler: str,
                predraft_len: int, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                trace: AcceptanceTrace | None = None, marks: tuple[float, ...] = ()):
    """The simulation of ``scheduler``'s serving: rounds, or continuous / proactive."""
    if scheduler == "sync":
        return SyncSimulation(system, users_at, decider, change_times, seed, trace, marks)
    return ServingSimulation(system, users_at, decider, change_times, seed, trace,
                             proactive=scheduler == "proactive", predraft_len=predraft_len,
                             batch_tokens=batch_tokens, marks=marks)


@dataclass(frozen=True)
class DraftReplay:
    """Recorded real drafts (models/traces) in place of a scenario's acceptance: each
    device replays the draft model whose acceptance is nearest its own (on the first
    phase; later acceptance drifts are not replayed), round by round in an order of its
    own (the seed's), with the draft's confidences. ``curve`` is the truth the oracle plans with."""

    trace: AcceptanceTrace
    curve: PositionAcceptance
    drafts: tuple[str, ...]  # the draft model each device replays

    @classmethod
    def of(cls, users: UserParams, traces: TraceSet, depth: int, seed: int = 0) -> DraftReplay:
        pool = {}
        for draft in sorted({t.draft for t in traces.traces}):
            recorded = traces.of_draft(draft)
            runs = np.concatenate([t.runs(depth) for t in recorded])
            confidence = np.array([c[:depth] for t in recorded
                                   for c in t.confidences[:len(t.truth) - depth + 1]])
            pool[draft] = (runs, confidence, runs.sum() / np.minimum(runs + 1, depth).sum())
        if not pool:
            raise ValueError("no recorded drafts to replay")
        rates = users.acceptance.position_probs(depth).mean(axis=0)
        names = tuple(min(pool, key=lambda d, r=r: abs(pool[d][2] - r)) for r in rates)
        # each device its own order of the recorded drafts: devices replaying one draft
        # model are independent, and the seed picks the orders
        orders = [np.random.default_rng([seed, k]).permutation(pool[d][0].size)
                  for k, d in enumerate(names)]
        trace = AcceptanceTrace(tuple(pool[d][0][o] for d, o in zip(names, orders, strict=True)),
                                np.full(len(names), depth),
                                tuple(pool[d][1][o] for d, o in zip(names, orders, strict=True)))
        # P(position i accepted | the i before it were): of the runs reaching i, longer
        curve = np.array([[(runs > i).sum() / max((runs >= i).sum(), 1) for runs in trace.runs]
                          for i in range(depth)])
        return cls(trace, PositionAcceptance(curve), names)

    def users_at(self, users_at: Callable[[float], UserParams]) -> Callable[[float], UserParams]:
        return lambda t: replace(users_at(t), acceptance=self.curve)


def best_fixed_len(scenario: Scenario) -> int:
    """The one L for everyone (equal shares, as fixed-L) best on the first phase's truth."""
    return int(solve("equal-best-L", scenario.system, scenario.users_at(0.0)).draft_len[0])


def _decider(scenario: Scenario, policy: str, acceptance: str) -> tuple[Decider, dict]:
    if policy not in SIMULATED_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {list(SIMULATED_POLICIES)}")
    # The first rounds' configured length, within what the scenario allows.
    config = ControlConfig(policy=policy, acceptance=acceptance,
                           draft_len=min(ControlConfig.draft_len, scenario.system.max_draft_len))
    extra: dict[str, Any] = {}
    if policy == BEST_FIXED:
        extra["fixed_draft_len"] = best_fixed_len(scenario)
        config = replace(config, policy="fixed-L", draft_len=extra["fixed_draft_len"])
    elif policy not in (*ONLINE_POLICIES, CONFIDENCE_POLICY):  # fail here, with the
        solve(policy, scenario.system, scenario.users_at(0.0))  # solver's words, if it can't
    return Controlled(config), extra


def _serving_decider(scenario: Scenario, policy: str, scheduler: str,
                     predraft_len: int) -> tuple[Decider, dict]:
    """The policy's plan for continuous or proactive serving, on the first phase's truth."""
    if policy in (*ONLINE_POLICIES, CONFIDENCE_POLICY):
        raise ValueError(f"{policy} plans synchronous rounds: --scheduler sync")
    if policy not in SIMULATED_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {list(SIMULATED_POLICIES)}")
    extra: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if policy == BEST_FIXED:
        extra["fixed_draft_len"] = options["fixed_draft_len"] = best_fixed_len(scenario)
        policy = "fixed-L"
    plan = plan_for(scheduler, policy, scenario.system, scenario.users_at(0.0), predraft_len,
                    **options)
    return FixedPlan(plan), extra


def _run(scenario: Scenario, decider: Decider, seconds: float, seed: int,
         progress: Callable[[float], None] | None, scheduler: str = "sync",
         predraft_len: int = DEFAULT_PREDRAFT_LEN,
         replay: DraftReplay | None = None, marks: tuple[float, ...] = ()) -> SimulationResult:
    users_at = replay.users_at(scenario.users_at) if replay else scenario.users_at
    return _simulation(scenario.system, users_at, decider, scenario.change_times(), seed,
                       scheduler, predraft_len, trace=replay and replay.trace, marks=marks
                       ).run(seconds, progress)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def simulate_scenario(scenario: Scenario, policy: str, seconds: float, seed: int = 0,
                      acceptance: str = "geometric",
                      progress: Callable[[str, float], None] | None = None,
                      scheduler: str = "sync",
                      predraft_len: int = DEFAULT_PREDRAFT_LEN,
                      traces: TraceSet | None = None,
                      warmup_s: float = 0.0) -> dict[str, Any]:
    """Run ``policy`` and the oracle on the scenario for ``seconds`` simulated seconds; the
    report of ``simulate --json``. With ``traces``, devices replay those recorded drafts
    (DraftReplay) instead of drawing acceptance from the scenario's model: what the
    ``confidence`` policy needs. ``warmup_s``: the report also scores the run after it
    (``ratio_after_warmup``), and its phases split there too. Synchronous rounds: the
    policy through the live DraftController, estimating everything. Continuous or
    proactive (``scheduler``): the policy's plan for that serving, solved on the first
    phase's truth and held; the oracle re-solves it at every change. ``progress(run,
    now)``: after every round (or forward) of the run ("policy", "oracle"). Raises
    ValueError on a policy or scenario it cannot run."""
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"simulated seconds must be in (0, {MAX_SECONDS:g}], got {seconds}")
    if not 0 <= warmup_s < seconds:
        raise ValueError(f"the warm-up must be in [0, {seconds:g}) simulated s")
    if policy == CONFIDENCE_POLICY and traces is None:
        raise ValueError("the confidence policy needs drafts' confidences: replay recorded "
                         "drafts (--replay-drafts)")
    replay = traces and DraftReplay.of(scenario.users_at(0.0), traces,
                                       scenario.system.max_draft_len, seed)
    if scheduler == "sync":
        decider, extra = _decider(scenario, policy, acceptance)
    else:
        decider, extra = _serving_decider(scenario, policy, scheduler, predraft_len)
    if replay:
        extra["replayed_drafts"] = dict(zip(scenario.users.names, replay.drafts, strict=True))
    marks = (warmup_s,) if warmup_s > 0 else ()
    ours = _run(scenario, decider, seconds, seed,
                progress and (lambda now: progress("policy", now)), scheduler, predraft_len,
                replay, marks)
    oracle = _run(scenario, Oracle(ORACLE_POLICY, scheduler, predraft_len), seconds, seed,
                  progress and (lambda now: progress("oracle", now)), scheduler, predraft_len,
                  replay, marks)
    names = scenario.users.names
    bounds = [0.0, *sorted({t for t in (*scenario.change_times(), *marks) if t < seconds}),
              seconds]
    after = [i for i, start in enumerate(bounds[:-1]) if start >= warmup_s]
    phases = []
    for i, (start, end) in enumerate(pairwise(bounds)):
        got = float(ours.phase_tokens[i].sum() / (end - start))
        best = float(oracle.phase_tokens[i].sum() / (end - start))
        phases.append({"start_s": start, "end_s": end, "goodput_tok_s": got,
                       "oracle_goodput_tok_s": best, "ratio_to_oracle": _ratio(got, best)})
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_len = ours.drafted / max(ours.rounds, 1)
        acceptance_rate = np.where(ours.drafted > 0, ours.accepted / ours.drafted, np.nan)
    return {
        "scenario": scenario.name,
        "policy": policy,
        "scheduler": scheduler,
        **extra,
        "acceptance": acceptance,
        "seconds": seconds,
        "seed": seed,
        "goodput_tok_s": ours.goodput_tok_s,
        "oracle_goodput_tok_s": oracle.goodput_tok_s,
        "ratio_to_oracle": _ratio(ours.goodput_tok_s, oracle.goodput_tok_s),
        "warmup_s": warmup_s,
        "ratio_after_warmup": _ratio(float(ours.phase_tokens[after].sum()),
                                     float(oracle.phase_tokens[after].sum())),
        "rounds": ours.rounds,
        "oracle_rounds": oracle.rounds,
        "draft_tokens": float(ours.drafted.sum()),
        "wasted_draft_tokens": float((ours.drafted - ours.accepted).sum()),
        "tokens_per_round": float(ours.tokens.sum() / max(ours.rounds, 1)),
        "verifier_busy": ours.busy_s / seconds,
        "users": [
            {"name": name, "goodput_tok_s": float(ours.user_goodput_tok_s[i]),
             "oracle_goodput_tok_s": float(oracle.user_goodput_tok_s[i]),
             "mean_draft_len": float(mean_len[i]),
             "accepted_per_draft": None if np.isnan(acceptance_rate[i])
             else float(acceptance_rate[i])}
            for i, name in enumerate(names)
        ],
        "phases": phases,
        "draft_len_changes": [
            {"t": t, "draft_len": dict(zip(names, map(int, lengths), strict=True))}
            for t, lengths in ours.draft_len_changes[:MAX_REPORTED_CHANGES]
        ],
    }
