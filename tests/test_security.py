"""The secure link with real sockets: who gets in, who is who, and the attacks that used
to work (docs/security.md).

Each test runs a real controller (CURVE, allowlist in a temporary keys directory) and real
device agents or raw links next to it.
"""

from __future__ import annotations

import json
import subprocess
import time

import msgpack
import pytest
import zmq

from device_agent.link import ControllerLink, KeyRefused, LinkRefused, LinkTimeout
from edge_controller import keys as K
from edge_controller import protocol as P
from edge_controller.launch import AgentSpec
from tests.conftest import BIN
from tests.test_e2e_greedy import compare_to_reference

pytestmark = pytest.mark.slow


def hello(link: ControllerLink, target_info, device_id: str = "") -> P.Message:
    link.send(P.Hello(device_id, "handmade", target_info.fingerprint, target_info.vocab_size))
    return link.receive(timeout_s=30)


def agent(endpoint: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "device-agent"), "generate", "--controller", endpoint,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_an_unlisted_key_is_refused_with_a_clear_message(run_controller, default_models,
                                                          tmp_path):
    stranger = tmp_path / "stranger"
    public = K.init_keypair(stranger, K.DEVICE).public_text
    with run_controller() as controller:
        proc = agent(controller.endpoint, "--keys", str(stranger), "--controller-key",
                     controller.transport._keypair.public_text, "--device-id", "stranger",
                     "--draft", str(default_models.drafts["q4_0"]), "--prompt", "hi")
        _, err = proc.communicate(timeout=120)
        assert not list(controller.sessions)
    assert proc.returncode == 1, err
    assert (f"the controller refused this device's key (stranger/{public} not on its "
            "allowlist)") in err


def test_a_plain_client_is_refused(run_controller, default_models, target_info):
    with run_controller() as controller:
        with ControllerLink(controller.endpoint) as plain:
            plain.send(P.Hello("plain", "handmade", target_info.fingerprint,
                               target_info.vocab_size))
            with pytest.raises(LinkRefused, match="requires keys"):
                plain.receive(timeout_s=10)
        proc = agent(controller.endpoint, "--insecure", "--draft",
                     str(default_models.drafts["q4_0"]), "--prompt", "hi")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and "requires keys" in err
        assert not list(controller.sessions)


def test_a_wrong_controller_key_is_exit_3_with_the_likely_cause(run_controller, default_models,
                                                                lab_keys, tmp_path):
    impostor_key = K.init_keypair(tmp_path / "other", K.CONTROLLER).public_text
    with run_controller() as controller:
        proc = agent(controller.endpoint, *lab_keys.agent_args("dev")[:2], "--controller-key",
                     impostor_key, "--timeout", "3", "--draft",
                     str(default_models.drafts["q4_0"]), "--prompt", "hi")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "no answer from the controller" in err
    assert "could not complete the secure handshake" in err  # told apart from a dead host
    assert "--controller-key is most likely wrong" in err


