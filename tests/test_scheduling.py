"""Continuous batching and server-side decoding (docs/scheduling.md), with real sockets,
real drafts and the real verifier."""

from __future__ import annotations

import json

import pytest

from edge_controller.launch import AgentSpec, run_agents
from models.target import greedy_mismatch

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
PROMPTS = {
    "q8_0": "The three most important inventions of the last century are",
    "q4_0": "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "none": "Translate to French: The weather is lovely today, so we will walk",
}


@pytest.mark.parametrize("scheduler", ["sync", "continuous"])
def test_every_device_gets_the_targets_greedy_output(
    run_controller, target, default_models, lab_keys, scheduler
):
    """Two drafting devices and one without a drafter (the controller decodes for it)."""
    drafts = {**default_models.drafts, "none": "none"}
    with run_controller(server__scheduler=scheduler) as controller:
        results = {draft: runs[0] for draft, runs in zip(PROMPTS, run_agents(
            controller.endpoint,
            [AgentSpec(f"dev-{d}", drafts[d], prompt, NEW_TOKENS) for d, prompt in PROMPTS.items()],
            lab_keys,
        ), strict=True)}
    for draft, result in results.items():
        assert len(result["tokens"]) == NEW_TOKENS, draft
        problem, _ = greedy_mismatch(target, result["prompt_tokens"], result["tokens"],
                                     NEW_TOKENS)
        assert problem is None, (draft, problem)
    decoded = results["none"]["stats"]
    assert decoded["drafted"] == 0 and decoded["rounds"] == NEW_TOKENS  # a token per verdict
    assert results["q8_0"]["stats"]["drafted"] > 0


def _forwards(timeline) -> list[dict]:
    return [json.loads(line) for line in timeline.read_text().splitlines()
            if '"verify_s"' in line]


@pytest.mark.parametrize("scheduler", ["sync", "continuous"])
def test_under_continuous_a_slow_device_never_delays_a_fast_one(
    run_controller, target, default_models, lab_keys, tmp_path, scheduler
):
    """From the timeline: the time each draft waited before its forward started. Under
    synchronous rounds the fast device's drafts wait for the slow one's (up to the round
    deadline); under continuous batching never longer than a forward already running."""
    timeline = tmp_path / "timeline.jsonl"
    fast = AgentSpec("fast", default_models.drafts["q4_0"], PROMPTS["q4_0"], NEW_TOKENS)
    slow = AgentSpec("slow", default_models.drafts["q8_0"], PROMPTS["q8_0"], 16,
                     extra=("--draft-pace", "0.15"))  # a 4-token draft takes 0.6 s
    with run_controller(server__scheduler=scheduler, server__timeline=str(timeline),
                        control__policy="fixed") as controller:
        fast_result, slow_result = (runs[0] for runs in run_agents(
            controller.endpoint, [fast, slow], lab_keys))
    for result, spec in ((fast_result, fast), (slow_result, slow)):
        problem, _ = greedy_mismatch(target, result["prompt_tokens"], result["tokens"],
                                     spec.max_new_tokens)
        assert problem is None, problem
    forwards = _forwards(timeline)
    waits = [d["waited_s"] for f in forwards for d in f["devices"] if d["device"] == "fast"]
    longest_forward = max(f["verify_s"] for f in forwards)

    def last_forward(device: str) -> float:
        return max(f["started"] for f in forwards if device in {d["device"] for d in f["devices"]})

    if scheduler == "sync":
        assert max(waits) > 0.2, "the synchronous rounds never held the fast device"
    else:
        # Never waits for the slow device's 0.6 s drafts: at most the forward running
        # when its draft arrived (plus loop slack); and it is done long before the slow one.
        assert max(waits) <= longest_forward + 0.1 < 0.6, (max(waits), longest_forward)
        assert last_forward("fast") < last_forward("slow")


