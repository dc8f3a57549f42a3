"""The wire protocol between device agents and the edge controller.

One module, importing only msgpack, shared by both sides (device agents import it
without pulling in torch). Transport: ZeroMQ ROUTER (controller) / DEALER (device); every
ZeroMQ message carries exactly one frame whose body is a msgpack map::

    {"v": PROTOCOL_VERSION, "type": "<message type>", ...fields of that type...}

Conversation of one device (D) with the controller (C)::

    D -> C  hello      device id (may be empty), draft model, tokenizer fingerprint, ...
    C -> D  welcome    its name, target model, limits  (or error, fatal: the device exits)
    D -> C  start      a generation request: prompt ids, sampling parameters
    C -> D  control    draft length and uplink share for this device (again on change)
    D -> C  draft      round r: draft ids (+ sparse draft probabilities when sampling)
    C -> D  verdict    round r: accepted count, committed tokens, done flag
    ...                (draft / verdict until done; then another start, or bye)
    D -> C  ping       C -> D  pong            (round-trip time; liveness)
    D -> C  telemetry  measured draft speed, link quality, host state
    D -> C  resume     after a lost link or a controller restart: the request again, with
                       its committed output so far and the round it is at   (version 3)
    C -> D  control    (as after start; the controller re-created it if it had lost it)
    D -> C  cancel     end the request in flight now                          (version 3)
    C -> D  closing    the controller is going away; resume against its next start (v3)
    D -> C  bye

Handlers never see raw frames: :func:`decode` validates size, version, type and fields
and raises :class:`ProtocolError` with a message fit to send back to the device.

Versions: every change to what goes on the wire, or to what a message means, bumps
``PROTOCOL_VERSION``; a controller serves its own version and the one before
(``SERVED_VERSIONS``) and answers each device in the version it speaks.

* 1: the first version; a device's name is what its hello says.
* 2: identity is the device's CURVE key (docs/security.md): a device's name is the one its
  key is listed under on the controller, and ``welcome.device_id`` tells it; a hello's
  ``device_id`` may be empty, and if given must be that name. Same fields as version 1.
* 3: nothing lost (docs/resume.md): a request is (device key, request id), a draft and its
  verdict (request, round); ``resume`` re-creates a request from the device's committed
  transcript, a draft for a round already verified gets that verdict again (never a
  second commit); ``cancel`` ends a request; ``closing`` says the controller is stopping.
  Version 2 devices were served as before and never sent ``closing``.
* 4: ``telemetry.board``: a Jetson's tegrastats and power mode (device_agent/board.py);
  version 3 devices, which never send it, are served as before.
* 5: ``start.server_decode`` / ``resume.server_decode``: the controller decodes the request
  itself (a device without a drafter sends only its prompt, then receives one verdict per
  forward, each answering an empty draft of a round it never sends); version 4 devices,
  which never ask for it, are served as before (docs/scheduling.md).
* 6: proactive drafting (docs/scheduling.md): ``welcome.predraft_len`` is how many tokens a
  device may draft past its upload while that draft is verified (0: none; only a
  controller running ``--scheduler proactive`` allows any, to devices whose hello says
  ``predraft``); ``draft.predrafted`` is how many of a draft's tokens were drafted before
  the verdict of the round before it arrived, which confirmed the device's guess (all of
  its draft accepted and the bonus token the one it had guessed). Fields newer than a
  device's version are left out of what it is sent: version 5 devices never pre-draft.
* 7: confidence stopping (docs/system-model.md "Confidence stopping"):
  ``control.stop_confidence`` h makes the draft length a cap: the device stops a draft
  before the first token its draft model gives a top-1 probability below h (0: never);
  with ``control.report_confidence`` its drafts carry ``draft.confidence``, the top-1
  probability of each draft token as a byte (:func:`confidence_byte`), and one byte more
  when the draft stopped below h: the probability of the token it declined. Version 6 devices are
  served as before (never told h, they draft the cap).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 7
SERVED_VERSIONS = (PROTOCOL_VERSION - 1, PROTOCOL_VERSION)  # what a controller accepts
MAX_FRAME_BYTES = 1 << 20  # 1 MiB: the largest frame, a ping padded for an uplink probe
MAX_PROMPT_TOKENS = 32_768
MAX_DRAFT_TOKENS = 64
MAX_TOP_K = 256  # sparse draft distribution: at most this many (id, count) pairs per position
MIN_TEMPERATURE = 1e-3  # below this (but above 0) softmax under/overflows: use 0 (greedy)
MAX_SEED = 2**63  # seeds are keyed into 64-bit signed integers on the verifier
Q_SCALE = 1 << 16  # draft probabilities travel as integer counts; q = count / sum(counts)
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # also a safe file name
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{0,64}")  # logged: nothing that could forge a line
MAX_TOKEN_ID = 2**31 - 1  # no vocabulary is larger; the controller checks its own size
MAX_ROUND = 2**31 - 1  # rounds of one request: far more than any request has tokens
MAX_MAP_ENTRIES = 64  # capabilities, host state
MAX_STR_CHARS = 256  # any string field, unless STR_LIMITS says otherwise
STR_LIMITS = {"device_id": 64, "request_id": 64, "code": 32, "message": 2048}
MIN_SPECTRAL_EFFICIENCY, MAX_SPECTRAL_EFFICIENCY = 0.1, 30.0  # bit/s/Hz a device may report
# The largest legal frame of each type: a frame above its type's limit is refused before
# its fields are walked (walking a list of ints costs a Python check per element).
FRAME_LIMITS = {
    "hello": 4096, "welcome": 4096, "control": 256, "verdict": 4096, "pong": 256,
    "error": 4096, "bye": 64, "telemetry": 16 * 1024, "cancel": 256, "closing": 64,
    "start": 16 * MAX_PROMPT_TOKENS // 3 + 1024,  # ids of up to 5 bytes each, ~7% slack
    "resume": 16 * MAX_PROMPT_TOKENS // 3 + 1024,  # prompt + output fit one slot
    "draft": 11 * 64 * 256 + 2048,  # 64 positions x 256 (id, count) pairs of <= 5 + 5 bytes
    "ping": MAX_FRAME_BYTES,  # padded: the uplink probe (bytes: free to skip)
}
# Per type: (items in a list, entries in a map) its fields may hold; any larger, or any
# container where the type has none, is refused by the unpacker before it is built.
UNPACK_LIMITS = {
    "start": (MAX_PROMPT_TOKENS, 0), "resume": (MAX_PROMPT_TOKENS, 0),
    "draft": (MAX_TOP_K, 0), "verdict": (MAX_DRAFT_TOKENS + 1, 0), "welcome": (64, 0),
    "hello": (0, 16), "telemetry": (32, 32),
}


CONFIDENCE_SCALE = 250  # draft.confidence bytes: p in [b / 250, (b + 1) / 250)


def confidence_byte(p: float) -> int:
    """A top-1 probability on the wire: floor(250 p), at most 249. Every multiple of 0.1
    (a stopping threshold) is a byte edge, so p < h exactly when its byte is below
    250 h."""
    return min(max(math.floor(CONFIDENCE_SCALE * p), 0), CONFIDENCE_SCALE - 1)


class ProtocolError(ValueError):
    """A frame that cannot be accepted; ``code`` is machine readable, str() is for humans.
    ``fatal``: the device cannot go on as it is (its session, if any, is ended)."""

    def __init__(self, code: str, message: str, fatal: bool = False,
                 answer_version: int | None = None):
        super().__init__(message)
        self.code = code
        self.fatal = fatal
        self.answer_version = answer_version  # a version the sender reads, where known


@dataclass
class Message:
    TYPE: ClassVar[str] = ""


@dataclass
class Hello(Message):
    """``device_id``: empty, or the name the device expects to have (version 2)."""

    TYPE: ClassVar[str] = "hello"
    device_id: str
    draft_model: str
    tokenizer_fingerprint: str
    vocab_size: int
    capabilities: dict[str, Any] = field(default_factory=dict)


@dataclass
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    device_id: str  # the device's name on this controller
    target_model: str
    max_new_tokens: int
    max_draft_len: int
    eos_token_ids: list[int] = field(default_factory=list)
    predraft_len: int = 0  # tokens it may draft past its upload while waiting (version 6)


@dataclass
class Start(Message):
    """A generation request. ``temperature == 0`` means greedy."""

    TYPE: ClassVar[str] = "start"
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # target-side top-k of the processed distribution; 0 = off
    seed: int = 0
    draft_top_k: int = 32  # size of the sparse draft distribution uploaded per position
    server_decode: bool = False  # the controller decodes it: no drafts come (version >= 5)


@dataclass
class Control(Message):
    TYPE: ClassVar[str] = "control"
    draft_len: int
    bandwidth_share: float
    uplink_rate_bps: float = 0.0  # rate the device paces its uploads to; 0 = unpaced
    stop_confidence: float = 0.0  # h: stop before a token of top-1 probability < h (v7)
    report_confidence: bool = False  # drafts carry draft.confidence (version >= 7)


@dataclass
class Draft(Message):
    """Round ``round`` of request ``request_id``.

    ``tokens[i]`` is the draft token at sequence position ``position + i`` (``position`` =
    number of tokens of prompt + committed output so far). In sampling mode ``q_ids[i]`` /
    ``q_counts[i]`` is the sparse draft distribution that ``tokens[i]`` was sampled from:
    ``q(id) = count / sum(counts)``; empty lists in greedy mode. ``predrafted``: how many of
    ``tokens`` (the first ones) were drafted while round ``round - 1`` was verified, on the
    guess its verdict then confirmed (version 6; 0: drafted after that verdict).
    ``confidence`` (version 7, when the control asks for it): ``confidence[i]`` =
    ``confidence_byte(p_i)``, p_i the draft model's top-1 probability where it drafted
    ``tokens[i]``; one byte more, when the draft stopped on ``stop_confidence``, for the
    token it declined.
    """

    TYPE: ClassVar[str] = "draft"
    request_id: str
    round: int
    position: int
    tokens: list[int]
    q_ids: list[list[int]] = field(default_factory=list)
    q_counts: list[list[int]] = field(default_factory=list)
    draft_s: float = 0.0  # wall time the device spent drafting these tokens
    predrafted: int = 0  # version >= 6
    confidence: bytes = b""  # version >= 7


@dataclass
class Verdict(Message):
    """``tokens`` = the accepted draft prefix + the correction or bonus token, truncated at
    end of sequence or at max_new_tokens; ``accepted`` = how many draft tokens it holds."""

    TYPE: ClassVar[str] = "verdict"
    request_id: str
    round: int
    accepted: int
    tokens: list[int]
    done: bool
    draft_len: int


@dataclass
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    sent_at: float
    payload: bytes = b""  # probe bursts pad pings to measure uplink capacity


@dataclass
class Pong(Message):
    """Echo of a ping. ``received_at`` is the controller's monotonic clock when the ping
    arrived: differences between pongs of one probe burst give the uplink's arrival rate."""

    TYPE: ClassVar[str] = "pong"
    sent_at: float
    received_bytes: int = 0
    received_at: float = 0.0