def test_name_spoofing_and_routing_id_takeover_steal_nothing(
    run_controller, target, target_info, default_models, lab_keys
):
    """The two attacks on the first version: a hello carrying a running device's name
    dropped its session; a socket taking its routing id received its verdicts. Now the
    victim, a real agent, finishes with exactly the target's output while a listed
    attacker tries both, and a raw victim link keeps its own verdicts."""
    with run_controller(control__policy="fixed") as controller:
        endpoint = controller.endpoint
        victim = subprocess.Popen(
            AgentSpec("victim", default_models.drafts["q8_0"], "The tallest mountains on Earth",
                      48).command(endpoint, lab_keys),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        with ControllerLink(endpoint, curve=lab_keys.client("mallory")) as mallory:
            deadline = time.monotonic() + 120
            while controller.sessions.named("victim") is None:
                assert time.monotonic() < deadline and victim.poll() is None, "victim never came"
                time.sleep(0.05)
            refused = hello(mallory, target_info, "victim")
            assert isinstance(refused, P.Error) and refused.code == "identity" and refused.fatal
            assert "listed as 'mallory'" in refused.message
            welcome = hello(mallory, target_info)  # its own name works; the victim's never
            assert isinstance(welcome, P.Welcome) and welcome.device_id == "mallory"

        # A raw victim with a request in flight, and an attacker on the victim's own
        # routing id (the strongest attacker: it knows the secret id).
        with ControllerLink(endpoint, curve=lab_keys.client("raw-victim")) as raw:
            hello(raw, target_info)
            prompt = [1, 504, 3458, 314]
            raw.send(P.Start("r", prompt, 16))
            assert isinstance(raw.receive(), P.Control)
            route = raw._socket.getsockopt(zmq.ROUTING_ID)
            thief = zmq.Context.instance().socket(zmq.DEALER)
            thief.setsockopt(zmq.LINGER, 0)
            thief.setsockopt(zmq.ROUTING_ID, route)
            lab_keys.client("thief").apply(thief)
            thief.connect(endpoint)
            try:
                thief.send(P.encode(P.Hello("", "handmade", target_info.fingerprint,
                                            target_info.vocab_size)))
                time.sleep(0.5)
                raw.send(P.Draft("r", 0, len(prompt), [42, 43]))
                verdict = raw.receive(timeout_s=30)
                assert isinstance(verdict, P.Verdict) and verdict.round == 0
                assert not thief.poll(2000), "the thief received something"
            finally:
                thief.close(0)
            assert controller.sessions.named("thief") is None

        out, err = victim.communicate(timeout=600)
    assert victim.returncode == 0, err
    compare_to_reference(target, json.loads(out), 48)


def test_revoking_a_key_ends_its_live_session_within_2_s(run_controller, target_info,
                                                         lab_keys):
    with run_controller(control__policy="fixed") as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("leaver")) as link:
        assert isinstance(hello(link, target_info), P.Welcome)
        link.send(P.Start("r", [1, 2, 3], 8))
        assert isinstance(link.receive(timeout_s=30), P.Control)
        revoked_at = time.monotonic()  # before the command: its start-up counts against us
        revoke = subprocess.run([str(BIN / "edge-controller"), "keys", "revoke", "leaver",
                                 "--dir", str(lab_keys.controller_dir)], capture_output=True)
        assert revoke.returncode == 0, revoke.stderr
        told = link.receive(timeout_s=5)
        assert time.monotonic() - revoked_at < 2.0
        assert isinstance(told, P.Error) and told.code == "revoked" and told.fatal
        assert controller.sessions.named("leaver") is None
        assert controller.verifier.slots_in_use == 0
        link.send(P.Ping(0.0))  # the old connection is still up, and good for nothing
        refused = link.receive(timeout_s=5)
        assert isinstance(refused, P.Error) and refused.code == "revoked"
        with ControllerLink(controller.endpoint, curve=lab_keys.client("leaver")) as again, \
                pytest.raises(KeyRefused):
            again.send(P.Ping(0.0))
            again.receive(timeout_s=10)


def test_without_keys_a_second_connection_cannot_take_a_name(run_controller, target_info,
                                                             caplog):
    with run_controller(insecure=True) as controller, \
            ControllerLink(controller.endpoint) as first, \
            ControllerLink(controller.endpoint) as second:
        assert any("INSECURE: plain TCP" in r.message and r.levelname == "WARNING"
                   for r in caplog.records)
        assert isinstance(hello(first, target_info, "board"), P.Welcome)
        taken = hello(second, target_info, "board")
        assert isinstance(taken, P.Error) and taken.code == "name_taken"
        first.send(P.Ping(0.0))
        assert isinstance(first.receive(timeout_s=10), P.Pong)  # still registered
        assert [s.device_id for s in controller.sessions] == ["board"]


