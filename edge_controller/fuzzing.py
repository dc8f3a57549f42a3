"""Hostile frames for the controller, as Hypothesis strategies (scripts/fuzz_controller.py,
tests/test_fuzz.py), and what a correct controller must answer to each.

Frames come in five kinds, drawn with these weights: messages of every type with fields
that are each valid, wrong-typed, out of range or missing (``messages``); valid device
messages in the wrong order or for another request and round (``misplaced``); truncated
encodings of valid messages; raw bytes; msgpack values that are not messages.

:func:`expected_reply`: every frame gets at least one reply, except those the protocol
answers with silence (docs/limits.md): a bye, a telemetry report, a draft that waits for
its round (its verdict comes with the round).
"""

from __future__ import annotations

import dataclasses
import random
import time

import msgpack
from hypothesis import strategies as st

from edge_controller import protocol as P

SILENT_ON_SUCCESS = (P.Bye, P.Telemetry, P.Draft)

_ints = st.one_of(
    st.integers(min_value=-3, max_value=70),
    st.integers(min_value=0, max_value=60_000),
    st.sampled_from([-(2**63), 2**31, 2**32, 2**63 - 1, 2**64 - 1]),
)
_floats = st.one_of(
    st.floats(min_value=-1.0, max_value=200.0),
    st.sampled_from([0.0, 1e-300, 1e300, float("nan"), float("inf"), -0.0]),
)
_text = st.one_of(st.text(max_size=40), st.sampled_from(["", "dev", "r", "\n\x00", "é" * 70]))
_any = st.one_of(_ints, _floats, _text, st.booleans(), st.none(), st.binary(max_size=16))
_FIELD = {
    "str": _text,
    "int": _ints,
    "float": _floats,
    "bool": st.booleans(),
    "bytes": st.binary(max_size=64),
    "list[int]": st.lists(_ints, max_size=40),
    "list[list[int]]": st.lists(st.lists(_ints, max_size=6), max_size=6),
    "dict[str, Any]": st.dictionaries(_text, _any, max_size=5),
}


@st.composite
def messages(draw) -> dict:
    """A message of any type, each field valid-typed, wrong-typed or absent."""
    cls = draw(st.sampled_from(list(P.MESSAGE_TYPES.values())))
    body = {"v": draw(st.one_of(st.just(P.PROTOCOL_VERSION), st.just(P.PROTOCOL_VERSION - 1),
                                _any)),
            "type": draw(st.one_of(st.just(cls.TYPE), _text))}
    for field in dataclasses.fields(cls):
        choice = draw(st.integers(0, 9))
        if choice < 7:
            body[field.name] = draw(_FIELD[str(field.type)])
        elif choice < 9:
            body[field.name] = draw(_any)
    if draw(st.integers(0, 19)) == 0:
        body[draw(_text)] = draw(_any)
    return body


@st.composite
def misplaced(draw, request_id: str, position: int, vocab_size: int) -> P.Message:
    """Valid device messages for this device's own request or another, at any round."""
    token = st.integers(0, vocab_size - 1)
    rid = draw(st.sampled_from([request_id, "other", ""]))
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return P.Start(rid, draw(st.lists(token, min_size=1, max_size=20)),
                       draw(st.integers(1, 40)), draw(st.sampled_from([0.0, 0.7])),
                       top_k=draw(st.integers(0, vocab_size + 5)))
    if kind == 1:
        return P.Draft(rid, draw(st.integers(0, 40)), draw(st.integers(0, position + 40)),
                       draw(st.lists(token, max_size=8)))
    if kind == 2:
        return P.Telemetry(draw(st.floats(0, 1)), draw(st.floats(0, 1)),
                           spectral_efficiency=draw(st.floats(0.1, 30)))
    if kind == 3:
        return P.Ping(draw(st.floats(0, 1e6)), draw(st.binary(max_size=64)))
    if kind == 4:
        return P.Welcome("x", "t", 4, 4)  # a controller's message, sent by a device
    return P.Verdict(rid, 0, 0, [1], False, 4)


def frames(request_id: str = "fuzz", position: int = 0, vocab_size: int = 49152):
    """Every kind of frame, as bytes."""
    encoded_valid = misplaced(request_id, position, vocab_size).map(P.encode)
    return st.one_of(
        messages().map(lambda body: msgpack.packb(body, use_bin_type=True)),
        encoded_valid,
        encoded_valid.flatmap(lambda frame: st.integers(0, len(frame) - 1).map(
            lambda cut: frame[:cut])),
        st.binary(max_size=120),
        _any.map(lambda value: msgpack.packb(value, use_bin_type=True)),
    )


def expected_reply(frame: bytes) -> bool:
    """Must the controller answer this frame (before it answers a ping sent after it)?"""
    try:
        msg, _ = P.decode_versioned(frame)
    except P.ProtocolError:
        return True  # an error reply
    return not isinstance(msg, SILENT_ON_SUCCESS)


def answers_before_pong(link, barrier: float, timeout_s: float = 15.0) -> list | None:
    """Send a ping on ``link`` (a device_agent ControllerLink) and collect what arrives
    before its pong: the answers to what was sent before it. None if the pong never comes.
    An answer our own decoder refuses is still an answer (listed as None)."""
    from device_agent.link import LinkTimeout

    link.send(P.Ping(barrier))
    answers: list = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = link.receive(timeout_s=left)
        except LinkTimeout:
            return None
        except P.ProtocolError:
            answers.append(None)
            continue
        if isinstance(msg, P.Pong) and msg.sent_at == barrier:
            return answers
        answers.append(msg)
    return None


def corpus(seed: int, count: int, **kwargs) -> list[bytes]:
    """``count`` frames drawn by Hypothesis from :func:`frames`, reproducibly by ``seed``."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings

    out: list[bytes] = []

    @hypothesis.seed(seed)
    @settings(max_examples=count, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(frames(**kwargs))
    def collect(frame: bytes) -> None:
        out.append(frame)

    collect()
    return out


def mutate(frame: bytes, other: bytes, rng: random.Random) -> bytes:
    """A cheap variation of a drawn frame (the bulk of a long fuzz run): a flipped byte, a
    cut, a repeated slice, or a splice with another frame."""
    if not frame:
        return other
    i = rng.randrange(len(frame))
    match rng.randrange(4):
        case 0:
            return frame[:i] + bytes([rng.randrange(256)]) + frame[i + 1 :]
        case 1:
            return frame[:i]
        case 2:
            j = rng.randrange(i, len(frame) + 1)
            return frame[:j] + frame[i:j] + frame[j:]
        case _:
            return frame[:i] + other[rng.randrange(len(other) + 1):]
