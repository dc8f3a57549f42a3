"""Simulation runs: a policy on a scenario, scored against the oracle in the same simulator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from itertools import pairwise
from typing import Any

import numpy as np

from edge_controller.config import ControlConfig
from edge_controller.control import POLICIES, Plan, SystemParams, UserParams, solve
from edge_controller.control.bandit import ONLINE_POLICIES
from edge_controller.control.scenario import Scenario
from edge_controller.simulator.deciders import Controlled, FixedPlan, Oracle
from edge_controller.simulator.engine import Decider, SimulationResult, SyncSimulation

BEST_FIXED = "best-fixed-L"  # fixed-L with the L tuned on the scenario's first phase
SIMULATED_POLICIES = (*POLICIES, *ONLINE_POLICIES, BEST_FIXED)
ORACLE_POLICY = "heterogeneous"  # within 0.1% of brute force (docs/benchmarks.md)
MAX_REPORTED_CHANGES = 500
MAX_SECONDS = 86_400.0  # a simulated day: minutes of real time for a handful of devices


def simulate_plan(system: SystemParams, users: UserParams, plan: Plan, seconds: float,
                  seed: int = 0) -> SimulationResult:
    """One plan, held for ``seconds`` of steady parameters."""
    return SyncSimulation(system, lambda _: users, FixedPlan(plan), seed=seed).run(seconds)


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
    elif policy not in ONLINE_POLICIES:  # fail here, with the solver's words, on what it
        solve(policy, scenario.system, scenario.users_at(0.0))  # cannot solve at all
    return Controlled(config), extra


def _run(scenario: Scenario, decider: Decider, seconds: float, seed: int,
         progress: Callable[[float], None] | None) -> SimulationResult:
    return SyncSimulation(scenario.system, scenario.users_at, decider,
                          scenario.change_times(), seed).run(seconds, progress)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def simulate_scenario(scenario: Scenario, policy: str, seconds: float, seed: int = 0,
                      acceptance: str = "geometric",
                      progress: Callable[[str, float], None] | None = None) -> dict[str, Any]:
    """Run ``policy`` (through the live DraftController, estimating everything) and the
    oracle on the scenario for ``seconds`` simulated seconds; the report of ``simulate
    --json``. ``progress(run, now)``: after every round of the run ("policy", "oracle").
    Raises ValueError on a policy or scenario it cannot run."""
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"simulated seconds must be in (0, {MAX_SECONDS:g}], got {seconds}")
    decider, extra = _decider(scenario, policy, acceptance)
    ours = _run(scenario, decider, seconds, seed,
                progress and (lambda now: progress("policy", now)))
    oracle = _run(scenario, Oracle(ORACLE_POLICY), seconds, seed,
                  progress and (lambda now: progress("oracle", now)))
    names = scenario.users.names
    bounds = [0.0, *[t for t in scenario.change_times() if t < seconds], seconds]
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
        **extra,
        "acceptance": acceptance,
        "seconds": seconds,
        "seed": seed,
        "goodput_tok_s": ours.goodput_tok_s,
        "oracle_goodput_tok_s": oracle.goodput_tok_s,
        "ratio_to_oracle": _ratio(ours.goodput_tok_s, oracle.goodput_tok_s),
        "rounds": ours.rounds,
        "oracle_rounds": oracle.rounds,
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
