"""The threshold policy: the stopping rule is the single-device optimum, its critical
delays are where the optimal length steps up, and the multi-device plan is feasible."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_controller.control import SystemParams, UserParams, VerifyTime, solve
from edge_controller.control.model import PositionAcceptance
from edge_controller.control.scenario import random_problem
from edge_controller.control.solvers import critical_delays, stopping_costs, stopping_lengths

VERIFY = VerifyTime(0.025, 0.0004)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16),
    st.floats(0.001, 1.0),
    st.floats(0.0005, 0.1),
)
def test_stopping_rule_is_the_argmax_of_the_rate(curve, fixed_s, per_token_s):
    """For any curve (E concave), the first L where one more draft stops paying maximises
    E(L) / (C + c L): checked against enumeration."""
    acceptance = PositionAcceptance(np.array(curve)[:, None])
    lengths = np.arange(17)[:, None]
    tokens = acceptance.expected_tokens(lengths)
    round_s = fixed_s + per_token_s * lengths
    chosen = stopping_lengths(tokens, np.zeros(1), round_s)[0]
    rate = tokens[:, 0] / round_s[:, 0]
    assert rate[chosen] == pytest.approx(rate.max(), rel=1e-12)


def one_device(delay_s: float, rate: float = 0.8) -> tuple[SystemParams, UserParams]:
    system = SystemParams(10e6, 264, VERIFY, 800, 16)
    return system, UserParams([0.02], [rate], [3.0], [delay_s])


@pytest.mark.parametrize("rate", [0.5, 0.8, 0.95])
def test_critical_delays_are_where_the_plan_steps_up(rate):
    system, users = one_device(0.0, rate)
    tokens = users.acceptance.expected_tokens(np.arange(17)[:, None])
    fixed, per_token = stopping_costs(system, users, np.zeros(1, int), np.ones(1))
    delays = critical_delays(tokens, np.zeros(1), fixed, per_token, users.delay_s)[:, 0]
    assert np.all(np.diff(delays) > 0)  # each step needs more delay than the last
    for length, d in enumerate(delays[:8]):
        if d <= 0:
            continue  # this step pays even with no delay at all
        below = solve("threshold", *one_device(d * 0.999, rate)).draft_len[0]
        above = solve("threshold", *one_device(d * 1.001, rate)).draft_len[0]
        assert below <= length < above


def test_speculation_starts_at_the_first_critical_delay_and_grows_logarithmically():
    """A slow drafter with low acceptance: below d_0 drafting does not pay (L = 0), between
    d_0 and d_1 one token is optimal; far out L grows ~ log(d) / log(1/a)."""
    def length_at(delay_s: float) -> int:
        return solve("threshold", SystemParams(10e6, 264, VERIFY, 0, 16),
                     UserParams([0.05], [0.6], [3.0], [delay_s])).draft_len[0]

    system, users = SystemParams(10e6, 264, VERIFY, 0, 16), UserParams([0.05], [0.6], [3.0])
    tokens = users.acceptance.expected_tokens(np.arange(17)[:, None])
    fixed, per_token = stopping_costs(system, users, np.zeros(1, int), np.ones(1))
    d0, d1 = critical_delays(tokens, np.zeros(1), fixed, per_token, users.delay_s)[:2, 0]
    assert 0 < d0 < d1
    assert length_at(d0 / 2) == 0 and length_at((d0 + d1) / 2) == 1
    lengths = [length_at(d) for d in (1.0, 10.0, 100.0)]
    # a decade of delay buys about log(10) / log(1 / 0.6) = 4.5 more tokens
    assert all(3 <= step <= 6 for step in np.diff(lengths))


def test_threshold_is_close_to_the_joint_optimum_on_realistic_systems():
    """A best response, not the joint optimum: never above brute force, and on random
    systems of DESIGN.md's ranges most of heterogeneous's goodput."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        system = SystemParams(5e6, 264, VERIFY, 800, 6)
        users = UserParams(rng.uniform(0.01, 0.08, 3), rng.uniform(0.4, 0.95, 3),
                           rng.uniform(0.5, 7, 3), rng.uniform(0.005, 0.2, 3))
        plan = solve("threshold", system, users)
        assert plan.goodput_tok_s <= solve("brute-force", system, users).goodput_tok_s * (1 + 1e-9)
    ratios = []
    for seed in range(20):
        system, users = random_problem(6, seed, bits_per_token=264,
                                       verify_per_token_s=0.0002)
        ratios.append(solve("threshold", system, users).goodput_tok_s
                      / solve("heterogeneous", system, users).goodput_tok_s)
    assert min(ratios) > 0.6 and np.mean(ratios) > 0.85


def test_threshold_lengthens_drafts_of_the_device_whose_delay_grows():
    system = SystemParams(5e6, 264, VERIFY, 800, 16)
    near = solve("threshold", system, UserParams([0.02] * 3, [0.8] * 3, [3.0] * 3, [0.01] * 3))
    far = solve("threshold", system,
                UserParams([0.02] * 3, [0.8] * 3, [3.0] * 3, [0.01, 0.01, 0.2]))
    assert far.draft_len[2] > near.draft_len[2]
