"""Solvers against exact references, the papers' findings, and the ordering of policies."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

from edge_controller.control import POLICIES, SystemParams, UserParams, VerifyTime, solve
from edge_controller.control.model import PositionAcceptance, evaluate, finish_time_s
from edge_controller.control.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "configs" / "scenarios"
BITS = [0, 17, 264, 786432]  # free, greedy ids, sparse top-8, full distribution


@st.composite
def instances(draw, max_users: int = 3):
    """Random systems over (and a little beyond) the realistic ranges of DESIGN.md."""
    k = draw(st.integers(1, max_users))

    def per_user(lo: float, hi: float) -> list[float]:
        return draw(st.lists(st.floats(lo, hi), min_size=k, max_size=k))

    system = SystemParams(
        bandwidth_hz=draw(st.floats(5e6, 40e6)),
        bits_per_token=draw(st.sampled_from(BITS)),
        overhead_bits=draw(st.sampled_from([0.0, 800.0])),
        max_draft_len=draw(st.integers(0, 10)),
        verify_time=VerifyTime(draw(st.floats(0.001, 0.05)), draw(st.floats(0.0, 0.002))),
    )
    users = UserParams(
        per_user(0.0, 0.08), per_user(0.0, 1.0), per_user(0.5, 7.0), per_user(0, 0.05)
    )
    return system, users


def common_length_optimum(system: SystemParams, users: UserParams) -> float:
    """Reference for homogeneous: for each common L, the min-max finish time by brentq."""
    best = 0.0
    for length in range(system.max_draft_len + 1):
        draft_len = np.full(users.num_users, length)
        c = draft_len * users.draft_s_per_token + users.delay_s
        w = (system.overhead_bits + length * system.bits_per_token) / (
            system.bandwidth_hz * users.spectral_efficiency
        )
        tau = c.max()
        if np.any(w > 0):
            sends = w > 0

            def excess(x, c=c[sends], w=w[sends]):
                return np.sum(w / (x - c)) - 1.0

            lo = np.max(c[sends]) * (1 + 1e-15) + 1e-300
            tau = max(
                tau,
                brentq(
                    excess,
                    lo + np.min(w[sends]) * 1e-12,
                    lo + w.sum() + 1.0,
                    xtol=1e-15,
                    rtol=1e-14,
                ),
            )
        tokens = users.acceptance.expected_tokens(draft_len).sum()
        best = max(best, tokens / (tau + system.verify_time(draft_len)))
    return best


@settings(max_examples=300, derandomize=True, deadline=None)
@given(instances())
def test_solvers_match_exact_references_on_small_instances(instance):
    system, users = instance
    exact = solve("brute-force", system, users).goodput_tok_s
    homogeneous = solve("homogeneous", system, users).goodput_tok_s
    heterogeneous = solve("heterogeneous", system, users).goodput_tok_s
    assert homogeneous == pytest.approx(common_length_optimum(system, users), rel=1e-3)
    assert exact * (1 - 0.005) <= heterogeneous <= exact * (1 + 1e-9)
    assert homogeneous <= heterogeneous * (1 + 1e-9)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(instances(max_users=4))
def test_heterogeneous_within_half_a_percent_of_brute_force_at_four_devices(instance):
    system, users = instance
    if users.num_users < 4:
        return
    exact = solve("brute-force", system, users).goodput_tok_s
    assert exact * (1 - 0.005) <= solve("heterogeneous", system, users).goodput_tok_s


@settings(max_examples=60, derandomize=True, deadline=None)
@given(instances(max_users=12))
def test_every_plan_is_feasible_and_scored_by_the_model(instance):
    system, users = instance
    for name in POLICIES:
        if name == "brute-force":
            continue
        plan = solve(name, system, users)
        assert plan.draft_len.shape == (users.num_users,)
        assert np.all((plan.draft_len >= 0) & (plan.draft_len <= system.max_draft_len))
        assert np.all(plan.bandwidth_share >= 0)
        assert plan.bandwidth_share.sum() <= 1 + 1e-9
        rescored = evaluate(name, system, users, plan.draft_len, plan.bandwidth_share)
        assert plan.goodput_tok_s == pytest.approx(rescored.goodput_tok_s, rel=1e-9)
        assert plan.user_goodput_tok_s.sum() == pytest.approx(plan.goodput_tok_s)


@settings(max_examples=150, derandomize=True, deadline=None)
@given(instances(max_users=8))
def test_ordering_heterogeneous_homogeneous_agnostic(instance):
    system, users = instance
    goodput = {
        name: solve(name, system, users).goodput_tok_s for name in POLICIES if name != "brute-force"
    }
    tol = 1 + 1e-9
    assert goodput["heterogeneous"] * tol >= goodput["homogeneous"]
    for baseline in ("agnostic", "equal-best-L", "fixed-L"):
        assert goodput["homogeneous"] * tol >= goodput[baseline]  # same L choices, better shares
    assert goodput["equal-best-L"] * tol >= goodput["agnostic"]


def test_homogeneous_compensates_the_weaker_device():
    """Equal drafts, equal acceptance: the slower drafter and the worse link get more band."""
    system = SystemParams(5e6, 264, VerifyTime(0.025, 0.0004), 800, 8)
    slow_draft = UserParams([0.01, 0.02], [0.8, 0.8], [1.0, 1.0], 0.01)
    weak_link = UserParams([0.015, 0.015], [0.8, 0.8], [1.0, 0.5], 0.01)
    for users in (slow_draft, weak_link):
        plan = solve("homogeneous", system, users)
        assert plan.draft_len[0] == plan.draft_len[1] > 0
        assert plan.bandwidth_share[1] > plan.bandwidth_share[0]
        f = finish_time_s(system, users, plan.draft_len, plan.bandwidth_share)
        assert f[0] == pytest.approx(f[1], rel=1e-9)  # finish times equalised


@settings(max_examples=80, derandomize=True, deadline=None)
@given(instances(max_users=3), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_heterogeneous_rewards_acceptance(instance, low, high):
    """Between devices equal in compute and link, higher acceptance: L and share no smaller."""
    system, users = instance
    low, high = sorted((low, high))
    twins = UserParams(
        np.r_[users.draft_s_per_token[0], users.draft_s_per_token],
        np.r_[high, low, users.acceptance.rate[1:]],
        np.r_[users.spectral_efficiency[0], users.spectral_efficiency],
        np.r_[users.delay_s[0], users.delay_s],
    )
    plan = solve("heterogeneous", system, twins)
    assert plan.draft_len[0] >= plan.draft_len[1]
    assert plan.bandwidth_share[0] >= plan.bandwidth_share[1] * (1 - 1e-9)


def test_findings_are_strict_on_the_small_example():
    scenario = load_scenario(SCENARIOS / "small-heterogeneous.toml")
    system, users = scenario.system, scenario.users
    code, translate, phone = 0, 1, 2
    het = solve("heterogeneous", system, users)
    assert het.draft_len[code] > het.draft_len[translate]
    assert het.bandwidth_share[code] > het.bandwidth_share[translate]
    hom = solve("homogeneous", system, users)
    assert hom.bandwidth_share[phone] > hom.bandwidth_share[code]
    assert het.goodput_tok_s > hom.goodput_tok_s


def test_zero_draft_length_is_chosen_when_drafting_does_not_pay():
    """Acceptance 0: every draft is wasted time, so every solver switches drafting off."""
    system = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 800, 8)
    users = UserParams([0.02, 0.04], [0.0, 0.0], [3.0, 2.0], 0.01)
    for name in ("homogeneous", "heterogeneous", "equal-best-L", "per-user-L", "agnostic"):
        assert np.all(solve(name, system, users).draft_len == 0), name


def test_perfect_acceptance_limit():
    """a -> 1: E[N(L)] = L + 1 exactly, and nearby rates agree with the limit."""
    users = UserParams([0.01], [1.0], [3.0])
    lengths = np.arange(6)[:, None]
    np.testing.assert_allclose(users.acceptance.expected_tokens(lengths)[:, 0], lengths[:, 0] + 1)
    near = UserParams([0.01], [1 - 1e-12], [3.0]).acceptance.expected_tokens(lengths)[:, 0]
    np.testing.assert_allclose(near, lengths[:, 0] + 1, rtol=1e-9)


def test_position_curve_matches_geometric_when_flat():
    rates = np.array([0.3, 0.8, 0.95])
    flat = PositionAcceptance(np.tile(rates, (16, 1)))
    geometric = UserParams([0.01] * 3, rates, [3.0] * 3).acceptance
    lengths = np.arange(17)[:, None] * np.ones(3, int)
    np.testing.assert_allclose(flat.expected_tokens(lengths), geometric.expected_tokens(lengths))


def test_heterogeneous_accepts_position_curves():
    """A decaying per-position curve: the solver plans with it and stays feasible."""
    system = SystemParams(20e6, 264, VerifyTime(0.025, 0.0004), 800, 8)
    curve = np.array([[0.95, 0.6], [0.9, 0.5], [0.8, 0.4], [0.6, 0.3]])
    users = UserParams([0.015, 0.015], PositionAcceptance(curve), [3.0, 3.0], 0.01)
    het = solve("heterogeneous", system, users)
    brute = solve("brute-force", system, users)
    assert het.goodput_tok_s == pytest.approx(brute.goodput_tok_s, rel=5e-3)
    assert het.draft_len[0] >= het.draft_len[1]


def test_unknown_policy_and_infeasible_brute_force_raise():
    system = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 0, 16)
    users = UserParams([0.02] * 6, [0.8] * 6, [3.0] * 6)
    with pytest.raises(ValueError, match="unknown policy"):
        solve("best", system, users)
    with pytest.raises(ValueError, match="brute force"):
        solve("brute-force", system, users)
    with pytest.raises(ValueError, match="fixed_draft_len"):
        solve("fixed-L", system, users, fixed_draft_len=17)


@pytest.mark.parametrize("overhead_bits", [1e-12, 1e-9, 1e-8, 1e-6])
def test_uploads_below_float_resolution_never_make_a_plan_nan(overhead_bits):
    """What an attack found: a device that steers its frames so that its fitted overhead
    is rounding noise (w below the float resolution of its compute time) made Newton start
    at zero slack, and every device got a NaN share."""
    from edge_controller.draft_control import problem_from_snapshot

    honest = dict(draft_s_per_token=0.008, acceptance=0.6, spectral_efficiency=3.0,
                  delay_s=0.002, overhead_bits=800, bits_per_token=24)
    for t in (0.001, 3600.0):
        for d in (0.2, 4.5):
            attacker = dict(draft_s_per_token=t, acceptance=0.3, spectral_efficiency=30.0,
                            delay_s=d, overhead_bits=overhead_bits, bits_per_token=0.0)
            problem = problem_from_snapshot({"honest": honest, "attacker": attacker},
                                            (0.06, 0.0026), 10e6)
            for policy in POLICIES:
                plan = solve(policy, *problem)
                assert np.isfinite(plan.bandwidth_share).all(), (policy, t, d)
                assert np.isfinite(plan.goodput_tok_s), (policy, t, d)
