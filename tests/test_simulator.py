"""The discrete-event simulator: it agrees with the analytic model, replays traces, follows
drift, and `edge-controller simulate` reports against the oracle."""

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from edge_controller.cli import main
from edge_controller.config import ControlConfig
from edge_controller.control import SystemParams, UserParams, VerifyTime, solve
from edge_controller.control.scenario import ScenarioError, load_scenario, parse_scenario
from edge_controller.simulator import (
    SIMULATED_POLICIES,
    AcceptanceTrace,
    Controlled,
    FixedPlan,
    Oracle,
    SyncSimulation,
    simulate_plan,
    simulate_scenario,
)
from edge_controller.simulator.runs import best_fixed_len

SCENARIOS = Path(__file__).resolve().parents[1] / "configs" / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.toml"))
STEADY = [p for p in SHIPPED if not load_scenario(p).drift]


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
    from edge_controller.cli.simulate import BEST_FIXED, ONLINE_POLICY_NAMES
    from edge_controller.config import CONFIDENCE_POLICY
    from edge_controller.control.bandit import ONLINE_POLICIES

    assert ONLINE_POLICY_NAMES == ONLINE_POLICIES
    assert set(POLICY_NAMES) | set(ONLINE_POLICIES) | {BEST_FIXED, CONFIDENCE_POLICY} == set(
        SIMULATED_POLICIES)


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


def heavy_headed() -> dict:
    """steady-6 with per-position truths: the first draft often fails, later ones rarely."""
    data = tomllib.loads((SCENARIOS / "steady-6.toml").read_text())
    for user in data["users"]:
        user["acceptance"] = [0.5] + [min(0.97, user["acceptance"] + 0.1)] * 15
    return data


def test_a_held_plan_on_curve_truths_simulates_to_its_analytic_goodput():
    scenario = parse_scenario(heavy_headed())
    plan = solve("heterogeneous", scenario.system, scenario.users)
    result = simulate_plan(scenario.system, scenario.users, plan, 4000 * plan.round_time_s, 4)
    assert result.goodput_tok_s == pytest.approx(plan.goodput_tok_s, rel=0.02)


def test_the_simulated_controller_measures_what_is_true():
    """What the live DraftController estimates in the simulator from what it observes:
    delay and drafting speed exactly, the acceptance curve's shape, the T_v law."""
    scenario = parse_scenario(heavy_headed())
    decider = Controlled(ControlConfig(policy="heterogeneous", acceptance="curve"))
    SyncSimulation(scenario.system, scenario.users_at, decider, seed=5).run(120.0)
    truth = scenario.users
    snapshot = decider.controller.snapshot()
    for i, name in enumerate(truth.names):
        est = snapshot[name]
        assert est["delay_s"] == pytest.approx(truth.delay_s[i], rel=1e-6)
        assert est["draft_s_per_token"] == pytest.approx(truth.draft_s_per_token[i], rel=1e-6)
        assert est["bits_per_token"] == pytest.approx(scenario.system.bits_per_token, rel=0.05)
        if decider.controller.decisions[name].draft_len >= 2:  # positions 1, 2 were tried
            assert est["acceptance_curve"][0] == pytest.approx(0.5, abs=0.15)
            assert est["acceptance_curve"][1] > est["acceptance_curve"][0] + 0.15
    base_s, per_token_s = decider.controller.verify_time.coefficients()
    assert base_s == pytest.approx(scenario.system.verify_time.base_s, rel=1e-3)
    assert per_token_s == pytest.approx(scenario.system.verify_time.per_token_s, rel=1e-3)


def test_new_plans_reach_the_rounds_a_round_late_as_in_the_field():
    """A plan made after round r's verification travels with round r+1's verdicts: the
    device drafts by it from round r+2 (controller.py answers before it re-solves)."""
    scenario = load_scenario(SCENARIOS / "steady-6.toml")
    decider = Controlled(ControlConfig(policy="heterogeneous", resolve_interval_s=0.0))
    made = []  # (verification time of round r, the plan made after it or None)
    original = decider.after_round

    def spy(now, record):
        in_force = original(now, record)
        made.append((now, decider._sent))
        return in_force

    decider.after_round = spy
    result = SyncSimulation(scenario.system, scenario.users_at, decider).run(3.0)
    r = next(i for i, (_, sent) in enumerate(made) if sent is not None)
    changed_at, lengths = result.draft_len_changes[1]
    # round r+2 begins when round r+1's verdicts are out
    assert changed_at == made[r + 1][0] > made[r][0]
    np.testing.assert_array_equal(lengths, made[r][1].draft_len)


@pytest.mark.parametrize("policy", ["homogeneous", "heterogeneous", "threshold"])
def test_a_worse_link_moves_the_controllers_plan_as_the_model_says(policy):
    """The simulator's counterpart of tests/test_live_control.py's live check (run there
    for heterogeneous): one link gets 290 ms worse; the controller's delay estimate
    follows, and its plan ends where the policy puts the new truth."""
    data = tomllib.loads((SCENARIOS / "steady-6.toml").read_text())
    data["drift"] = [{"at_s": 20.0, "user": "phone-code", "delay_s": 0.315}]
    scenario = parse_scenario(data)
    decider = Controlled(ControlConfig(policy=policy))
    result = SyncSimulation(scenario.system, scenario.users_at, decider,
                            scenario.change_times(), seed=6).run(60.0)
    phone = scenario.users.names.index("phone-code")
    assert decider.controller.snapshot()["phone-code"]["delay_s"] == pytest.approx(0.315, rel=0.01)
    before = [lengths for t, lengths in result.draft_len_changes if t < 20][-1]
    after = result.draft_len_changes[-1][1]
    truth = solve(policy, scenario.system, scenario.users_at(60)).draft_len
    assert not np.array_equal(before, after)
    assert abs(int(after[phone]) - int(truth[phone])) <= 1  # estimates are estimates
    assert np.abs(after - truth).sum() <= scenario.users.num_users
