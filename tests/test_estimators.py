"""Online estimators: they converge to the truth and follow a change."""

import numpy as np
import pytest

from edge_controller.control.estimators import AcceptanceEstimate, AffineFit, RunningMean


def simulate_rounds(rng, a: float, draft_len: int, rounds: int):
    """Accepted counts of geometric-acceptance rounds (each token accepted w.p. a)."""
    for _ in range(rounds):
        accepted = 0
        while accepted < draft_len and rng.random() < a:
            accepted += 1
        yield accepted


@pytest.mark.parametrize("draft_len", [1, 3, 8])
def test_censored_acceptance_is_unbiased_where_accepted_over_drafted_is_not(draft_len):
    rng = np.random.default_rng(0)
    est = AcceptanceEstimate(forget=1.0)
    accepted_total = 0
    for n in simulate_rounds(rng, 0.8, draft_len, 4000):
        est.update(n, draft_len)
        accepted_total += n
    assert est.mean == pytest.approx(0.8, abs=0.02)
    naive = accepted_total / (4000 * draft_len)
    if draft_len > 1:
        assert naive < 0.75  # why the censored estimate exists


def test_acceptance_follows_a_task_change():
    rng = np.random.default_rng(1)
    est = AcceptanceEstimate(forget=0.97)
    for n in simulate_rounds(rng, 0.9, 4, 300):
        est.update(n, 4)
    high = est.mean
    for n in simulate_rounds(rng, 0.4, 4, 300):
        est.update(n, 4)
    assert high > 0.8 and est.mean < 0.55


def test_running_mean_starts_at_first_value_and_tracks():
    m = RunningMean(forget=0.5)
    assert m.value is None
    assert m.update(10.0) == 10.0
    for _ in range(20):
        m.update(2.0)
    assert m.value == pytest.approx(2.0, abs=1e-4)


def test_verify_time_fit_recovers_an_affine_law():
    rng = np.random.default_rng(2)
    fit = AffineFit(forget=1.0)
    assert not fit.ready
    with pytest.raises(ValueError, match="two distinct x"):
        fit.coefficients()
    for _ in range(200):
        n = int(rng.integers(1, 60))
        fit.update(n, 0.03 + 0.002 * n + rng.normal(0, 1e-3))
    base, per_token = fit.coefficients()
    assert base == pytest.approx(0.03, abs=2e-3)
    assert per_token == pytest.approx(0.002, rel=0.05)


def test_verify_time_fit_never_goes_negative():
    fit = AffineFit(forget=1.0)
    fit.update(1, 0.5)
    fit.update(50, 0.1)  # noise can make time fall with size; the law must not
    base, per_token = fit.coefficients()
    assert per_token == 0.0 and base > 0


def test_verify_time_seeded_from_a_bench_file(tmp_path):
    import json

    from edge_controller.draft_control import seed_verify_time

    path = tmp_path / "verify_cost.json"
    path.write_text(json.dumps({
        "format": "multispin-verify-cost/1", "form": "packed",
        "coef": {"base_s": 0.1, "per_token_s": 0.006, "per_token_ctx_s": 1e-6},
    }))
    fit = AffineFit()
    seed_verify_time(fit, str(path), context=500)
    base, per_token = fit.coefficients()
    # packed form at context 500: 0.1 + (0.006 + 500e-6) * n
    assert base == pytest.approx(0.1, rel=1e-6)
    assert per_token == pytest.approx(0.0065, rel=1e-6)


def test_an_intercept_at_rounding_noise_is_zero():
    fit = AffineFit()
    for x in (1, 2, 3, 5, 8):
        fit.update(x, 8 * 137 * x + 1e-9)  # frames whose size is all slope
    base, slope = fit.coefficients()
    assert base == 0.0 and slope == pytest.approx(8 * 137)


def rounds_of_curve(rng, curve, draft_len: int, rounds: int):
    """Accepted counts of rounds whose position i is accepted w.p. curve[i] given i-1 were."""
    for _ in range(rounds):
        accepted = 0
        while accepted < draft_len and rng.random() < curve[accepted]:
            accepted += 1
        yield accepted


def test_acceptance_curve_recovers_a_heavy_headed_curve_under_censoring():
    """Position 1 often fails, later ones rarely: the curve finds each position's rate where
    rounds reached it; the geometric rate is their pooled average."""
    curve = [0.5, 0.9, 0.9, 0.95, 0.95, 0.95]
    est = AcceptanceEstimate(forget=1.0, depth=8)
    for n in rounds_of_curve(np.random.default_rng(5), curve, 6, 6000):
        est.update(n, 6)
    np.testing.assert_allclose(est.curve()[:6], curve, atol=0.03)
    assert 0.6 < est.mean < 0.9  # one rate cannot be both 0.5 and 0.95
    # never tried past 6: positions 7, 8 fall back to the pooled rate
    np.testing.assert_allclose(est.curve()[6:], est.mean)


def test_acceptance_curve_is_usable_after_a_few_rounds():
    est = AcceptanceEstimate(depth=4)
    np.testing.assert_allclose(est.curve(), 0.5)  # the prior: the pooled Beta(1, 1) mean
    est.update(1, 4)
    est.update(0, 4)
    curve = est.curve()
    assert np.all((curve > 0) & (curve < 1))
    assert curve[0] < 0.5 and curve[1] < curve[0]  # position 2 failed its only try
    np.testing.assert_allclose(curve[2:], est.mean)  # never reached: pooled


def test_acceptance_counts_beyond_the_depth_pool_into_the_last_position():
    est = AcceptanceEstimate(forget=1.0, depth=4)
    est.update(6, 8)  # positions 1..6 accepted, 7 rejected, 8 never tried
    np.testing.assert_array_equal(est.tried, [1, 1, 1, 4])
    np.testing.assert_array_equal(est.accepted, [1, 1, 1, 3])
    assert est.mean == pytest.approx((1 + 6) / (2 + 7))
