"""Live draft control over real shaped links (network namespaces, a real controller process,
real device agents): a trial runs and reports; a link that gets worse mid-run moves the
controller's decisions the way the system model says, and outputs stay lossless."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edge_controller.control import solve
from edge_controller.draft_control import problem_from_snapshot
from edge_controller.launch import BIN, AgentSpec
from edge_controller.trial.runner import lab_agents, lab_controller, replay_decisions
from tests.test_e2e_greedy import compare_to_reference

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]
ROOT = Path(__file__).resolve().parent.parent


def test_ci_trial_runs_every_policy_and_reports(tmp_path):
    proc = subprocess.Popen(
        [str(BIN / "edge-controller"), "trial", str(ROOT / "configs/trials/ci-small.toml"),
         "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["policies"]) == {"heterogeneous", "agnostic"}
    for policy in report["policies"].values():
        assert policy["goodput_tok_s"] > 0 and policy["predicted_goodput_tok_s"] > 0
        assert [u["tokens"] for u in policy["users"]] == [96, 96]
        assert policy["window_s"] > 0 and policy["simulated_goodput_tok_s"] > 0
    assert set(report["interference"]) == {"orin", "phone"}
    for name in ("report.md", "goodput.png", "timeline-heterogeneous.png"):
        assert (tmp_path / name).stat().st_size > 0
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"msp-{proc.pid}-" not in namespaces, "the trial left network namespaces behind"


def test_ci_trial_compares_schedulers_and_the_baselines(tmp_path):
    """--schedulers and --baselines (docs/scheduling.md): every entry on the same workload,
    lossless, with the verifier's busy fraction and per-device time per token; under
    proactive (continuous batching and pre-drafting) the devices' pre-draft figures.
    (Plain continuous batching: tests/test_scheduling.py.)"""
    proc = subprocess.run(
        [str(BIN / "edge-controller"), "trial", str(ROOT / "configs/trials/ci-small.toml"),
         "--out", str(tmp_path), "--policies", "fixed", "--schedulers", "proactive",
         "--baselines"], capture_output=True, text=True, timeout=1200,
    )  # (the sync entries: test_ci_trial_runs_every_policy_and_reports)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    entries = report["policies"]
    assert list(entries) == ["fixed@proactive", "server-decode", "target-alone"]
    for name, entry in entries.items():
        assert entry["goodput_tok_s"] > 0, name
        assert 0 < entry["verifier_busy"] <= 1, name
        assert [u["tokens"] for u in entry["users"]] == [96, 96], name
        assert entry["run_goodput_tok_s"] > 0, name
        assert all(0 < u["time_per_token_p50_s"] <= u["time_per_token_p95_s"]
                   for u in entry["users"]), name
        if name != "target-alone":  # the reference itself
            assert all(u["lossless"] for u in entry["users"]), name
    assert entries["fixed@proactive"]["scheduler"] == "proactive"
    for user in entries["fixed@proactive"]["users"]:
        q = user["predraft"]
        assert 0 < q["paid"] <= q["rounds"] and q["used"] > 0, user
        assert q["drafted"] == q["used"] + q["wasted"] + q["paid"], user
    assert all("predraft" not in u for u in entries["server-decode"]["users"])
    idle = entries["fixed@proactive"]["verifier_idle_s"]  # who the verifier waited for
    assert set(idle) <= {"orin", "phone", "prompt chunk"} and sum(idle.values()) > 0
    assert [u["draft"] for u in entries["server-decode"]["users"]] == ["none", "none"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| fixed@proactive |" in markdown and "| server-decode |" in markdown
    assert "Where the verifier's idle time went" in markdown
    assert "Proactive drafting:" in markdown


def model_plan(event: dict, bandwidth_hz: float, policy: str, **delays: float):
    """Solve the policy from the estimates a plan event recorded (optionally delays moved)."""
    estimates = {d: {**e, "delay_s": delays.get(d, e["delay_s"])}
                 for d, e in event["estimates"].items()}
    return solve(policy, *problem_from_snapshot(estimates, event["verify_time"], bandwidth_hz))


def solved_for(plan: tuple[int, dict, dict], devices: list[str]) -> bool:
    """A plan solved for all of ``devices`` together (not the equal shares before any
    measurement, nor one made while some of them were between requests)."""
    estimates = plan[2]["estimates"]
    return set(plan[2]["plan"]) == set(devices) == set(estimates) and all(
        e is not None and e["delay_s"] is not None for e in estimates.values())


@pytest.mark.parametrize("policy", ["heterogeneous"])  # others: tests/test_simulator.py
def test_worse_link_mid_run_moves_decisions_as_the_model_says(
    tmp_path, target, default_models, lab_keys, policy
):
    from edge_controller.trial.netns import LinkShape, NetworkLab

    bandwidth = 2e5
    devices = ["steady", "fading"]
    config = tmp_path / "controller.toml"
    timeline = tmp_path / "timeline.jsonl"
    config.write_text(f'[server]\ntimeline = "{timeline}"\nround_deadline_s = 2.0\n'
                      f'[control]\npolicy = "{policy}"\nbandwidth_hz = {bandwidth}\n'
                      "resolve_interval_s = 0.5\n")
    # The steady device accepts more and so finishes sooner: it runs more requests, so that
    # both devices are in the rounds long after the change.
    specs = [AgentSpec(name, default_models.drafts[draft], prompt, 32,
                       ("--spectral-efficiency", "2.0", "--timeout", "300"), requests=requests)
             for name, draft, prompt, requests in [
                 ("steady", "q8_0", "The water cycle works as follows:", 8),
                 ("fading", "q5_0", "A short history of the printing press:", 3)]]
    shapes = {d: LinkShape(delay_ms=5) for d in devices}
    with NetworkLab(shapes, wire_cpus=[1]) as lab, \
            lab_controller(lab, lab_keys, tmp_path / "controller.log", config, cpus=[0]):
        results: list = []
        failures: list = []

        def agents() -> None:
            try:
                results.extend(lab_agents(lab, lab_keys, specs, cpus=[1]))
            except Exception as exc:  # surfaced below, not lost in the thread
                failures.append(exc)

        runner = threading.Thread(target=agents)
        runner.start()
        # Let the controller settle on a plan with both devices, then degrade one link.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and runner.is_alive():
            events = [json.loads(x) for x in timeline.read_text().splitlines()] \
                if timeline.exists() else []
            if len([p for p in replay_decisions(events) if solved_for(p, devices)]) >= 2:
                break
            time.sleep(0.5)
        changed_at = len(timeline.read_text().splitlines())
        lab.set_link("fading", delay_ms=150)  # +145 ms each way
        runner.join(900)
    assert not failures, failures
    assert len(results) == 2, "device agents did not finish"

    events = [json.loads(x) for x in timeline.read_text().splitlines()]
    plans = [p for p in replay_decisions(events) if solved_for(p, devices)]
    before = [p for p in plans if p[0] < changed_at][-1]
    after = [p for p in plans if p[0] > changed_at]
    assert after, "no re-plan after the link got worse"
    after = after[-1]
    d_before = before[2]["estimates"]["fading"]["delay_s"]
    d_after = after[2]["estimates"]["fading"]["delay_s"]
    # +290 ms of round trip; the running mean (forgetting 0.9) holds half of a step
    # change after 7 rounds.
    assert d_after - d_before > 0.145

    # What the model says: the same estimates with only fading's delay moved. Every move it
    # calls large (2+ tokens of draft; 0.1+ of the band), the live controller makes too.
    # Heterogeneous plans are indifferent to how tiny uploads split the band (many shares
    # give the same goodput, and the solver's pick swings between them), so there only the
    # draft lengths are the model's prediction; homogeneous shares compensate the weak link.
    model_before = model_plan(before[2], bandwidth, policy)
    model_after = model_plan(before[2], bandwidth, policy, fading=d_after)
    checked = [("draft_len", 2)] + ([("bandwidth_share", 0.1)] if policy == "homogeneous" else [])
    large = 0
    for i, device in enumerate(sorted(devices)):
        for key, big in checked:
            model_move = getattr(model_after, key)[i] - getattr(model_before, key)[i]
            live_move = after[1][device][key] - before[1][device][key]
            if abs(model_move) >= big:
                large += 1
                assert live_move * model_move > 0, (
                    f"{policy}: model moves {device}.{key} by {model_move:+.3g}, "
                    f"the controller by {live_move:+.3g}")
    assert large >= 1, "the model saw no large move: the test shows nothing"

    for runs in results:
        for run in runs:
            compare_to_reference(target, run, 32)
