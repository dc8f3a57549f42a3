"""Hostile frames for the controller, as Hypothesis strategies (scripts/fuzz_controller.py,
tests/test_fuzz.py), and what a correct controller must answer to each. A development
tool: Hypothesis (the ``dev`` extra) is imported when frames are first drawn.

Frames come in five kinds: messages of every type with fields that are each valid,
wrong-typed, out of range or missing; valid device messages in the wrong order or for
another request and round; truncated encodings of valid messages; raw bytes; msgpack
values that are not messages.

:func:`expected_answer`: what must answer a frame (an error for anything refused, a
welcome, control or pong where those are due), except where the protocol answers with
silence (docs/limits.md): a bye, a telemetry report, a cancel, a draft that waits for its
round (its verdict comes with the round).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import TYPE_CHECKING

import msgpack

from edge_controller import protocol as P

if TYPE_CHECKING:
    from device_agent.link import ControllerLink

SILENT_ON_SUCCESS = (P.Bye, P.Telemetry, P.Draft, P.Cancel)


@functools.cache
def _strategies():
    """The field strategies (built once, when first needed: Hypothesis is a dev tool)."""
    from hypothesis import strategies as st

    ints = st.one_of(
        st.integers(min_value=-3, max_value=70),
        st.integers(min_value=0, max_value=60_000),
        st.sampled_from([-(2**63), 2**31, 2**32, 2**63 - 1, 2**64 - 1]),
    )
    floats = st.one_of(
        st.floats(min_value=-1.0, max_value=200.0),
        st.sampled_from([0.0, 1e-300, 1e300, float("nan"), float("inf"), -0.0]),
    )
    text = st.one_of(st.text(max_size=40), st.sampled_from(["", "dev", "r", "\n\x00", "é" * 70]))
    anything = st.one_of(ints, floats, text, st.booleans(), st.none(), st.binary(max_size=16))
    field = {
        "str": text,
        "int": ints,
        "float": floats,
        "bool": st.booleans(),
        "bytes": st.binary(max_size=64),
        "list[int]": st.lists(ints, max_size=40),
        "list[list[int]]": st.lists(st.lists(ints, max_size=6), max_size=6),
        "dict[str, Any]": st.dictionaries(text, anything, max_size=5),
    }
    return st, anything, text, field


def _messages():
    """A message of any type (as a dict), each field valid-typed, wrong-typed or absent."""
    st, anything, text, field = _strategies()

    @st.composite
    def messages(draw) -> dict:
        cls = draw(st.sampled_from(list(P.MESSAGE_TYPES.values())))
        body = {"v": draw(st.one_of(st.just(P.PROTOCOL_VERSION),
                                    st.just(P.PROTOCOL_VERSION - 1), anything)),
                "type": draw(st.one_of(st.just(cls.TYPE), text))}
        for f in dataclasses.fields(cls):
            choice = draw(st.integers(0, 9))
            if choice < 7:
                body[f.name] = draw(field[str(f.type)])
            elif choice < 9:
                body[f.name] = draw(anything)
        if draw(st.integers(0, 19)) == 0:
            body[draw(text)] = draw(anything)
        return body

    return messages()


def _misplaced(request_id: str, position: int, vocab_size: int):
    """Valid device messages for this device's own request or another, at any round."""
    st, *_ = _strategies()
    token = st.integers(0, vocab_size - 1)

    @st.composite
    def misplaced(draw) -> P.Message:
        rid = draw(st.sampled_from([request_id, "other", ""]))
        kind = draw(st.integers(0, 6))
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
            prompt = draw(st.lists(token, min_size=1, max_size=10))
            return P.Resume(rid, prompt, draw(st.lists(token, max_size=5)),
                            draw(st.integers(0, 5)), 8)
        if kind == 5:
            return P.Cancel(rid)
        return P.Welcome("x", "t", 4, 4)  # a controller's message, sent by a device

    return misplaced()


def frames(request_id: str = "fuzz", position: int = 0, vocab_size: int = 49152):
    """Every kind of frame, as bytes."""
    st, anything, *_ = _strategies()
    encoded_valid = _misplaced(request_id, position, vocab_size).map(P.encode)
    return st.one_of(
        _messages().map(lambda body: msgpack.packb(body, use_bin_type=True)),
        encoded_valid,
        encoded_valid.flatmap(lambda frame: st.integers(0, len(frame) - 1).map(
            lambda cut: frame[:cut])),
        st.binary(max_size=120),
        anything.map(lambda value: msgpack.packb(value, use_bin_type=True)),
    )


def expected_answer(frame: bytes) -> tuple[type[P.Message], ...]:
    """The message types of which one must answer ``frame`` before the controller answers
    a ping sent after it; () where the protocol may answer with silence."""
    try:
        msg, _ = P.decode_versioned(frame)
    except P.ProtocolError:
        return (P.Error,)
    if isinstance(msg, SILENT_ON_SUCCESS):
        return ()
    if isinstance(msg, P.Hello):
        return (P.Welcome, P.Error)
    if isinstance(msg, P.Start | P.Resume):
        return (P.Control, P.Error)
    if isinstance(msg, P.Ping):
        return (P.Pong,)
    return (P.Error,)  # a controller's message, sent by a device


def answers_before_pong(link: ControllerLink, barrier: float,
                        timeout_s: float = 15.0) -> list[P.Message | None] | None:
    """Send a ping on ``link`` (a device_agent ControllerLink) and collect what arrives
    before its pong: the answers to what was sent before it. None if the pong never comes.
    An answer our own decoder refuses is still an answer (listed as None)."""
    from device_agent.link import LinkTimeout

    link.send(P.Ping(barrier))
    answers: list = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:  # answers come in the version of what they answer (refusals of older too)
            msg = link.receive(timeout_s=left, versions=tuple(range(1, P.PROTOCOL_VERSION + 1)))
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
