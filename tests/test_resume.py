"""Nothing lost (docs/resume.md): requests survive a controller killed or stopped, a link
down, duplicates and replays; real processes, real sockets, a real network namespace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from device_agent.link import ControllerLink
from edge_controller import protocol as P
from edge_controller.launch import (
    AgentSpec,
    free_endpoint,
    start_controller,
    stop_controller,
)
from tests.test_e2e_greedy import compare_to_reference

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The story of the lighthouse keeper begins on a stormy night when"
TOKENS = 96
# A paced drafter: the request lasts long enough to be cut in the middle.
SLOW = ("--draft-pace", "0.03", "--resume-timeout", "120")


def wait_for(text: str, path: Path, after: int = 0, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text()[after:]:
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}"
        time.sleep(0.1)


def agent(spec: AgentSpec, endpoint: str, keys) -> subprocess.Popen:
    # SIGINT at its default in the agent, whatever this run inherited: a suite started in
    # the background of a script ignores SIGINT, and Python then never raises
    # KeyboardInterrupt (the Ctrl-C test would see a finished request instead).
    return subprocess.Popen(spec.command(endpoint, keys), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupted(tmp_path: Path, keys, spec: AgentSpec, stop: str) -> tuple[dict, str, Path]:
    """Run ``spec`` against a controller that is stopped mid-request (``stop``: "kill" =
    kill -9, "term" = SIGTERM, which must exit 0 within 5 s) and started again; the
    agent's result and stderr, and the controller log."""
    endpoint, log = free_endpoint(), tmp_path / "controller.log"
    timeline = tmp_path / "timeline.jsonl"
    first = start_controller(log, keys, endpoint, "--policy", "fixed", "--timeline",
                             str(timeline))
    proc = agent(spec, endpoint, keys)
    try:
        try:
            wait_for("request", log)
        except AssertionError:
            proc.kill()
            raise AssertionError(f"the agent never started: {proc.communicate()[1]}") from None
        # Some rounds in (counted, not slept: a loaded machine is slow): the request is
        # partly done, with tokens output for the new controller to re-create.
        deadline = time.monotonic() + 120
        while not timeline.exists() or timeline.read_text().count('"committed"') < 3:
            assert time.monotonic() < deadline, "fewer than 3 rounds in 120 s"
            time.sleep(0.05)
        if stop == "kill":
            first.kill()
            first.wait()
        else:
            stopped_at = time.monotonic()
            assert stop_controller(first) == 0
            assert time.monotonic() - stopped_at < 5.0
        second = start_controller(log, keys, endpoint, "--policy", "fixed", append=True)
        out, err = proc.communicate(timeout=300)
        stop_controller(second)
    finally:
        for p in (proc, first):
            if p.poll() is None:
                p.kill()
    assert proc.returncode == 0, err
    return json.loads(out), err, log


def test_kill_9_of_the_controller_mid_request_and_a_restart_lose_nothing(
    tmp_path, target, default_models, lab_keys
):
    spec = AgentSpec("survivor", default_models.drafts["q8_0"], PROMPT, TOKENS, SLOW)
    result, err, log = interrupted(tmp_path, lab_keys, spec, "kill")
    assert "resuming request" in err
    # The new controller re-created the request from the device's transcript.
    assert any("of them output" in line and "(0 of them output)" not in line
               for line in log.read_text().splitlines())
    compare_to_reference(target, result, TOKENS)


def test_seeded_sampling_survives_a_restart_unchanged(tmp_path, default_models, lab_keys):
    """Under the fixed policy a seeded request's tokens depend on nothing but its seed and
    positions: interrupted and resumed, it writes what it writes uninterrupted."""
    spec = AgentSpec("sampler", default_models.drafts["q5_0"], PROMPT, 64,
                     (*SLOW, "--temperature", "0.9", "--seed", "42"))
    endpoint = free_endpoint()
    controller = start_controller(tmp_path / "straight.log", lab_keys, endpoint,
                                  "--policy", "fixed")
    straight = agent(spec, endpoint, lab_keys)
    out, err = straight.communicate(timeout=300)
    stop_controller(controller)
    assert straight.returncode == 0, err
    result, err, _ = interrupted(tmp_path, lab_keys, spec, "kill")
    assert "resuming request" in err  # it was cut, not finished before the kill
    assert result["tokens"] == json.loads(out)["tokens"]


