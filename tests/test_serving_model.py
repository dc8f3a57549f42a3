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