def test_the_previous_protocol_version_is_served_and_older_refused(run_controller,
                                                                   target_info, lab_keys):
    def raw_hello(version: int) -> dict:
        return raw({"v": version, "type": "hello", "device_id": "", "draft_model": "old",
                    "tokenizer_fingerprint": target_info.fingerprint,
                    "vocab_size": target_info.vocab_size, "capabilities": {}})

    def raw(body: dict) -> dict:
        link.send_raw([msgpack.packb(body)])
        deadline = time.monotonic() + 30
        while not link._socket.poll(100):
            assert time.monotonic() < deadline
        return msgpack.unpackb(link._socket.recv())

    with run_controller() as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("old")) as link:
        served = raw_hello(P.PROTOCOL_VERSION - 1)
        assert served["v"] == P.PROTOCOL_VERSION - 1 and served["type"] == "welcome"
        assert served["device_id"] == "old"
        assert controller.sessions.named("old").version == P.PROTOCOL_VERSION - 1
        # A frame it gets wrong is refused in the version it reads (its field, its limits).
        bad = raw({"v": P.PROTOCOL_VERSION - 1, "type": "start", "request_id": "r",
                   "prompt_ids": [1, 2], "max_new_tokens": 4, "temperature": 500.0})
        assert bad["v"] == P.PROTOCOL_VERSION - 1 and bad["type"] == "error", bad
        assert "temperature" in bad["message"]
        refused = raw_hello(P.PROTOCOL_VERSION - 2)
        assert refused["type"] == "error" and refused["code"] == "version" and refused["fatal"]
        assert f"version {P.PROTOCOL_VERSION - 2}" in refused["message"]
        assert f"speaks version {P.PROTOCOL_VERSION}" in refused["message"]


def test_device_id_must_match_the_keys_listed_name(run_controller, default_models, lab_keys):
    with run_controller() as controller:
        lab_keys.device_dir("orin")
        proc = agent(controller.endpoint, *lab_keys.agent_args("orin"), "--device-id",
                     "not-orin", "--draft", str(default_models.drafts["q4_0"]), "--prompt", "hi")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "listed as 'orin'" in err and "'not-orin'" in err


def test_a_rotated_device_key_takes_its_name_over(run_controller, target_info, lab_keys,
                                                  tmp_path):
    """Rotation as docs/security.md says: revoke NAME, add NAME with the new key, and the
    new key registers at once, before the controller's next look at the allowlist."""
    with run_controller(control__policy="fixed") as controller:
        with ControllerLink(controller.endpoint, curve=lab_keys.client("orin")) as old:
            hello(old, target_info)
            old.send(P.Start("r", [1, 2, 3], 8))
            assert isinstance(old.receive(timeout_s=30), P.Control)
            rotated = K.init_keypair(tmp_path / "rotated", K.DEVICE)
            K.revoke_device(lab_keys.controller_dir, "orin")
            K.list_device(lab_keys.controller_dir, "orin", rotated.public_text)
            curve = K.CurveClient(rotated, lab_keys.controller_key.encode())
            with ControllerLink(controller.endpoint, curve=curve) as new:
                assert hello(new, target_info).device_id == "orin"
                new.send(P.Start("r2", [1, 2, 3], 8))
                assert isinstance(new.receive(timeout_s=30), P.Control)
                time.sleep(1.0)  # the controller's own look at the allowlist comes and goes
                new.send(P.Draft("r2", 0, 3, [42]))
                assert isinstance(new.receive(timeout_s=30), P.Verdict)
        assert [s.identity for s in controller.sessions] == [rotated.public]
        assert controller.verifier.slots_in_use == 1


def test_pings_from_a_second_connection_do_not_move_a_devices_route(
    run_controller, target_info, lab_keys
):
    """The same key on a second connection (a stolen key, or a restarted agent before its
    hello) gets its pongs, but the device's verdicts stay on the connection it drafts on."""
    with run_controller(control__policy="fixed") as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("dev")) as first, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("dev")) as second:
        hello(first, target_info)
        first.send(P.Start("r", [1, 2, 3], 8))
        assert isinstance(first.receive(timeout_s=30), P.Control)
        second.send(P.Ping(1.5))
        pong = second.receive(timeout_s=10)
        assert isinstance(pong, P.Pong) and pong.sent_at == 1.5
        first.send(P.Draft("r", 0, 3, [42]))
        assert isinstance(first.receive(timeout_s=30), P.Verdict)
        with pytest.raises(LinkTimeout):
            second.receive(timeout_s=1)