def test_an_idle_agent_survives_a_restart_between_requests(tmp_path, target, default_models,
                                                           lab_keys):
    """The controller closes down while the agent waits between requests (its `closing`
    sits unread): the next request starts against the next controller all the same."""
    from device_agent.agent import DeviceAgent
    from device_agent.drafter import Drafter

    drafter = Drafter(default_models.drafts["q8_0"], n_ctx=512)
    prompt = drafter.tokenize(PROMPT)
    endpoint, log = free_endpoint(), tmp_path / "controller.log"
    controller = start_controller(log, lab_keys, endpoint, "--policy", "fixed")
    try:
        with ControllerLink(endpoint, curve=lab_keys.client("idler"), timeout_s=10) as link:
            device = DeviceAgent(drafter, link, resume_timeout_s=60)
            device.register()
            first = device.generate(prompt, 24)
            assert stop_controller(controller) == 0
            controller = start_controller(log, lab_keys, endpoint, "--policy", "fixed",
                                          append=True)
            second = device.generate(prompt, 24)
    finally:
        stop_controller(controller)
    assert second.tokens == first.tokens
    compare_to_reference(target, second.to_json(), 24)


def test_sigterm_closes_down_gracefully_and_the_agent_resumes_on_the_next_start(
    tmp_path, target, default_models, lab_keys
):
    spec = AgentSpec("patient", default_models.drafts["q8_0"], PROMPT, TOKENS, SLOW)
    result, err, log = interrupted(tmp_path, lab_keys, spec, "term")
    text = log.read_text()
    assert "SIGTERM: closing down" in text and "controller stopped" in text
    assert "closing down" in err  # the agent was told, and resumed
    compare_to_reference(target, result, TOKENS)


def test_giving_up_prints_the_partial_result_and_exits_3(tmp_path, target, default_models,
                                                          lab_keys):
    endpoint, log = free_endpoint(), tmp_path / "controller.log"
    controller = start_controller(log, lab_keys, endpoint, "--policy", "fixed")
    spec = AgentSpec("quitter", default_models.drafts["q8_0"], PROMPT, TOKENS,
                     ("--draft-pace", "0.03", "--resume-timeout", "3", "--timeout", "2"))
    proc = agent(spec, endpoint, lab_keys)
    wait_for("request", log)
    time.sleep(1.5)
    controller.kill()
    controller.wait()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "gave up resuming" in err and "printed as a partial result" in err
    partial = json.loads(out)
    assert partial["partial"] is True and 0 < len(partial["tokens"]) < TOKENS
    compare_to_reference(target, partial, len(partial["tokens"]))  # what it has is exact


def test_duplicate_and_replayed_drafts_never_commit_twice(run_controller, target_info,
                                                          lab_keys):
    with run_controller(control__policy="fixed") as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("dup")) as link:
        link.send(P.Hello("", "d", target_info.fingerprint, target_info.vocab_size))
        assert isinstance(link.receive(), P.Welcome)
        prompt = [1, 504, 3458, 314]
        link.send(P.Start("r", prompt, 32))
        assert isinstance(link.receive(), P.Control)
        draft = P.Draft("r", 0, len(prompt), [28, 253, 4159])
        link.send(draft)
        first = link.receive()
        assert isinstance(first, P.Verdict)
        session = controller.sessions.named("dup")
        length = controller.verifier.length(session.slot)
        link.send(draft)  # the same draft again (a retransmission)
        assert link.receive() == first  # the same verdict...
        assert controller.verifier.length(session.slot) == length  # ...and no second commit
        # A replay from before round 0 (the device never heard that verdict): the
        # controller rolls back to the device's transcript, and the round comes out the same.
        link.send(P.Resume("r", prompt, [], 0, 32))
        assert isinstance(link.receive(), P.Control)
        assert controller.verifier.length(session.slot) == len(prompt)
        link.send(P.Draft("r", 0, len(prompt), [28, 253, 4159]))
        again = link.receive()
        assert (again.accepted, again.tokens) == (first.accepted, first.tokens)
        assert controller.verifier.length(session.slot) == length
        # A reconnect (same key, new connection) resumes without a hello: the controller
        # kept the registration and the request, and rolls its KV cache back in place.
        with ControllerLink(controller.endpoint, curve=lab_keys.client("dup")) as moved:
            moved.send(P.Resume("r", prompt, [], 0, 32))
            assert isinstance(moved.receive(), P.Control)
            assert controller.verifier.length(session.slot) == len(prompt)
            moved.send(P.Cancel("r"))  # ends it, silently
            moved.send(P.Ping(1.0))
            assert isinstance(moved.receive(), P.Pong)
            assert controller.verifier.slots_in_use == 0
            # The duplicate of a request's last round (its verdict lost) gets that verdict.
            moved.send(P.Start("last", prompt, 1))
            assert isinstance(moved.receive(), P.Control)
            final = P.Draft("last", 0, len(prompt), [28, 253])
            moved.send(final)
            done = moved.receive()
            assert isinstance(done, P.Verdict) and done.done
            moved.send(P.Draft("last", 0, len(prompt), [28, 253], draft_s=0.5))  # timed anew
            assert moved.receive() == done
            assert controller.verifier.slots_in_use == 0


