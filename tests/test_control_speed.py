"""The fast solvers (issue 20) give the results of the solvers before them, and their
shortcuts (bucketed band prices, warm starts, Newton from a guess, reused workspaces) are
each exact where they claim to be."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_controller.config import ControlConfig
from edge_controller.control import UserParams, solve
from edge_controller.control import solvers as S
from edge_controller.control.estimators import AffineFit
from edge_controller.control.model import (
    compute_time_s,
    equalised_finish_time,
    upload_s_full_band,
)
from edge_controller.control.scenario import random_problem
from edge_controller.draft_control import DraftController

REFERENCE = json.loads(
    (Path(__file__).parent / "data" / "solver_reference.json").read_text()
)


@pytest.mark.parametrize(
    "case", REFERENCE["cases"], ids=lambda c: f"K{c['num_users']}-seed{c['seed']}"
)
def test_goodput_within_0_1_percent_of_the_recorded_solvers(case):
    """The fixed random set of scripts/record_solver_reference.py, K = 10 .. 10,000, with
    the goodputs that commit 3a91f04's solvers reached on it."""
    problem = {k: case[k] for k in ("num_users", "seed", "bits_per_token", "curves",
                                    "verify_per_token_s")}
    system, users = random_problem(**problem)
    homogeneous = solve("homogeneous", system, users).goodput_tok_s
    heterogeneous = solve("heterogeneous", system, users).goodput_tok_s
    assert homogeneous == pytest.approx(case["homogeneous"], rel=1e-9)
    assert heterogeneous >= case["heterogeneous"] * (1 - 1e-3)
    assert heterogeneous >= homogeneous * (1 - 1e-12)


def _knapsack_inputs(k: int, seed: int, points: int):
    system, users = random_problem(k, seed, verify_per_token_s=0.04 / k)
    tables = S._Tables(system, users)
    best, taus = S._homogeneous(system, users, tables)
    first, last = S._finish_time_range(system, users, tables, taus, best.goodput_tok_s)
    tau = np.geomspace(first, last, points)
    share = tables.shares(tau).copy()
    with np.errstate(all="ignore"):
        step_share = share[:, 1:] - share[:, :-1]
        ratio = (tables.step_tokens - best.goodput_tok_s * tables.verify_per_token_s) / step_share
    return tables, ratio, step_share, 1.0 - share[:, 0].sum(axis=1)


@pytest.mark.parametrize("k,seed", [(50, 0), (400, 1), (3000, 2)])
def test_bucketed_band_price_is_the_sorted_one(k, seed):
    """The large-K path (histogram of ratio bits, one bucket sorted) finds exactly the
    band price that sorting every step finds."""
    tables, ratio, step_share, capacity = _knapsack_inputs(k, seed, points=8)
    sorted_floor, _ = S._sorted_band_prices(ratio, step_share, capacity)
    for i in np.flatnonzero(capacity >= 0):
        assert S._bucketed_band_price(tables, ratio[i], step_share[i], capacity[i]) == (
            sorted_floor[i]
        )


def test_sorted_band_price_fills_the_band_as_far_as_a_step_allows():
    """At the price found, the steps above it fit the band and adding the cut step would
    not (the LP's cut), in every row."""
    _, ratio, step_share, capacity = _knapsack_inputs(200, 3, points=12)
    floor, ceil = S._sorted_band_prices(ratio, step_share, capacity)
    for i in np.flatnonzero(capacity >= 0):
        taken = ratio[i] > floor[i]
        assert np.nansum(np.where(taken, step_share[i], 0.0)) <= capacity[i] + 1e-12
        if floor[i] > 0:
            with_cut = ratio[i] > ceil[i]
            assert np.nansum(np.where(with_cut, step_share[i], 0.0)) > capacity[i]


@pytest.mark.parametrize("k", [3, 40, 2000])
def test_newton_from_a_guess_finds_the_same_finish_time(k):
    system, users = random_problem(k, 7, bits_per_token=264.0)
    rng = np.random.default_rng(k)
    lengths = rng.integers(0, system.max_draft_len + 1, (20, k))
    c = compute_time_s(system, users, lengths)
    w = upload_s_full_band(system, users, lengths)
    cold = equalised_finish_time(c, w)
    for guess in (cold * 1.5, cold * 1.0001, cold * 0.9, np.full_like(cold, 1e-9)):
        np.testing.assert_allclose(equalised_finish_time(c, w, guess), cold, rtol=1e-12)


def _drifted(users: UserParams, seed: int) -> UserParams:
    rng = np.random.default_rng(seed)

    def move(values):
        return values * rng.uniform(0.9, 1.1, values.shape)

    return UserParams(move(users.draft_s_per_token), np.clip(move(users.acceptance.rate), 0, 1),
                      move(users.spectral_efficiency), move(users.delay_s))