def test_a_device_killed_mid_forward_harms_nobody(
    run_controller, target, default_models, lab_keys
):
    """The forward that holds the victim's draft is held open while the victim is killed
    (SIGKILL): the controller notices during the forward (its loop runs on), keeps the
    victim's KV slot for the forward, frees it when the forward lands, and the other
    device's output is the target's."""
    import subprocess
    import threading
    import time

    victim = AgentSpec("victim", default_models.drafts["q4_0"], PROMPTS["q4_0"], 200)
    other = AgentSpec("other", default_models.drafts["q8_0"], PROMPTS["q8_0"], NEW_TOKENS)
    with run_controller(server__scheduler="continuous") as controller:
        verifier = controller.verifier
        held, release = threading.Event(), threading.Event()
        target_slot: list[int] = []
        run = verifier._run

        def gated(items, chunk):
            if target_slot and any(item.slot == target_slot[0] for item in items):
                held.set()
                release.wait(60)
            return run(items, chunk)

        verifier._run = gated
        proc = subprocess.Popen(victim.command(controller.endpoint, lab_keys),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bystander = subprocess.Popen(other.command(controller.endpoint, lab_keys),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while (session := controller.sessions.named("victim")) is None or not (
                    session.in_rounds):
                assert time.monotonic() < deadline, "the victim never got into the rounds"
                time.sleep(0.05)
            slot = session.slot
            target_slot.append(slot)
            assert held.wait(60), "no forward took the victim's draft"
            proc.kill()
            proc.wait()
            while controller.sessions.named("victim") is not None:  # the loop runs on
                assert time.monotonic() < deadline, "the controller never noticed"
                time.sleep(0.05)
            assert verifier._open[slot], "a slot was freed under a running forward"
            release.set()
            out, err = bystander.communicate(timeout=300)
            assert bystander.returncode == 0, err
            result = json.loads(out.splitlines()[0])
            assert not verifier._open[slot], "the victim's slot was never freed"
        finally:
            release.set()
            for started in (proc, bystander):
                if started.poll() is None:
                    started.kill()
                    started.wait()
    problem, _ = greedy_mismatch(target, result["prompt_tokens"], result["tokens"], NEW_TOKENS)
    assert problem is None, problem


def test_a_resume_during_the_forward_that_holds_its_draft_waits_for_it(
    run_controller, target_info, lab_keys
):
    """A resume rolls the sequence back, so it must not run while a forward computes on
    that sequence: it is answered once the forward lands, with the rolled-back sequence
    consistent (the next draft at the resumed position is verified)."""
    import threading

    from device_agent.link import ControllerLink
    from edge_controller import protocol as P
    from tests.test_hardening import hello, until

    with run_controller(server__scheduler="continuous", control__policy="fixed") as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("dev")) as link:
        verifier = controller.verifier
        held, release = threading.Event(), threading.Event()
        run = verifier._run

        def gated(items, chunk):
            if items:
                held.set()
                release.wait(60)
            return run(items, chunk)

        verifier._run = gated
        hello(link, target_info)
        prompt = [1, 504, 3458, 314]
        link.send(P.Start("r", prompt, 8))
        until(P.Control, link)
        link.send(P.Draft("r", 0, len(prompt), [28, 29]))
        assert held.wait(60)
        link.send(P.Resume("r", prompt, [], 0, 8))  # as after a lost link: nothing committed
        for _ in range(200):  # the loop takes it while the forward runs
            if controller._deferred:
                break
            threading.Event().wait(0.05)
        assert controller._deferred, "the resume was not held for the forward"
        release.set()
        verifier._run = run
        # The verdict of the held forward, then the resume's control; the device resumed
        # at its own transcript (nothing committed): its next draft is round 0 again.
        until(P.Verdict, link)
        until(P.Control, link)
        link.send(P.Draft("r", 0, len(prompt), [28]))
        verdict = until(P.Verdict, link)
        assert verdict.round == 0 and len(verdict.tokens) >= 1

        # A cancel after a held resume does not overtake it: the request ends.
        verifier._run = gated
        held.clear()
        release.clear()
        link.send(P.Draft("r", 1, len(prompt) + len(verdict.tokens), [28]))
        assert held.wait(60)
        link.send(P.Resume("r", prompt, verdict.tokens, 1, 8))
        link.send(P.Cancel("r"))
        release.set()
        verifier._run = run
        until(P.Verdict, link)
        for _ in range(200):
            if not controller._deferred and controller.sessions.named("dev").request is None:
                break
            threading.Event().wait(0.05)
        assert controller.sessions.named("dev").request is None, "the cancel overtook the resume"