@dataclass
class Telemetry(Message):
    TYPE: ClassVar[str] = "telemetry"
    draft_s_per_token: float = 0.0
    rtt_s: float = 0.0
    uplink_bps: float = 0.0
    spectral_efficiency: float = 0.0  # bit/s/Hz of the device's radio; 0 = unknown
    host: dict[str, Any] = field(default_factory=dict)
    board: dict[str, Any] = field(default_factory=dict)  # Jetson telemetry; version >= 4


@dataclass
class Error(Message):
    """``fatal`` errors end the device's session; others reject one message only."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    fatal: bool = False
    request_id: str = ""


@dataclass
class Resume(Message):
    """Request ``request_id`` again, as it stands on the device: the start's fields, the
    output committed so far (``committed_ids``: the device's transcript, the truth) and the
    round it drafts next. Answered like a start (control); the sequence is then at
    ``len(prompt_ids) + len(committed_ids)``."""

    TYPE: ClassVar[str] = "resume"
    request_id: str
    prompt_ids: list[int]
    committed_ids: list[int]
    round: int
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    draft_top_k: int = 32
    server_decode: bool = False  # version >= 5

    def as_start(self) -> Start:
        return Start(self.request_id, self.prompt_ids, self.max_new_tokens, self.temperature,
                     self.top_p, self.top_k, self.seed, self.draft_top_k, self.server_decode)


@dataclass
class Cancel(Message):
    """End request ``request_id`` now (a client hung up); answered by silence."""

    TYPE: ClassVar[str] = "cancel"
    request_id: str


@dataclass
class Closing(Message):
    """The controller is stopping: reconnect and resume after ``retry_after_s``."""

    TYPE: ClassVar[str] = "closing"
    retry_after_s: float = 1.0


@dataclass
class Bye(Message):
    TYPE: ClassVar[str] = "bye"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, Start, Control, Draft, Verdict, Ping, Pong, Telemetry, Error, Bye,
                Resume, Cancel, Closing)
}
FIELD_SINCE = {  # fields newer than their message: the version that added them
    ("telemetry", "board"): 4,
    ("start", "server_decode"): 5,
    ("resume", "server_decode"): 5,
    ("welcome", "predraft_len"): 6,
    ("draft", "predrafted"): 6,
    ("control", "stop_confidence"): 7,
    ("control", "report_confidence"): 7,
    ("draft", "confidence"): 7,
}


def encode(msg: Message, version: int = PROTOCOL_VERSION) -> bytes:
    """One frame of ``msg`` in ``version``: fields newer than it are left out (they keep
    their defaults, which mean what the older version meant)."""
    fields = {k: v for k, v in dataclasses.asdict(msg).items()
              if FIELD_SINCE.get((msg.TYPE, k), 0) <= version}
    body = {"v": version, "type": msg.TYPE, **fields}
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes, max_bytes: int = MAX_FRAME_BYTES) -> Message:
    """Parse and validate one frame of this side's own version."""
    return decode_versioned(frame, (PROTOCOL_VERSION,), max_bytes)[0]


def decode_versioned(
    frame: bytes, versions: tuple[int, ...] = SERVED_VERSIONS, max_bytes: int = MAX_FRAME_BYTES
) -> tuple[Message, int]:
    """Parse and validate one frame of any of ``versions``: (message, its version).
    Raise ProtocolError saying what is wrong.

    What a frame may cost is bounded before it is built: its first two keys must be ``v``
    and ``type`` (our encoder writes them first), read with no room for anything large;
    then the type's frame size limit; then the fields, with the type's own limits on lists
    and maps, which the unpacker enforces in C before it builds anything."""
    if len(frame) > max_bytes:
        raise ProtocolError("oversized", f"frame of {len(frame)} bytes exceeds {max_bytes}")
    try:
        head = _unpacker(frame, max_str_len=64)
        entries = head.read_map_header()
        keys_and_head = [head.unpack() for _ in range(4)]
    except Exception:  # msgpack raises several unrelated types
        raise ProtocolError("malformed", "a frame must be a msgpack map whose first keys are "
                            "'v' and 'type', within the limits") from None
    if keys_and_head[0] != "v" or keys_and_head[2] != "type":
        raise ProtocolError("malformed", "a frame's first keys must be 'v' and 'type'")
    version, kind = keys_and_head[1], keys_and_head[3]
    if type(version) is not int or version not in versions:
        said = version if type(version) is int and abs(version) < 10**6 else type(version).__name__
        accepted = " or ".join(str(v) for v in versions)
        raise ProtocolError(
            "version", f"protocol version {said} unsupported: this side speaks version "
            f"{PROTOCOL_VERSION} and accepts {accepted}; upgrade the older side (a controller "
            "serves its own version and the one before, so upgrade the controller first)",
            fatal=True,
            # An older side reads the refusal in its own version (errors never changed).
            answer_version=version if type(version) is int and 1 <= version < PROTOCOL_VERSION
            else None,
        )
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("unknown_type", "unknown message type")
    if len(frame) > FRAME_LIMITS[cls.TYPE]:
        raise ProtocolError("oversized", f"{cls.TYPE} frame of {len(frame)} bytes exceeds "
                            f"{FRAME_LIMITS[cls.TYPE]}")
    fields = {f.name for f in dataclasses.fields(cls)}
    if entries - 2 > len(fields):
        raise ProtocolError("malformed", f"{cls.TYPE}: {entries - 2 - len(fields)} or more "
                            "unknown field(s)")
    body: dict[str, Any] = {}
    try:
        lists, maps = UNPACK_LIMITS.get(cls.TYPE, (0, 0))
        rest = _unpacker(frame, max_str_len=max(STR_LIMITS.values()), max_bin_len=max_bytes,
                         max_array_len=lists, max_map_len=maps)
        rest.read_map_header()
        for _ in range(4):
            rest.skip()
        for _ in range(entries - 2):
            key = rest.unpack()
            if (key not in fields or key in body  # named by count: the names are the peer's
                    or FIELD_SINCE.get((cls.TYPE, key), 0) > version):
                raise ProtocolError("malformed", f"{cls.TYPE}: an unknown or repeated field")
            body[key] = rest.unpack()
        if rest.tell() != len(frame):
            raise ProtocolError("malformed", f"{cls.TYPE}: bytes after the message")
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError("malformed", f"{cls.TYPE}: not valid msgpack within its limits "
                            f"({type(exc).__name__})") from None
    msg = _build(cls, body)
    _check_limits(msg)
    return msg, version


def _unpacker(frame: bytes, *, max_str_len: int, max_bin_len: int = 0, max_array_len: int = 0,
              max_map_len: int = 0) -> msgpack.Unpacker:
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=max(len(frame), 1),
        max_str_len=max_str_len, max_bin_len=max_bin_len, max_array_len=max_array_len,
        max_map_len=max_map_len, max_ext_len=0)
    unpacker.feed(frame)
    return unpacker


