"""The model of continuous batching and proactive drafting (control/serving.py), its
solver, and the simulator's continuous and proactive serving (ServingSimulation)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import optimize

from edge_controller.control import SystemParams, UserParams, VerifyTime, solve
from edge_controller.control.scenario import load_scenario
from edge_controller.control.serving import (
    _shares,
    guess_confirmed_prob,
    serving_goodput,
    serving_plan,
)
from edge_controller.simulator.deciders import FixedPlan
from edge_controller.simulator.engine import ServingSimulation
from tests.conftest import BIN

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("steady-6", "drift-6", "edge-cloud-6", "small-heterogeneous")


def _simulated(system, users, plan, scheduler: str, seconds: float = 60.0, seed: int = 1):
    return ServingSimulation(system, lambda _: users, FixedPlan(plan), seed=seed,
                             proactive=scheduler == "proactive").run(seconds)


def test_one_device_alone_cycles_exactly_as_the_model_says():
    """No other device: no wait for anyone's forward; the cycle is L t + upload + d + T_v
    of its own draft, and the simulator's goodput is E[N] / cycle."""
    system = SystemParams(1e5, 16.0, VerifyTime(0.02, 0.001), overhead_bits=256.0)
    users = UserParams([0.01], [0.7], [3.0], [0.015])
    plan = solve("heterogeneous", system, users)
    prediction = serving_goodput(system, users, plan.draft_len, plan.bandwidth_share)
    length = int(plan.draft_len[0])
    cycle = (length * 0.01 + (256 + 16 * length) / 3e5 + 0.015 + 0.02 + 0.001 * (length + 1))
    assert prediction.cycle_s[0] == pytest.approx(cycle, rel=1e-9)
    simulated = _simulated(system, users, plan, "continuous", seconds=600)
    assert simulated.goodput_tok_s == pytest.approx(prediction.goodput_tok_s, rel=0.03)


