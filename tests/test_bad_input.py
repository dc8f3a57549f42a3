"""Bad input gets a clear error and never disturbs another device's session.

While a real device agent generates, a raw DEALER socket sends garbage, oversized and
unknown frames, protocol violations and out-of-vocabulary ids, and a device whose draft
has a different tokenizer (Gemma-3) tries to register. Each gets its error; the good
device still gets exactly the target's output.
"""

from __future__ import annotations

import json
import subprocess

import msgpack
import pytest

from device_agent.link import ControllerLink, LinkLost
from edge_controller import protocol as P
from edge_controller.launch import AgentSpec, run_agents
from tests.conftest import BIN
from tests.test_e2e_greedy import compare_to_reference

pytestmark = pytest.mark.slow


def expect_error(link: ControllerLink, code: str) -> P.Error:
    reply = link.receive(timeout_s=60)
    assert isinstance(reply, P.Error), f"expected an error [{code}], got {reply}"
    assert reply.code == code, reply
    assert reply.message
    return reply


def test_bad_frames_and_bad_devices_leave_others_untouched(
    run_controller, target, target_info, default_models, lab_keys
):
    import models

    gemma = models.ensure(include=("gemma3-270m",)).drafts["gemma3-270m"]
    with run_controller() as controller:
        endpoint = controller.endpoint
        good = subprocess.Popen(
            AgentSpec("good", default_models.drafts["q8_0"], "A recipe for bread: first, mix",
                      48).command(endpoint, lab_keys),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        with ControllerLink(endpoint, curve=lab_keys.client("raw-device"), timeout_s=60) as link:
            link.send(P.Start("r0", [1, 2, 3], 8))
            expect_error(link, "not_registered")
            link.send_raw([b"\xc1\xc1 this is not msgpack"])
            expect_error(link, "malformed")
            # Above the largest frame, libzmq drops the connection unread (the link opens a
            # new one); above its type's limit, the controller refuses it unwalked.
            link.send_raw([P.encode(P.Ping(0.0, b"x" * (2 * P.MAX_FRAME_BYTES)))])
            with pytest.raises(LinkLost):  # the connection closes, or no answer at all
                link.receive(timeout_s=3)
            capabilities = {f"k{i}": "v" * 200 for i in range(40)}
            link.send(P.Hello("raw-device", "handmade", target_info.fingerprint,
                              target_info.vocab_size, capabilities))
            expect_error(link, "oversized")
            link.send_raw([msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "teleport"})])
            expect_error(link, "unknown_type")
            link.send_raw([P.encode(P.Bye()), P.encode(P.Bye())])
            expect_error(link, "malformed")

            vocab = target_info.vocab_size
            link.send(P.Hello("raw-device", "handmade", target_info.fingerprint, vocab))
            assert isinstance(link.receive(), P.Welcome)
            link.send(P.Welcome("me", "x", 1, 1))
            expect_error(link, "unexpected")
            link.send(P.Start("r1", [1, vocab + 5], 8))
            expect_error(link, "invalid")
            link.send(P.Start("r1", [1, 2, 3], 10**6))
            expect_error(link, "invalid")
            prompt = [1, 504, 3458, 314]
            link.send(P.Start("r1", prompt, 8))
            assert isinstance(link.receive(), P.Control)
            link.send(P.Draft("r1", 5, len(prompt), [42]))
            expect_error(link, "stale")
            link.send(P.Draft("r1", 0, len(prompt) + 3, [42]))
            expect_error(link, "stale")
            link.send(P.Draft("r1", 0, len(prompt), [vocab]))
            expect_error(link, "invalid")
            link.send(P.Draft("r1", 0, len(prompt), [42], [[42]], [[1]]))  # q in a greedy request
            expect_error(link, "invalid")
            # After all that, its own session still works.
            link.send(P.Draft("r1", 0, len(prompt), [42, 43]))
            verdict = link.receive()
            assert isinstance(verdict, P.Verdict) and verdict.round == 0
            assert 1 <= len(verdict.tokens) <= 3

        wrong = subprocess.run(AgentSpec("gemma", gemma, "Hello", 4).command(endpoint, lab_keys),
                               capture_output=True, text=True, timeout=300)
        assert wrong.returncode == 1
        assert "tokenizer" in wrong.stderr and "vocabular" in wrong.stderr

        out, err = good.communicate(timeout=600)
        assert good.returncode == 0, err
    result = json.loads(out)
    assert len(result["tokens"]) == 48
    compare_to_reference(target, result, 48)


def test_unreachable_controller_is_a_clear_exit(default_models):
    proc = subprocess.run(
        [str(BIN / "device-agent"), "generate", "--controller", "tcp://127.0.0.1:9", "--insecure",
         "--draft", str(default_models.drafts["q4_0"]), "--prompt", "hi", "--timeout", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 3
    assert "no answer from the controller" in proc.stderr


def test_seeded_sampling_reproduces_whoever_shares_the_batch(
    run_controller, default_models, lab_keys
):
    drafts = default_models.drafts
    seeded = AgentSpec("seeded", drafts["q5_0"], "Once upon a time, in a small village,", 24,
                       ("--temperature", "0.9", "--top-p", "0.95", "--seed", "1234"))
    # The fixed policy: with live control a device's draft lengths (and so which random
    # numbers decide its tokens) depend on its batch-mates' estimates (docs/verifier.md).
    with run_controller(control__policy="fixed") as controller:
        alone = run_agents(controller.endpoint, [seeded], lab_keys)[0][0]
        crowd = run_agents(controller.endpoint, [
            seeded,
            AgentSpec("other-sampler", drafts["q4_0"], "The history of Rome", 24,
                      ("--temperature", "1.0", "--seed", "9")),
            AgentSpec("greedy", drafts["q8_0"], "import numpy as np\n", 24),
        ], lab_keys)
        assert controller.largest_batch >= 2
    assert crowd[0][0]["tokens"] == alone["tokens"]
    assert crowd[0][0]["stats"]["drafted"] > 0