_SCALARS = {"str": str, "int": int, "float": (int, float), "bool": bool, "bytes": bytes}


def _build(cls: type[Message], body: dict[str, Any]) -> Message:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in fields.items():
        if name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError("malformed", f"{cls.TYPE}: missing field {name!r}")
            continue
        value = body[name]
        if not _conforms(value, str(f.type)):
            got = ("a non-finite number" if isinstance(value, float) and not math.isfinite(value)
                   else type(value).__name__)
            raise ProtocolError("malformed", f"{cls.TYPE}.{name}: expected {f.type}, got {got}")
        if type(value) is str and len(value) > STR_LIMITS.get(name, MAX_STR_CHARS):
            raise ProtocolError("invalid", f"{cls.TYPE}.{name}: at most "
                                f"{STR_LIMITS.get(name, MAX_STR_CHARS)} characters")
    return cls(**body)


def _conforms(value: Any, annotation: str) -> bool:
    if annotation in _SCALARS:
        if annotation in ("int", "float") and isinstance(value, bool):
            return False
        if annotation == "float" and isinstance(value, float) and not math.isfinite(value):
            return False
        return isinstance(value, _SCALARS[annotation])
    # Lists are the only large fields: one exact type check per element, no recursion.
    if annotation == "list[int]":
        return type(value) is list and all(type(v) is int for v in value)
    if annotation == "list[list[int]]":
        return type(value) is list and all(
            type(row) is list and all(type(v) is int for v in row) for row in value)
    if annotation == "dict[str, Any]":
        return isinstance(value, dict) and all(type(k) is str for k in value)
    raise AssertionError(f"protocol field annotation {annotation!r} has no validator")


