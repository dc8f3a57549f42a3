"""The discrete-event simulator: it agrees with the analytic model, replays traces, follows
drift, and `edge-controller simulate` reports against the oracle."""

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from edge_controller.cli import main
from edge_controller.control import SystemParams, UserParams, VerifyTime, solve
from edge_controller.control.scenario import ScenarioError, load_scenario, parse_scenario
from edge_controller.simulator import (
    SIMULATED_POLICIES,
    AcceptanceTrace,
    FixedPlan,
    Oracle,
    SyncSimulation,
    simulate_plan,
    simulate_scenario,
)
from edge_controller.simulator.runs import best_fixed_len

SCENARIOS = Path(__file__).resolve().parents[1] / "configs" / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.toml"))
STEADY = [p for p in SHIPPED if "drift" not in p.read_text()]


@pytest.mark.parametrize("path", STEADY, ids=lambda p: p.stem)
@pytest.mark.parametrize("policy", ["heterogeneous", "homogeneous", "threshold", "fixed-L"])
def test_a_held_plan_simulates_to_its_analytic_goodput(path, policy):
    scenario = load_scenario(path)
    plan = solve(policy, scenario.system, scenario.users)
    result = simulate_plan(scenario.system, scenario.users, plan, 4000 * plan.round_time_s, 1)
    assert result.rounds == pytest.approx(4000, abs=1)  # every round lasts T exactly
    assert result.goodput_tok_s == pytest.approx(plan.goodput_tok_s, rel=0.02)


def test_simulated_tokens_follow_the_acceptance_rate():
    system = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 0, 16)
    users = UserParams([0.01, 0.01], [0.5, 0.9], [3.0, 3.0])
    plan = solve("fixed-L", system, users, fixed_draft_len=8)
    result = simulate_plan(system, users, plan, 20000 * plan.round_time_s, seed=3)
    expected = users.acceptance.expected_tokens(plan.draft_len)
    np.testing.assert_allclose(result.tokens / result.rounds, expected, rtol=0.02)
    assert result.accepted.sum() / result.drafted.sum() < 0.9  # censored: below the rate


def test_seeded_runs_reproduce_and_differ_across_seeds():
    scenario = load_scenario(SCENARIOS / "small-heterogeneous.toml")
    plan = solve("fixed-L", scenario.system, scenario.users)
    a, b, c = (simulate_plan(scenario.system, scenario.users, plan, 30.0, seed=s).goodput_tok_s
               for s in (7, 7, 8))
    assert a == b != c


def test_replay_of_an_indicator_trace_is_exact():
    system = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 0, 4)
    users = UserParams([0.01, 0.02], [0.5, 0.5], [3.0, 3.0])
    trace = AcceptanceTrace.from_indicators([
        np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]]),  # runs 2, 0, 4
        np.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]),  # runs 1, 3, 0
    ])
    plan = solve("fixed-L", system, users, fixed_draft_len=3)
    sim = SyncSimulation(system, lambda _: users, FixedPlan(plan), trace=trace)
    result = sim.run(3 * plan.round_time_s * (1 + 1e-9))
    np.testing.assert_array_equal(result.tokens, [3 + 1 + 4, 2 + 4 + 1])  # min(run, 3) + 1
    deeper = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 0, 6)
    too_long = solve("fixed-L", deeper, users, fixed_draft_len=6)
    with pytest.raises(ValueError, match="cannot replay"):
        SyncSimulation(deeper, lambda _: users, FixedPlan(too_long), trace=trace).run(1.0)


def drift_scenario() -> dict:
    data = tomllib.loads((SCENARIOS / "steady-6.toml").read_text())
    data["drift"] = [{"at_s": 20.0, "user": "phone-code", "delay_s": 0.2},
                     {"at_s": 40.0, "user": "*", "acceptance": 0.5}]
    return data