def test_an_idle_device_stays_registered_while_its_connection_lives(run_controller,
                                                                    target_info, lab_keys):
    """Liveness is the connection's heartbeats, not the device's messages: a board's
    service waiting for work sends nothing for longer than the session timeout."""
    with run_controller(server__session_timeout_s=2.0) as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("quiet")) as link:
        link.send(P.Hello("", "d", target_info.fingerprint, target_info.vocab_size))
        assert isinstance(link.receive(), P.Welcome)
        time.sleep(5.0)  # silent, but heartbeats flow
        assert controller.sessions.named("quiet") is not None
        link.send(P.Start("r", [1, 2, 3], 4))
        assert isinstance(link.receive(), P.Control)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_a_link_down_for_10_s_loses_nothing(tmp_path, target, default_models, lab_keys):
    """ZMTP heartbeats, not a closed socket: the device's interface goes down inside its
    namespace for 10 s. The controller drops the registration after its session timeout
    (no heartbeats) and frees the slot; the agent resumes when the link is back."""
    from edge_controller.trial.netns import LinkShape, NetworkLab
    from edge_controller.trial.runner import CONTROLLER_PORT

    spec = AgentSpec("roamer", default_models.drafts["q8_0"], PROMPT, TOKENS, SLOW)
    log = tmp_path / "controller.log"
    with NetworkLab({"roamer": LinkShape(delay_ms=2)}) as lab:
        controller = start_controller(
            log, lab_keys, f"tcp://0.0.0.0:{CONTROLLER_PORT}", "--policy", "fixed",
            spawn=lambda argv, **kw: lab.spawn(None, argv, cpus=[0], **kw))
        proc = lab.spawn("roamer", spec.command(lab.endpoint("roamer", CONTROLLER_PORT),
                                                lab_keys),
                         cpus=[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for("request", log)
            time.sleep(1.5)
            lab.set_up("roamer", False)
            time.sleep(10.0)
            assert "roamer: lost its connection" in log.read_text()
            lab.set_up("roamer", True)
            out, err = proc.communicate(timeout=300)
        finally:
            stop_controller(controller)
    assert proc.returncode == 0, err
    assert "resuming request" in err
    compare_to_reference(target, json.loads(out), TOKENS)


def test_sigint_is_a_graceful_stop_too(tmp_path, lab_keys):
    endpoint, log = free_endpoint(), tmp_path / "controller.log"
    controller = start_controller(log, lab_keys, endpoint, "--policy", "fixed")
    controller.send_signal(signal.SIGINT)
    assert controller.wait(timeout=10) == 0
    assert "SIGINT: closing down" in log.read_text()


def test_ctrl_c_cancels_the_request_at_the_controller(tmp_path, default_models, lab_keys):
    endpoint, log = free_endpoint(), tmp_path / "controller.log"
    controller = start_controller(log, lab_keys, endpoint, "--policy", "fixed")
    try:
        spec = AgentSpec("impatient", default_models.drafts["q8_0"], PROMPT, TOKENS,
                         ("--draft-pace", "0.03"))
        proc = agent(spec, endpoint, lab_keys)
        wait_for("request", log)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        # The request is freed at once: cancelled, or (when the agent's exit closed the
        # connection first) dropped with the session; never left to the idle timeout.
        deadline = time.monotonic() + 10
        while not any(why in log.read_text() for why in ("cancelled", "session is dropped")):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
    finally:
        stop_controller(controller)