def _check_limits(msg: Message) -> None:
    def bad(text: str) -> ProtocolError:
        return ProtocolError("invalid", f"{msg.TYPE}: {text}")

    request_id = getattr(msg, "request_id", "")
    if not REQUEST_ID.fullmatch(request_id):
        raise bad("request_id must be at most 64 of A-Z a-z 0-9 . _ : -")
    if isinstance(msg, Resume):
        _check_limits(msg.as_start())
        if len(msg.prompt_ids) + len(msg.committed_ids) > MAX_PROMPT_TOKENS:
            raise bad(f"prompt + committed output must hold at most {MAX_PROMPT_TOKENS} tokens")
        if not 0 <= len(msg.committed_ids) < msg.max_new_tokens or not 0 <= msg.round <= MAX_ROUND:
            raise bad(f"need 0 <= len(committed_ids) < max_new_tokens and round in 0..{MAX_ROUND}")
    elif isinstance(msg, Closing) and not 0 <= msg.retry_after_s <= 3600:
        raise bad("retry_after_s must be in 0..3600")
    elif isinstance(msg, Start):
        if not 0 < len(msg.prompt_ids) <= MAX_PROMPT_TOKENS:
            raise bad(f"prompt must hold 1..{MAX_PROMPT_TOKENS} tokens")
        if not 1 <= msg.max_new_tokens <= MAX_TOKEN_ID:
            raise bad("max_new_tokens must be >= 1")
        if not (msg.temperature == 0 or MIN_TEMPERATURE <= msg.temperature <= 100):
            raise bad(f"temperature must be 0 (greedy) or in {MIN_TEMPERATURE:g}..100")
        if not 0 < msg.top_p <= 1 or not 0 <= msg.top_k <= MAX_TOKEN_ID:
            raise bad("need 0 < top_p <= 1 and top_k in 0..the vocabulary size")
        if not 0 <= msg.seed < MAX_SEED:
            raise bad("seed must be in 0..2**63-1")
        if not 1 <= msg.draft_top_k <= MAX_TOP_K:
            raise bad(f"draft_top_k must be in 1..{MAX_TOP_K}")
    elif isinstance(msg, Draft):
        if len(msg.tokens) > MAX_DRAFT_TOKENS:
            raise bad(f"at most {MAX_DRAFT_TOKENS} draft tokens per round")
        if msg.q_ids or msg.q_counts:
            if len(msg.q_ids) != len(msg.tokens) or len(msg.q_counts) != len(msg.tokens):
                raise bad("q_ids and q_counts need one entry per draft token")
            for token, ids, counts in zip(msg.tokens, msg.q_ids, msg.q_counts, strict=True):
                if not 0 < len(ids) == len(counts) <= MAX_TOP_K:
                    raise bad(f"each sparse q holds 1..{MAX_TOP_K} (id, count) pairs")
                if len(set(ids)) != len(ids) or any(c <= 0 for c in counts):
                    raise bad("sparse q ids must be distinct with positive counts")
                if token not in ids:
                    raise bad("a draft token must lie in the support of its q")
        if msg.position < 0 or not 0 <= msg.round <= MAX_ROUND:
            raise bad(f"position must be >= 0 and round in 0..{MAX_ROUND}")
        if not 0 <= msg.draft_s <= 3600:
            raise bad("draft_s must be in 0..3600 seconds")
        if not 0 <= msg.predrafted <= len(msg.tokens) or (msg.predrafted and msg.round == 0):
            raise bad("predrafted must be in 0..len(tokens), and 0 in round 0")
        if len(msg.confidence) not in (0, len(msg.tokens), len(msg.tokens) + 1):
            raise bad("confidence holds a byte per draft token, and at most one more")
    elif isinstance(msg, Telemetry):
        for name, high in (("draft_s_per_token", 60.0), ("rtt_s", 60.0), ("uplink_bps", 1e12)):
            if not 0 <= getattr(msg, name) <= high:
                raise bad(f"{name} must be in 0..{high:g}")
        # A device's radio claim steers the shares (weak radios get more band): bounded, so
        # one device cannot claim almost all of it.
        if not (msg.spectral_efficiency == 0 or MIN_SPECTRAL_EFFICIENCY
                <= msg.spectral_efficiency <= MAX_SPECTRAL_EFFICIENCY):
            raise bad(f"spectral_efficiency must be 0 (unknown) or in "
                      f"{MIN_SPECTRAL_EFFICIENCY:g}..{MAX_SPECTRAL_EFFICIENCY:g} bit/s/Hz")
    elif isinstance(msg, Control):
        if not (0 <= msg.draft_len <= MAX_DRAFT_TOKENS and 0 <= msg.bandwidth_share <= 1
                and 0 <= msg.uplink_rate_bps <= 1e12):
            raise bad("need 0 <= draft_len <= 64, 0 <= bandwidth_share <= 1, "
                      "0 <= uplink_rate_bps <= 1e12")
        if not 0 <= msg.stop_confidence < 1:
            raise bad("stop_confidence must be in [0, 1)")
    elif isinstance(msg, Hello):
        if not 1 <= msg.vocab_size <= MAX_TOKEN_ID:
            raise bad("vocab_size must be >= 1")
        if msg.device_id and not DEVICE_NAME.fullmatch(msg.device_id):
            raise bad("device_id must be empty or 1-64 letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit")
    elif isinstance(msg, Verdict | Welcome):
        ids = msg.tokens if isinstance(msg, Verdict) else msg.eos_token_ids
        if any(not 0 <= t <= MAX_TOKEN_ID for t in ids):
            raise bad("token ids must lie in 0..2**31-1")
        if isinstance(msg, Welcome) and not (1 <= msg.max_new_tokens <= MAX_TOKEN_ID
                                             and 0 <= msg.max_draft_len <= MAX_DRAFT_TOKENS
                                             and 0 <= msg.predraft_len <= MAX_DRAFT_TOKENS):
            raise bad(f"need max_new_tokens >= 1, max_draft_len and predraft_len in "
                      f"0..{MAX_DRAFT_TOKENS}")
        if isinstance(msg, Verdict) and not (0 <= msg.draft_len <= MAX_DRAFT_TOKENS
                                             and msg.round >= 0 and msg.accepted >= 0):
            raise bad(f"need draft_len in 0..{MAX_DRAFT_TOKENS}, round and accepted >= 0")