@pytest.mark.parametrize("scheduler", ["continuous", "proactive"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_the_model_predicts_the_simulator(name, scheduler):
    """Within 16% on the repo's scenarios, for the synchronous plan and the plan solved
    for this serving (docs/system-model.md gives the table)."""
    scenario = load_scenario(ROOT / f"configs/scenarios/{name}.toml")
    users = scenario.users_at(0.0)
    for plan in (solve("heterogeneous", scenario.system, users),
                 serving_plan("heterogeneous", scenario.system, users, scheduler)):
        predicted = serving_goodput(scenario.system, users, plan.draft_len,
                                    plan.bandwidth_share, scheduler).goodput_tok_s
        simulated = _simulated(scenario.system, users, plan, scheduler).goodput_tok_s
        assert predicted == pytest.approx(simulated, rel=0.16), (plan.draft_len, scheduler)


@pytest.mark.parametrize("scheduler", ["continuous", "proactive"])
def test_the_plan_solved_for_the_serving_beats_the_synchronous_plan_there(scheduler):
    scenario = load_scenario(ROOT / "configs/scenarios/steady-6.toml")
    users = scenario.users_at(0.0)
    sync = solve("heterogeneous", scenario.system, users)
    solved = serving_plan("heterogeneous", scenario.system, users, scheduler)
    scored = serving_goodput(scenario.system, users, sync.draft_len, sync.bandwidth_share,
                             scheduler)
    assert solved.goodput_tok_s >= scored.goodput_tok_s  # it starts from it
    assert abs(solved.bandwidth_share.sum() - 1) < 1e-9 and (solved.bandwidth_share >= 0).all()
    ours = _simulated(scenario.system, users, solved, scheduler).goodput_tok_s
    theirs = _simulated(scenario.system, users, sync, scheduler).goodput_tok_s
    assert ours > 1.03 * theirs, (ours, theirs)


def test_shares_maximise_the_sum_of_cycle_goodputs():
    rng = np.random.default_rng(3)
    tokens, fixed, upload = rng.uniform(1, 5, 5), rng.uniform(0.02, 0.2, 5), rng.uniform(
        0.001, 0.05, 5)
    upload[2] = 0.0  # uploads nothing: gets nothing

    def value(beta):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.sum(tokens / (fixed + np.where(upload > 0, upload / beta, 0.0))))

    ours = _shares(tokens, fixed, upload)
    assert ours[2] == 0 and ours.sum() == pytest.approx(1.0)
    sends = upload > 0
    best = optimize.minimize(
        lambda b: -value(np.where(sends, np.r_[b[:2], 0, b[2:]], 0.0)), np.full(4, 0.25),
        bounds=[(1e-6, 1)] * 4, constraints=[{"type": "eq", "fun": lambda b: b.sum() - 1}])
    assert value(ours) >= -best.fun - 1e-9


def test_proactive_hides_drafting_when_every_guess_pays():
    """Acceptance 1, a long delay: every guess is confirmed and the whole next draft is
    ready when the verdict comes, so a cycle drafts nothing after its first; the
    simulator agrees, and the confirmation probability is 1."""
    system = SystemParams(1e6, 16.0, VerifyTime(0.01, 0.0005), max_draft_len=8)
    users = UserParams([0.01, 0.01], [1.0, 1.0], [3.0, 3.0], [0.2, 0.2])
    plan = serving_plan("fixed-L", system, users, "proactive", fixed_draft_len=4)
    assert (guess_confirmed_prob(users, plan.draft_len) == 1).all()
    continuous = serving_goodput(system, users, plan.draft_len, plan.bandwidth_share)
    proactive = serving_goodput(system, users, plan.draft_len, plan.bandwidth_share,
                                "proactive")
    assert (proactive.predrafted == 5).all()
    # four tokens' drafting saved (the forward moves a little with the load)
    np.testing.assert_allclose(continuous.cycle_s - proactive.cycle_s, 4 * 0.01, rtol=0.01)
    simulated = _simulated(system, users, plan, "proactive", seconds=60)
    assert simulated.goodput_tok_s == pytest.approx(proactive.goodput_tok_s, rel=0.03)
    assert simulated.predraft_paid.sum() >= simulated.rounds - 2
    plain = _simulated(system, users, plan, "continuous", seconds=60)
    assert simulated.goodput_tok_s > 1.1 * plain.goodput_tok_s


def test_a_verdict_in_the_middle_of_a_pre_drafted_token_waits_for_it():
    """Nothing ever confirmed (acceptance 0): proactive only costs, the token in hand when
    the verdict comes (the cycle's wait is max(W, m t))."""
    system = SystemParams(1e6, 16.0, VerifyTime(0.01, 0.0), max_draft_len=4)
    users = UserParams([0.03], [0.0], [3.0], [0.0])
    continuous = serving_goodput(system, users, [2], [1.0])
    proactive = serving_goodput(system, users, [2], [1.0], "proactive")
    assert proactive.confirm_prob[0] == 0 and proactive.predrafted[0] == 1
    # The verdict comes 10 ms after the upload; the guess takes 30 ms.
    assert proactive.cycle_s[0] - continuous.cycle_s[0] == pytest.approx(0.02, rel=1e-9)


@pytest.mark.parametrize("scheduler", ["continuous", "proactive"])
def test_simulate_and_plan_take_a_scheduler(scheduler):
    scenario = str(ROOT / "configs/scenarios/drift-6.toml")
    out = subprocess.run([str(BIN / "edge-controller"), "simulate", scenario, "--seconds", "20",
                          "--scheduler", scheduler, "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out)
    assert report["scheduler"] == scheduler and 0 < report["verifier_busy"] <= 1
    assert 0.8 < report["ratio_to_oracle"] <= 1.2
    plan = json.loads(subprocess.run(
        [str(BIN / "edge-controller"), "plan", scenario, "--scheduler", scheduler, "--json"],
        capture_output=True, text=True, timeout=300, check=True).stdout)
    assert plan["scheduler"] == scheduler and plan["goodput_tok_s"] > 0
    refused = subprocess.run([str(BIN / "edge-controller"), "simulate", scenario, "--policy",
                              "online", "--scheduler", scheduler],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "synchronous rounds" in refused.stderr


def test_per_device_upload_laws_as_trials_measure_them():
    """A trial's problem has each device's own b0 and b (its measured upload law)."""
    system = SystemParams(1e5, np.array([16.0, 20.0]), VerifyTime(0.02, 0.001),
                          overhead_bits=np.array([300.0, 500.0]))
    users = UserParams([0.01, 0.02], [0.8, 0.6], [3.0, 2.0], [0.01, 0.02])
    for scheduler in ("continuous", "proactive"):
        plan = serving_plan("heterogeneous", system, users, scheduler)
        simulated = _simulated(system, users, plan, scheduler, seconds=120).goodput_tok_s
        assert plan.goodput_tok_s == pytest.approx(simulated, rel=0.1), scheduler


@pytest.mark.parametrize("scheduler", ["continuous", "proactive"])
def test_the_live_draft_control_plans_with_the_model_of_its_scheduler(scheduler):
    """A DraftController for a controller running ``scheduler``: fed two devices' drafts
    and verdicts, its plan is serving_plan's on its own estimates, not the round's."""
    from edge_controller.config import ControlConfig
    from edge_controller.control.estimators import AffineFit
    from edge_controller.draft_control import DraftController, problem_from_snapshot

    fit = AffineFit()
    for tokens in (2, 6, 12, 20):
        fit.update(tokens, 0.02 + 0.002 * tokens)
    control = DraftController(ControlConfig(policy="heterogeneous", bandwidth_hz=2e5), fit,
                              scheduler=scheduler)
    devices = {"fast": (0.01, 0.9, 4.0), "slow": (0.05, 0.5, 1.0)}  # t, a, s
    rng = np.random.default_rng(0)
    for name, (t, _, s) in devices.items():
        control.join(name)
        control.on_telemetry(name, s, t)
        control.on_request_start(name)
    for step in range(40):
        for name, (t, a, _) in devices.items():
            control.on_draft(name, 4, 4 * t, 60, 4 * t + 0.02, first_round=step == 0)
            accepted = int(np.cumprod(rng.random(4) < a).sum())
            control.on_verdict(name, accepted, 4, accepted + 1, step * 0.2)
        control.on_round(10, 0.04)
    changed = control.maybe_resolve(now=100.0)
    assert changed
    estimates = {d: e for d, e in control.snapshot().items()}
    system, users = problem_from_snapshot(estimates, fit.coefficients(), 2e5, 16)
    expected = serving_plan("heterogeneous", system, users, scheduler)
    assert control.plan_goodput_tok_s == pytest.approx(expected.goodput_tok_s, rel=1e-6)
    assert [control.decisions[d].draft_len for d in sorted(devices)] == expected.draft_len.tolist()
    sync = solve("heterogeneous", system, users)
    assert control.plan_goodput_tok_s != pytest.approx(sync.goodput_tok_s, rel=1e-3)


def test_every_uploading_device_gets_a_share():
    """A radio so weak that the optimum would give it nothing still gets MIN_SHARE: a
    share of 0 would starve it in the model and leave it unpaced in the field."""
    from edge_controller.control.serving import MIN_SHARE

    shares = _shares(np.array([5.0, 1.0, 2.0]), np.array([0.05, 0.05, 0.05]),
                     np.array([0.001, 10.0, 0.0]))
    assert shares[1] >= MIN_SHARE / 1.01 and shares[2] == 0
    assert shares.sum() == pytest.approx(1.0)


def test_the_verifier_is_never_busy_more_than_the_run():
    scenario = load_scenario(ROOT / "configs/scenarios/edge-cell-16.toml")
    users = scenario.users_at(0.0)
    plan = serving_plan("heterogeneous", scenario.system, users, "continuous")
    result = _simulated(scenario.system, users, plan, "continuous", seconds=5.0)
    assert 0.9 < result.busy_s / 5.0 <= 1.0