def test_drift_changes_the_truth_at_its_time_and_the_oracle_resolves():
    scenario = parse_scenario(drift_scenario())
    assert scenario.change_times() == [20.0, 40.0]
    phone = scenario.users.names.index("phone-code")
    assert scenario.users_at(19.9).delay_s[phone] == pytest.approx(0.025)
    assert scenario.users_at(20.0).delay_s[phone] == pytest.approx(0.2)
    assert np.all(scenario.users_at(45).acceptance.rate == 0.5)
    assert scenario.users_at(45).delay_s[phone] == pytest.approx(0.2)  # drifts accumulate
    result = SyncSimulation(scenario.system, scenario.users_at, Oracle(), scenario.change_times(),
                            seed=2).run(60.0)
    times = [t for t, _ in result.draft_len_changes]
    assert times[0] == 0 and any(20 <= t < 21 for t in times) and any(40 <= t < 41 for t in times)
    # each phase's goodput is its own optimum's
    for start, end in ((0, 20), (20, 40), (40, 60)):
        truth = scenario.users_at(start)
        best = solve("heterogeneous", scenario.system, truth).goodput_tok_s
        got = result.phase_tokens[start // 20].sum() / (end - start)
        assert got == pytest.approx(best, rel=0.06)


@pytest.mark.parametrize("bad, message", [
    ({"at_s": 1.0, "user": "nobody", "delay_s": 0.1}, "not a name"),
    ({"at_s": 1.0, "user": "*"}, "changes nothing"),
    ({"at_s": -1.0, "user": "*", "delay_s": 0.1}, ">= 0"),
    ({"at_s": 1.0, "user": "*", "acceptance": 1.5}, r"\[0, 1\]"),
    ({"at_s": 1.0, "user": "*", "bandwidth_hz": 1.0}, "unknown key"),
    ({"at_s": 1.0, "user": "*", "spectral_efficiency": 0.0}, "no bandwidth share"),
])
def test_bad_drift_entries_are_refused_clearly(bad, message):
    data = drift_scenario()
    data["drift"] = [bad]
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(data)


def test_the_live_controller_gets_near_the_oracle_when_nothing_drifts():
    """heterogeneous, estimating everything from what it observes, within 5% of the oracle
    over 90 s (its first rounds run the configured L = 4 with equal shares)."""
    scenario = load_scenario(SCENARIOS / "steady-6.toml")
    report = simulate_scenario(scenario, "heterogeneous", 90.0, seed=0)
    assert 0.95 <= report["ratio_to_oracle"] <= 1.03
    fixed = simulate_scenario(scenario, "fixed-L", 90.0, seed=0)
    assert fixed["ratio_to_oracle"] < report["ratio_to_oracle"]


def test_the_live_controller_follows_a_delay_drift():
    scenario = load_scenario(SCENARIOS / "drift-6.toml")
    report = simulate_scenario(scenario, "heterogeneous", 90.0, seed=0)
    before = [c for c in report["draft_len_changes"] if c["t"] < 30]
    after = [c for c in report["draft_len_changes"] if 30 < c["t"] < 60]
    assert before and after
    assert sum(after[-1]["draft_len"].values()) > sum(before[-1]["draft_len"].values())
    assert report["phases"][1]["ratio_to_oracle"] > 0.9


def test_best_fixed_length_is_tuned_on_the_first_phase_only():
    scenario = load_scenario(SCENARIOS / "edge-cloud-6.toml")
    first = solve("equal-best-L", scenario.system, scenario.users_at(0)).draft_len[0]
    later = solve("equal-best-L", scenario.system, scenario.users_at(60)).draft_len[0]
    assert best_fixed_len(scenario) == first != later
    report = simulate_scenario(scenario, "best-fixed-L", 60.0)
    assert report["fixed_draft_len"] == first
    assert {c["t"] for c in report["draft_len_changes"]} == {0.0} or all(
        set(c["draft_len"].values()) == {first} for c in report["draft_len_changes"][1:])


def test_simulate_cli_json_has_the_plan_key_names(capsys):
    path = SCENARIOS / "drift-6.toml"
    assert main(["simulate", str(path), "--policy", "threshold", "--seconds", "40",
                 "--seed", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ratio_to_oracle"] == pytest.approx(
        report["goodput_tok_s"] / report["oracle_goodput_tok_s"])
    assert 0.5 < report["ratio_to_oracle"] < 1.1
    assert [u["name"] for u in report["users"]] == list(load_scenario(path).users.names)
    assert sum(u["goodput_tok_s"] for u in report["users"]) == pytest.approx(
        report["goodput_tok_s"])
    assert main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"goodput_tok_s", "users"} <= set(plan) & set(report)
    assert {"name", "goodput_tok_s"} <= set(plan["users"][0]) & set(report["users"][0])


def test_simulate_cli_policies_are_the_simulators(capsys):
    from edge_controller.cli.plan import POLICY_NAMES
    from edge_controller.cli.simulate import BEST_FIXED

    assert set(POLICY_NAMES) | {BEST_FIXED} == set(SIMULATED_POLICIES)


@pytest.mark.parametrize("argv, message", [
    (["--seconds", "0"], "must be in (0, 86400]"),
    (["--seconds", "inf"], "must be in (0, 86400]"),
    (["--seconds", "nan"], "must be in (0, 86400]"),
    (["--policy", "brute-force"], "brute force would enumerate"),
])
def test_simulate_cli_refuses_what_it_cannot_run(capsys, argv, message):
    path = SCENARIOS / "edge-cell-16.toml"
    assert main(["simulate", str(path), *argv]) == 2
    assert message in capsys.readouterr().err