@pytest.mark.parametrize("k", [3, 30, 300, 3000])
def test_warm_start_after_drift_matches_a_cold_solve(k):
    """The live controller's case: estimates moved by up to 10% since the last plan."""
    for seed in range(3):
        system, users = random_problem(k, seed, verify_per_token_s=0.04 / k if seed else 4e-4)
        before = solve("heterogeneous", system, users)
        moved = _drifted(users, seed)
        warm = solve("heterogeneous", system, moved, warm=before)
        cold = solve("heterogeneous", system, moved)
        assert warm.goodput_tok_s >= cold.goodput_tok_s * (1 - 1e-3)
        assert warm.goodput_tok_s >= solve("homogeneous", system, moved).goodput_tok_s


def test_warm_start_falls_back_to_the_full_range_when_the_optimum_moved_away():
    """A previous plan from a very different system (every device 4x slower): its window
    misses the optimum; the solve must still find what a cold one does."""
    system, users = random_problem(60, 4, verify_per_token_s=0.04 / 60)
    slow = UserParams(users.draft_s_per_token * 4, users.acceptance, users.spectral_efficiency,
                      users.delay_s * 4)
    stale = solve("heterogeneous", system, slow)
    warm = solve("heterogeneous", system, users, warm=stale)
    cold = solve("heterogeneous", system, users)
    assert warm.goodput_tok_s == pytest.approx(cold.goodput_tok_s, rel=1e-3)


def test_a_warm_plan_for_other_devices_or_lengths_is_ignored():
    system, users = random_problem(20, 5)
    cold = solve("heterogeneous", system, users)
    other = solve("heterogeneous", *random_problem(21, 5))
    assert solve("heterogeneous", system, users, warm=other).goodput_tok_s == cold.goodput_tok_s
    too_long = type(cold)(cold.policy, cold.draft_len + 40, cold.bandwidth_share,
                          cold.user_goodput_tok_s, cold.goodput_tok_s, cold.round_time_s)
    assert solve("heterogeneous", system, users, warm=too_long).goodput_tok_s == pytest.approx(
        cold.goodput_tok_s, rel=1e-3)
    # Policies without warm starts take the argument and ignore it.
    ignored = solve("homogeneous", system, users, warm=cold)
    np.testing.assert_array_equal(ignored.draft_len, solve("homogeneous", system, users).draft_len)


def test_workspace_reuse_across_sizes_changes_nothing():
    """The sweeps' scratch arrays outlive a solve; a big solve, then a small one, then the
    big one again give what fresh solves give."""
    big, small = random_problem(3000, 1, verify_per_token_s=1e-5), random_problem(17, 2)
    first_big = solve("heterogeneous", *big)
    first_small = solve("heterogeneous", *small)
    again_big = solve("heterogeneous", *big)
    np.testing.assert_array_equal(first_big.draft_len, again_big.draft_len)
    S._WORKSPACE.arrays.clear()
    np.testing.assert_array_equal(solve("heterogeneous", *small).draft_len, first_small.draft_len)


def test_the_live_controller_re_solves_warm(caplog):
    """Second and later solves for the same devices start from the last plan."""
    control = DraftController(ControlConfig(policy="heterogeneous", resolve_interval_s=0.0),
                              AffineFit())
    control.verify_time.update(1, 0.03)
    control.verify_time.update(9, 0.034)
    for i, (draft_s, rate) in enumerate([(0.02, 0.8), (0.05, 0.5)]):
        device = f"dev{i}"
        control.join(device)
        control.on_request_start(device)
        est = control.devices[device]
        est.upload_bits.update(1, 900)
        est.upload_bits.update(5, 1000)
        for _ in range(3):
            est.draft_s_per_token.update(draft_s)
            est.delay_s.update(0.01)
            est.acceptance.update(int(4 * rate), 4)
    with caplog.at_level(logging.INFO, logger="edge_controller.draft_control"):
        assert control.maybe_resolve(now=1.0)
        control.devices["dev0"].draft_s_per_token.update(0.2)  # estimates move: re-solve
        control.devices["dev0"].draft_s_per_token.update(0.2)
        control.maybe_resolve(now=2.0)
    solves = [r.getMessage() for r in caplog.records if "solve" in r.getMessage()]
    assert len(solves) == 2, solves
    assert "cold solve" in solves[0] and "warm solve" in solves[1]


def test_bench_control_json_has_every_policy_and_size():
    """scripts/bench_control.py --json: {"POLICY": {"K": median_ms}}, brute force only at
    K = 3, and a baseline revision's solvers timed on the same instances."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "scripts/bench_control.py", "--json", "--repeat", "1",
         "--baseline", "HEAD"],
        cwd=root, capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    table = json.loads(out)
    sizes = ["3", "10", "100", "1000", "10000"]
    for policy in ("homogeneous", "heterogeneous", "agnostic", "equal-best-L", "per-user-L",
                   "fixed-L", "heterogeneous-warm"):
        assert sorted(table[policy], key=int) == sizes, policy
        assert all(ms > 0 for ms in table[policy].values()), policy
        if policy != "heterogeneous-warm":  # the baseline has no warm starts
            assert sorted(table[f"{policy}@HEAD"], key=int) == sizes, policy
    assert list(table["brute-force"]) == ["3"] and list(table["brute-force@HEAD"]) == ["3"]
