"""The Monte Carlo simulator agrees with the analytic model and replays traces."""

from pathlib import Path

import numpy as np
import pytest

from edge_controller.control import SystemParams, UserParams, VerifyTime, solve
from edge_controller.control.scenario import load_scenario
from edge_controller.control.simulator import AcceptanceTrace, simulate

SCENARIOS = Path(__file__).resolve().parents[1] / "configs" / "scenarios"


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("policy", ["heterogeneous", "homogeneous", "fixed-L"])
def test_simulation_agrees_with_analytic_goodput(path, policy):
    scenario = load_scenario(path)
    plan = solve(policy, scenario.system, scenario.users)
    result = simulate(scenario.system, scenario.users, plan, rounds=6000, seed=1)
    assert result.goodput_tok_s == pytest.approx(plan.goodput_tok_s, rel=0.02)


def test_simulated_tokens_follow_the_acceptance_rate():
    """Long drafts, two rates: the per-device token count matches E[N(L)] within noise."""
    system = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 0, 16)
    users = UserParams([0.01, 0.01], [0.5, 0.9], [3.0, 3.0])
    plan = solve("fixed-L", system, users, fixed_draft_len=8)
    rounds = 20000
    result = simulate(system, users, plan, rounds=rounds, seed=3)
    expected = users.acceptance.expected_tokens(plan.draft_len)
    np.testing.assert_allclose(result.tokens / rounds, expected, rtol=0.02)
    assert result.tokens[1] > result.tokens[0]


def test_seeded_runs_reproduce_and_differ_across_seeds():
    scenario = load_scenario(SCENARIOS / "small-heterogeneous.toml")
    plan = solve("fixed-L", scenario.system, scenario.users)
    a, b, c = (simulate(scenario.system, scenario.users, plan, 500, seed=s) for s in (7, 7, 8))
    assert a.goodput_tok_s == b.goodput_tok_s
    assert a.goodput_tok_s != c.goodput_tok_s


def test_replay_of_indicator_trace_is_exact():
    """Per-position indicators: accepted = leading ones, truncated at the planned length."""
    system = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 0, 4)
    users = UserParams([0.01, 0.02], [0.5, 0.5], [3.0, 3.0])
    indicators = [
        np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]]),  # runs 2, 0, 4
        np.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]),  # runs 1, 3, 0
    ]
    trace = AcceptanceTrace.from_indicators(indicators)
    plan = solve("fixed-L", system, users, fixed_draft_len=3)
    result = simulate(system, users, plan, rounds=3, trace=trace)
    # min(run, 3) + 1 per round
    np.testing.assert_array_equal(result.tokens, [3 + 1 + 4, 2 + 4 + 1])
    assert result.goodput_tok_s == pytest.approx(result.tokens.sum() / result.elapsed_s)


def test_replay_of_accepted_counts_and_its_limit():
    system = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 0, 8)
    users = UserParams([0.01], [0.5], [3.0])
    trace = AcceptanceTrace.from_accepted_counts([np.array([4, 0, 2])], draft_len=[4])
    plan = solve("fixed-L", system, users, fixed_draft_len=2)
    result = simulate(system, users, plan, rounds=6, trace=trace)
    np.testing.assert_array_equal(result.tokens, [2 * (3 + 1 + 3)])
    too_long = solve("fixed-L", system, users, fixed_draft_len=6)
    with pytest.raises(ValueError, match="cannot replay"):
        simulate(system, users, too_long, rounds=6, trace=trace)
