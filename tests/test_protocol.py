"""The wire protocol: every message round-trips; every bad frame gets a clear error."""

import msgpack
import pytest

from edge_controller import protocol as P

EXAMPLES = [
    P.Hello("dev-1", "q4_0", "ab" * 32, 49152, {"sampling": True}),
    P.Welcome("dev-1", "smollm2", 1024, 16, [2]),
    P.Start("r1", [1, 2, 3], 48, 0.8, 0.95, 0, 7, 16),
    P.Control(4, 0.25, 1e6),
    P.Draft("r1", 0, 3, [5, 6], [[5, 9], [6]], [[40000, 25536], [65536]], 0.01),
    P.Verdict("r1", 0, 1, [5, 7], False, 4),
    P.Ping(12.5, b"\0" * 10),
    P.Pong(12.5, 10, 99.0),
    P.Telemetry(0.012, 0.004, 8e6, 2.5, {"cpu_percent": 12.0}),
    P.Error("capacity", "no free slot", fatal=False, request_id="r1"),
    P.Bye(),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    assert P.decode(P.encode(msg)) == msg


def _frame(**body):
    return msgpack.packb({"v": P.PROTOCOL_VERSION, **body}, use_bin_type=True)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xc1\xff not msgpack", "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (msgpack.packb({"v": 99, "type": "bye"}), "version"),
        (_frame(type="teleport"), "unknown_type"),
        (_frame(type="hello", device_id="d"), "malformed"),  # missing fields
        (_frame(type="bye", extra=1), "malformed"),
        (_frame(type="control", draft_len="four", bandwidth_share=1.0), "malformed"),
        (_frame(type="control", draft_len=True, bandwidth_share=1.0), "malformed"),
        (_frame(type="control", draft_len=4, bandwidth_share=float("nan")), "malformed"),
        (_frame(type="start", request_id="r", prompt_ids=[], max_new_tokens=4), "invalid"),
        (_frame(type="start", request_id="r", prompt_ids=[1], max_new_tokens=0), "invalid"),
        (_frame(type="start", request_id="r", prompt_ids=[1], max_new_tokens=4,
                top_p=0.0), "invalid"),
        (_frame(type="draft", request_id="r", round=0, position=1, tokens=[1] * 65), "invalid"),
        (_frame(type="draft", request_id="r", round=0, position=1, tokens=[1, 2],
                q_ids=[[1]], q_counts=[[1]]), "invalid"),  # q for one of two tokens
        (_frame(type="draft", request_id="r", round=0, position=1, tokens=[3],
                q_ids=[[1, 2]], q_counts=[[1, 1]]), "invalid"),  # token outside its q
        (_frame(type="draft", request_id="r", round=0, position=1, tokens=[1],
                q_ids=[[1, 1]], q_counts=[[1, 1]]), "invalid"),  # repeated ids
        (_frame(type="draft", request_id="r", round=0, position=1, tokens=[1],
                q_ids=[[1]], q_counts=[[0]]), "invalid"),  # zero count
        (_frame(type="draft", request_id="r", round=0, position=1, tokens=[1],
                draft_s=-1.0), "invalid"),
        (_frame(type="start", request_id="r", prompt_ids=[1], max_new_tokens=4,
                seed=2**63), "invalid"),  # would overflow the verifier's int64 keys
        (_frame(type="start", request_id="r", prompt_ids=[1], max_new_tokens=4,
                temperature=1e-45), "invalid"),  # softmax would be NaN
        (_frame(type="telemetry", spectral_efficiency=1e308), "invalid"),
        (_frame(type="telemetry", rtt_s=-0.5), "invalid"),
        (_frame(type="control", draft_len=4, bandwidth_share=1.5), "invalid"),
        (_frame(type="hello", device_id="d", draft_model="m", tokenizer_fingerprint="f",
                vocab_size=0), "invalid"),
    ],
)
def test_bad_frames_are_refused_with_a_code(frame, code):
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frame)
    assert info.value.code == code
    assert str(info.value)  # a message a person can read


def test_oversized_frame_is_refused_before_parsing():
    frame = P.encode(P.Ping(0.0, b"x" * P.MAX_FRAME_BYTES))
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frame)
    assert info.value.code == "oversized"


def test_protocol_module_imports_only_msgpack():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(P.__file__).read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    third_party = imported - {"__future__", "dataclasses", "math", "re", "typing"}
    assert third_party == {"msgpack"}


def test_server_decode_travels_in_protocol_5_and_later():
    """A version 4 device never asks for it (the field is refused in its frames), and is
    served as before; a version 5 start or resume carries it."""
    start = P.Start("r", [1, 2], 4, server_decode=True)
    assert P.decode(P.encode(start)).server_decode is True
    resume = P.Resume("r", [1, 2], [3], 1, 4, server_decode=True)
    assert P.decode(P.encode(resume)).as_start().server_decode is True
    body = {"type": "start", "request_id": "r", "prompt_ids": [1, 2], "max_new_tokens": 4}
    assert P.decode_versioned(msgpack.packb({"v": 4, **body}), (4,))[0].server_decode is False
    with pytest.raises(P.ProtocolError, match="unknown or repeated field"):
        P.decode_versioned(msgpack.packb({"v": 4, **body, "server_decode": True}), (4,))


def test_pre_drafts_travel_in_protocol_6_and_are_left_out_for_version_5():
    """A version 5 device is never told it may pre-draft (the field is left out of its
    welcome: it would refuse it) and cannot say it did; version 6 carries both."""
    welcome = P.Welcome("dev", "target", 64, 8, [2], predraft_len=9)
    assert P.decode(P.encode(welcome)).predraft_len == 9
    old, version = P.decode_versioned(P.encode(welcome, version=5), (5,))
    assert version == 5 and old.predraft_len == 0
    assert "predraft_len" not in msgpack.unpackb(P.encode(welcome, version=5))
    draft = P.Draft("r", 3, 10, [5, 6], predrafted=2)
    assert P.decode(P.encode(draft)).predrafted == 2
    body = msgpack.unpackb(P.encode(draft))
    with pytest.raises(P.ProtocolError, match="unknown or repeated field"):
        P.decode_versioned(msgpack.packb({**body, "v": 5}), (5,))
    for bad in (P.Draft("r", 3, 10, [5], predrafted=2), P.Draft("r", 0, 10, [5], predrafted=1),
                P.Draft("r", 3, 10, [5], predrafted=-1)):
        with pytest.raises(P.ProtocolError, match="predrafted"):
            P.decode(P.encode(bad))


def test_rounds_are_bounded():
    """A resume at round 2**64 - 1 made the controller's own round counter overflow."""
    with pytest.raises(P.ProtocolError, match="round in 0.."):
        P.decode(P.encode(P.Resume("r", [1, 2], [], 2**31, 8)))
    with pytest.raises(P.ProtocolError, match="round in 0.."):
        P.decode(P.encode(P.Draft("r", 2**31, 2, [5])))
    assert P.decode(P.encode(P.Draft("r", 2**31 - 1, 2, [5]))).round == 2**31 - 1
