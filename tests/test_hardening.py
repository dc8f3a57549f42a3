"""What an outside attack found, each fixed (docs/limits.md): one test per finding, with
real sockets where the finding was about the running controller."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
from contextlib import contextmanager, suppress

import msgpack
import pytest

from device_agent.agent import ControllerBrokeProtocol, check_verdict
from device_agent.link import ControllerLink
from edge_controller import protocol as P
from edge_controller.launch import AgentSpec
from edge_controller.logs import PER_WINDOW, PeerLog
from edge_controller.scheduler import SyncScheduler
from edge_controller.sessions import Session
from edge_controller.transport import RateLimit, Transport
from tests.conftest import BIN
from tests.test_e2e_greedy import compare_to_reference


def hello(link: ControllerLink, target_info, device_id: str = "") -> None:
    link.send(P.Hello(device_id, "handmade", target_info.fingerprint, target_info.vocab_size))
    assert isinstance(link.receive(timeout_s=30), P.Welcome)


def until(kind: type[P.Message], link: ControllerLink, timeout_s: float = 60) -> P.Message:
    """The next message of ``kind`` (control updates and pongs in between are skipped)."""
    while not isinstance(msg := link.receive(timeout_s=timeout_s), kind):
        assert isinstance(msg, P.Control | P.Pong), msg
    return msg


@contextmanager
def two_devices(run_controller, lab_keys, target_info, names: tuple[str, str], **overrides):
    """A controller (fixed policy, ``overrides``) and two registered raw device links."""
    with run_controller(control__policy="fixed", **overrides) as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client(names[0])) as first, \
            ControllerLink(controller.endpoint, curve=lab_keys.client(names[1])) as second:
        hello(first, target_info)
        hello(second, target_info)
        yield controller, first, second


def long_prompt(target, tokens: int) -> list[int]:
    _, tokenizer = target
    return tokenizer("A long report on the history of rivers. " * (tokens // 6))["input_ids"][
        :tokens]


# ---- 1. one long prompt stalled everyone --------------------------------------------------
@pytest.mark.slow
def test_other_devices_keep_their_rounds_while_a_long_prompt_is_prefilled(
    run_controller, target, target_info, lab_keys
):
    prompt_1500 = long_prompt(target, 1500)
    with two_devices(run_controller, lab_keys, target_info, ("busy", "long"),
                     limits__prefill_chunk=64) as (_, busy, newcomer):
        prompt = [1, 504, 3458, 314]
        busy.send(P.Start("b", prompt, 400))
        until(P.Control, busy)
        newcomer.send(P.Start("n", prompt_1500, 4))
        until(P.Control, newcomer)  # answered at once: the prompt is prefilled later
        newcomer.send(P.Draft("n", 0, len(prompt_1500), [prompt_1500[-1]]))
        position, rounds = len(prompt), 0
        while True:
            busy.send(P.Draft("b", rounds, position, [42, 43]))
            position += len(until(P.Verdict, busy).tokens)
            rounds += 1
            if newcomer._socket.poll(0):
                break
        assert isinstance(until(P.Verdict, newcomer), P.Verdict)
    # 1,500 tokens in chunks of 64 ride along 23 rounds; before, the loop prefilled the
    # whole prompt in the start handler and the other device waited it out.
    assert rounds >= 10, f"only {rounds} rounds of the other device during the prefill"


@pytest.mark.slow
def test_a_stream_of_short_prompts_cannot_starve_a_long_one(run_controller, target,
                                                            target_info, lab_keys):
    """Shortest prefill first, but not forever: new requests cost a device nothing, so one
    that restarts tiny requests all the time must not keep a long prompt waiting."""
    with two_devices(run_controller, lab_keys, target_info, ("pest", "victim"),
                     limits__prefill_chunk=64) as (controller, pest, victim):
        prompt = long_prompt(target, 700)
        victim.send(P.Start("v", prompt, 4))
        until(P.Control, victim)
        # Drafting at once, as an agent does: a request with no draft for idle_s is ended,
        # prefilling or not, and on a slow host this prefill alone can take that long.
        victim.send(P.Draft("v", 0, len(prompt), [28]))
        session = controller.sessions.named("victim")
        deadline = time.monotonic() + 20.0
        k = 0
        while session.prefill_left > 0 and time.monotonic() < deadline:
            # A new request each time the last one is answered: never more than one frame
            # queued (a flood past the transport's receive queue is the attack tests').
            pest.send(P.Resume(f"x{k}", [1, 2 + k % 1000], [], 0, 4))
            until(P.Control, pest)
            k += 1
            time.sleep(0.01)
        assert session.prefill_left == 0, f"{session.prefill_left} tokens left after {k} restarts"


@pytest.mark.slow
def test_a_rolled_back_draft_leaves_no_round_open(run_controller, target_info, lab_keys):
    """A member drafts, then resumes to before that draft: the round it opened holds no
    draft any more, so it closes (an open round would stop prefills and spin the loop)."""
    with two_devices(run_controller, lab_keys, target_info, ("fickle", "slow"),
                     server__round_deadline_s=30.0) as (controller, fickle, slow):
        prompt = [1, 504, 3458, 314]
        for link, rid in ((fickle, "f"), (slow, "s")):
            link.send(P.Start(rid, prompt, 8))
            until(P.Control, link)
        time.sleep(0.5)  # both prefilled: both are members, and the round waits for "slow"
        fickle.send(P.Draft("f", 0, len(prompt), [28, 253]))
        fickle.send(P.Resume("f", prompt, [], 0, 8))
        until(P.Control, fickle)
        fickle.send(P.Ping(1.0))
        until(P.Pong, fickle)
        assert controller.scheduler.opened_at is None


@pytest.mark.slow
def test_a_resume_cannot_move_output_into_the_prompt(run_controller, target_info, lab_keys):
    """Rolled back in place only as the same request: a resume that calls committed output
    prompt is a new request, checked against the context limit like any start."""
    with run_controller(control__policy="fixed", limits__max_len=64,
                        limits__max_new_tokens=43) as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("greedy")) as link:
        hello(link, target_info)
        prompt = [1, 504, 3458, 314]
        link.send(P.Start("r", prompt, 43))  # 4 + 43 + 16 + 1 = 64 positions: just fits
        until(P.Control, link)
        link.send(P.Draft("r", 0, len(prompt), [28, 253, 4159]))
        committed = until(P.Verdict, link).tokens
        link.send(P.Resume("r", prompt + committed, [], 1, 43))
        refused = until(P.Error, link)
        assert refused.code == "too_long" and refused.request_id == "r"
        assert controller.verifier.slots_in_use == 0


# ---- 2. idle and abandoned requests ---------------------------------------------------------
def _member(name: str, pending: bool) -> Session:
    session = Session(name.encode(), None, name, "d", 0.0)
    session.request = P.Start("r", [1], 4)
    session.pending = P.Draft("r", 0, 1, []) if pending else None
    return session


def test_rounds_stop_waiting_for_a_device_that_missed_the_last_one():
    scheduler = SyncScheduler(deadline_s=0.25)
    fast, slow = _member("fast", True), _member("slow", False)
    scheduler.on_draft(fast, now=0.0)
    assert not scheduler.due([fast, slow], now=0.1)  # waits for slow, the first time
    assert scheduler.due([fast, slow], now=0.25)
    assert scheduler.close([fast, slow]) == [fast] and slow.missed_rounds == 1
    scheduler.on_draft(fast, now=1.0)
    assert scheduler.due([fast, slow], now=1.0)  # slow missed the last one: not waited for
    scheduler.close([fast, slow])
    slow.pending = P.Draft("r", 0, 1, [])
    scheduler.on_draft(slow, now=2.0)  # it drafts again: waited for from now on
    fast.pending = None
    assert slow.missed_rounds == 0 and not scheduler.due([fast, slow], now=2.0)


@pytest.mark.slow
def test_a_request_that_never_drafts_is_ended_and_pings_do_not_keep_it(
    run_controller, target_info, lab_keys
):
    with run_controller(control__policy="fixed", limits__idle_rounds=2,
                        limits__idle_s=1.0) as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("ghost")) as ghost:
        hello(ghost, target_info)
        ghost.send(P.Start("r", [1, 2, 3], 8))
        until(P.Control, ghost)
        started = time.monotonic()
        while time.monotonic() - started < 10:  # before the fix, pings kept it forever
            ghost.send(P.Ping(0.0))  # valid traffic, but not the request's
            msg = ghost.receive(timeout_s=10)
            if isinstance(msg, P.Error):
                break
            time.sleep(0.2)
        assert isinstance(msg, P.Error) and msg.code == "idle" and not msg.fatal
        assert 1.0 <= time.monotonic() - started < 5.0
        assert controller.verifier.slots_in_use == 0
        ghost.send(P.Start("r2", [1, 2, 3], 8))  # still registered: it may start again
        assert isinstance(until(P.Control, ghost), P.Control)


# ---- 3. memory: strings, frames, queues -----------------------------------------------------
@pytest.mark.parametrize("field, size", [("device_id", 65), ("draft_model", 257),
                                         ("tokenizer_fingerprint", 257)])
def test_every_string_is_capped(field, size):
    fields = {"device_id": "", "draft_model": "d", "tokenizer_fingerprint": "f",
              "vocab_size": 10, field: "x" * size}
    with pytest.raises(P.ProtocolError) as info:
        P.decode(P.encode(P.Hello(**fields)))
    assert info.value.code in ("invalid", "malformed")


def test_big_hellos_are_refused_before_their_fields_are_read():
    """The attack: 100 hellos carrying a huge device name (+174 MB of memory, +209 MB of
    log). A hello bigger than any legal one is refused by its size; a string longer than
    any field's is refused by the unpacker; a name longer than its field's cap, by it."""
    for frame, code in [(P.encode(P.Hello("x" * 2**19, "d", "f", 10)), "oversized"),
                        (P.encode(P.Hello("x" * 3000, "d", "f", 10)), "malformed"),
                        (P.encode(P.Hello("x" * 65, "d", "f", 10)), "invalid")]:
        with pytest.raises(P.ProtocolError) as info:
            P.decode(frame)
        assert info.value.code == code


def test_containers_a_type_has_no_room_for_are_refused_unbuilt():
    """A million tiny containers cost ~0.2 s to build and walk (the review put a million
    empty lists in a ping): now each type's limits on lists and maps are enforced by the
    unpacker, and ``v`` and ``type`` come first, so nothing is built before they are known."""
    V = P.PROTOCOL_VERSION
    for body in ({"v": V, "type": "ping", "sent_at": 0.0, "payload": [[]] * 32_000},
                 {"v": V, "type": "telemetry", "host": {f"k{i}": {} for i in range(33)}},
                 {"v": V, "type": "draft", "request_id": "r", "round": 0, "position": 0,
                  "tokens": [[]] * (P.MAX_TOP_K + 1)},
                 {"payload": [[]] * 30_000, "v": V, "type": "ping", "sent_at": 0.0}):
        with pytest.raises(P.ProtocolError) as info:
            P.decode(msgpack.packb(body))
        assert info.value.code == "malformed"


def test_device_text_is_never_echoed_in_errors():
    secret = "ECHO-" + "A" * 500
    frames = [
        msgpack.packb({"v": P.PROTOCOL_VERSION, "type": secret}),
        msgpack.packb({"v": secret, "type": "ping", "sent_at": 0.0}),
        msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "ping", "sent_at": 0.0, secret: 1}),
    ]
    for frame in frames:
        with pytest.raises(P.ProtocolError) as info:
            P.decode(frame)
        assert "ECHO" not in str(info.value)


# ---- 4. expensive rejection -------------------------------------------------------------------
def test_a_huge_list_is_refused_without_walking_it():
    huge = msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "start", "request_id": "r",
                          "prompt_ids": [1] * (P.MAX_PROMPT_TOKENS + 1), "max_new_tokens": 4})
    with pytest.raises(P.ProtocolError) as info:
        P.decode(huge)
    assert info.value.code in ("malformed", "oversized")
    mixed_keys = msgpack.packb({"v": P.PROTOCOL_VERSION, "type": "ping", "sent_at": 0.0,
                                "a": 1, b"b": 2}, use_bin_type=True)
    with pytest.raises(P.ProtocolError) as info:  # used to raise TypeError inside sorted()
        P.decode(mixed_keys)
    assert info.value.code == "malformed"


def test_frames_over_a_devices_rate_are_dropped():
    limit = RateLimit(frames_per_s=10, frame_burst=5, bytes_per_s=1e6, byte_burst=2**20)
    admitted = [limit.admit(b"dev", 100, now=0.0) for _ in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    assert limit.admit(b"other", 100, now=0.0)  # per device
    assert limit.admit(b"dev", 100, now=0.1)  # 0.1 s at 10/s earns one frame
    assert not limit.admit(b"dev", 2**20 + 1, now=100.0)  # bytes: bigger than the burst


@pytest.mark.slow
def test_a_ping_flood_is_cut_to_its_rate_and_others_are_served(run_controller, target_info,
                                                                lab_keys):
    with run_controller(control__policy="fixed", limits__messages_per_s=50,
                        limits__message_burst=50) as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("flood")) as flood, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("calm")) as calm:
        hello(calm, target_info)
        for i in range(1000):
            flood.send(P.Ping(float(i)))
        calm.send(P.Ping(-1.0))
        assert until(P.Pong, calm, timeout_s=10).sent_at == -1.0
        pongs = 0
        while flood._socket.poll(1000):
            flood._socket.recv()
            pongs += 1
    assert 50 <= pongs < 200, pongs


# ---- 5. unbounded sampling parameters and radio claims --------------------------------------
def test_sampling_parameters_and_radio_claims_are_bounded():
    with pytest.raises(P.ProtocolError):
        P.decode(P.encode(P.Start("r", [1], 4, 0.8, 1.0, 2**64 - 1)))
    for claim in (1e-300, 1e-9, 0.05, 31.0):
        with pytest.raises(P.ProtocolError, match="spectral_efficiency"):
            P.decode(P.encode(P.Telemetry(spectral_efficiency=claim)))
    assert P.decode(P.encode(P.Telemetry(spectral_efficiency=0.5))).spectral_efficiency == 0.5


@pytest.mark.slow
def test_top_k_beyond_the_vocabulary_is_refused_at_start(run_controller, target_info, lab_keys):
    with run_controller() as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("k")) as link:
        hello(link, target_info)
        link.send(P.Start("r", [1, 2, 3], 4, 0.8, 1.0, target_info.vocab_size + 1))
        refused = link.receive(timeout_s=30)
        assert isinstance(refused, P.Error) and refused.code == "invalid"
        assert "top_k" in refused.message


# ---- 6. logs ----------------------------------------------------------------------------------
def test_a_name_or_request_id_with_a_newline_cannot_forge_log_lines():
    with pytest.raises(P.ProtocolError, match="device_id"):
        P.decode(P.encode(P.Hello("good\n2026-12-01 INFO forged", "d", "f", 10)))
    for msg in (P.Start("r\nINFO forged", [1], 4), P.Draft("r\n", 0, 1, []), P.Cancel("\n")):
        with pytest.raises(P.ProtocolError, match="request_id"):
            P.decode(P.encode(msg))


def test_warnings_per_device_are_rate_limited(caplog):
    warnings = PeerLog(logging.getLogger("test.peers"))
    with caplog.at_level(logging.WARNING, logger="test.peers"):
        for _ in range(100):
            warnings("noisy", "bad frame %d", 1)
        warnings("quiet", "bad frame %d", 2)
    noisy = [r for r in caplog.records if r.getMessage().startswith("noisy")]
    assert len(noisy) == PER_WINDOW
    assert any(r.getMessage().startswith("quiet") for r in caplog.records)


# ---- 8. the agent trusted its controller blindly ---------------------------------------------
def test_verdicts_are_checked():
    draft, welcome = [5, 6, 7], P.Welcome("dev", "t", 64, 8, [2])

    def check(verdict: P.Verdict, room: int = 10, drafted: list[int] = draft) -> None:
        check_verdict(verdict, "r", 3, drafted, welcome, vocab_size=100, room=room)

    check(P.Verdict("r", 3, 2, [5, 6, 9], False, 4))
    check(P.Verdict("r", 3, 2, [5], True, 4), room=1)  # cut by the request's end
    check(P.Verdict("r", 3, 3, [5, 2], True, 4), drafted=[5, 2, 7])  # cut at end of sequence
    check(P.Verdict("r", 3, 0, [2], True, 4))  # an end of sequence as the correction
    for bad, room in [(P.Verdict("other", 3, 2, [5, 6, 9], False, 4), 10),  # request
                      (P.Verdict("r", 4, 2, [5, 6, 9], False, 4), 10),  # round
                      (P.Verdict("r", 3, 4, [5, 6, 7, 8, 9], False, 4), 10),  # accepted
                      (P.Verdict("r", 3, 2, [5, 7, 9], False, 4), 10),  # not the draft's
                      (P.Verdict("r", 3, 2, [5, 6, 100], False, 4), 10),  # vocabulary
                      (P.Verdict("r", 3, 0, [], False, 4), 10),  # no token
                      (P.Verdict("r", 3, 2, [5, 6, 9], False, 4), 2),  # beyond the room
                      (P.Verdict("r", 3, 3, [5, 6], False, 4), 10),  # too few, no end
                      (P.Verdict("r", 3, 2, [5, 6, 9], False, 4), 3),  # all given, not done
                      (P.Verdict("r", 3, 2, [5, 6, 9], False, 9), 10)]:  # draft length
        with pytest.raises(ControllerBrokeProtocol):
            check(bad, room)


def _broken_controller(reply_to_draft, ready: threading.Event, box: list) -> None:
    """A controller that answers hello and start correctly, then breaks the protocol."""
    transport = Transport("tcp://127.0.0.1:*", None, insecure=True)
    box.append(transport.open())
    ready.set()
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if not transport.poll(0.1):
                continue
            while (message := transport.receive()) is not None:
                peer, body = message
                msg = P.decode(body[0])
                if isinstance(msg, P.Hello):
                    transport.send(peer.route, P.encode(P.Welcome(msg.device_id, "t", 64, 4)))
                elif isinstance(msg, P.Ping):
                    transport.send(peer.route, P.encode(P.Pong(msg.sent_at, 0, time.monotonic())))
                elif isinstance(msg, P.Start):
                    transport.send(peer.route, P.encode(P.Control(4, 1.0, 0.0)))
                elif isinstance(msg, P.Draft):
                    transport.send(peer.route, reply_to_draft(msg))
                elif isinstance(msg, P.Bye):
                    return
    finally:
        transport.close()


@pytest.mark.slow
@pytest.mark.parametrize("reply, said", [
    (lambda d: P.encode(P.Verdict("wrong-request", d.round, 0, [1], False, 4)),
     "another request"),
    (lambda d: P.encode(P.Verdict(d.request_id, d.round, 0, [10**9], False, 4)),
     "outside the vocabulary"),
    (lambda d: b"\xc1 garbage", "must be a msgpack map"),
], ids=["another-request", "out-of-vocabulary", "garbage"])
def test_an_agent_told_nonsense_exits_4_with_a_clear_message(default_models, reply, said):
    ready, box = threading.Event(), []
    fake = threading.Thread(target=_broken_controller, args=(reply, ready, box), daemon=True)
    fake.start()
    assert ready.wait(10)
    proc = subprocess.run(
        [str(BIN / "device-agent"), "generate", "--controller", box[0], "--insecure",
         "--device-id", "victim", "--draft", str(default_models.drafts["q4_0"]),
         "--prompt", "Hello", "--timeout", "30"],
        capture_output=True, text=True, timeout=300)
    fake.join(10)
    assert proc.returncode == 4, proc.stderr
    assert "the controller broke the protocol" in proc.stderr and said in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- 9. start-up errors: one clear line -----------------------------------------------------
@pytest.mark.slow
def test_start_up_failures_are_one_clear_line(tmp_path, default_models):
    def start(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "edge-controller"), "start", "--insecure", *args],
                              capture_output=True, text=True, timeout=300)

    missing = start("--target-gguf", str(tmp_path / "nope.gguf"))
    assert missing.returncode == 1 and "nope.gguf does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = start("--bind", f"tcp://127.0.0.1:{port}", "--policy", "fixed")
    assert busy.returncode == 1 and "cannot bind" in busy.stderr
    assert "Traceback" not in busy.stderr
    config = tmp_path / "big.toml"
    config.write_text("[limits]\nmax_sessions = 4096\nmax_len = 1000000\nmax_new_tokens = 10\n")
    huge = start("--config", str(config), "--policy", "fixed")
    assert huge.returncode == 1 and "does not fit" in huge.stderr


# ---- 10. an unguarded round ------------------------------------------------------------------
@pytest.mark.slow
def test_a_failure_answering_one_device_ends_its_request_only(
    run_controller, target_info, lab_keys, monkeypatch
):
    """What used to stop the controller: an exception while answering one device in a
    round. Injected here for the device "doomed"; "fine", in the same round, goes on."""
    from edge_controller.controller import EdgeController

    answer = EdgeController._answer

    def failing(self, session, outcome):
        if session.device_id == "doomed":
            raise RuntimeError("injected")
        return answer(self, session, outcome)

    monkeypatch.setattr(EdgeController, "_answer", failing)
    with run_controller(control__policy="fixed") as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("doomed")) as doomed, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("fine")) as fine:
        for link in (doomed, fine):
            hello(link, target_info)
            link.send(P.Start("r", [1, 2, 3], 8))
            until(P.Control, link)
        doomed.send(P.Draft("r", 0, 3, [42]))
        fine.send(P.Draft("r", 0, 3, [42]))
        error = until(P.Error, doomed)
        assert error.code == "internal" and "injected" not in error.message
        assert isinstance(until(P.Verdict, fine), P.Verdict)
        fine.send(P.Ping(3.0))
        assert until(P.Pong, fine).sent_at == 3.0  # the loop goes on
        assert controller.verifier.slots_in_use == 1



@pytest.mark.slow
def test_a_full_disk_under_the_timeline_stops_the_timeline_not_the_controller(
    run_controller, target, default_models, lab_keys
):
    from edge_controller.launch import run_agents

    spec = AgentSpec("writer", default_models.drafts["q8_0"], "The sea at night is", 24)
    with run_controller(control__policy="fixed", server__timeline="/dev/full") as controller:
        result = run_agents(controller.endpoint, [spec], lab_keys)[0][0]
        assert controller.rounds_run > 0
    compare_to_reference(target, result, 24)
    assert json.dumps(result)  # the agent finished with its whole result


@pytest.mark.slow
def test_a_flood_of_idle_connections_does_not_kill_the_controller(tmp_path, lab_keys,
                                                                  target_info):
    """Anyone can open TCP connections without a key; each holds a file descriptor until
    its handshake times out (5 s). With its open-file limit at 256, 400 idle connections
    leave the controller serving, and once they are closed a listed device is served."""
    import functools
    import resource

    from edge_controller.launch import free_endpoint, start_controller, stop_controller
    from edge_controller.transport import HANDSHAKE_TIMEOUT_S

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    endpoint = free_endpoint()
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    log = tmp_path / "controller.log"
    controller = start_controller(log, lab_keys, endpoint, "--policy", "fixed",
                                  spawn=functools.partial(subprocess.Popen,
                                                          preexec_fn=low_limit))
    flood = []
    try:
        for _ in range(400):  # past the backlog, connects hang: the flood still holds them
            sock = socket.socket()
            sock.settimeout(0.2)
            with suppress(OSError):
                sock.connect((host, int(port)))
            flood.append(sock)
        time.sleep(2.0)  # several allowlist checks with no descriptor left
        assert controller.poll() is None, log.read_text()[-2000:]
        # Idle connections are closed at the handshake timeout: after the controller's
        # greeting, each reads EOF.
        time.sleep(HANDSHAKE_TIMEOUT_S + 1.0)
        assert sum(closed_by_peer(sock) for sock in flood) > 0
        for sock in flood:
            sock.close()
        flood.clear()
        time.sleep(0.5)
        with ControllerLink(endpoint, curve=lab_keys.client("after"), timeout_s=20) as link:
            link.send(P.Hello("", "d", target_info.fingerprint, target_info.vocab_size))
            assert isinstance(link.receive(), P.Welcome)
        assert controller.poll() is None
    finally:
        for sock in flood:
            sock.close()
        stop_controller(controller)


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (what it sent before is read and dropped)."""
    sock.settimeout(0.01)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except OSError:  # timed out: still open; or never connected
        return False
