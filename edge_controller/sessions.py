"""Registered devices (sessions), keyed by their authenticated identity, and the rules that
end a request.

A session's identity is the device's CURVE public key (its routing id only on an insecure
controller): one registration per key. The connection it speaks on (its route) is just where
answers go: a device that reconnects with the same key takes its own registration over, and
a route that another key speaks on is no longer anyone else's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge_controller.protocol import PROTOCOL_VERSION, Draft, ProtocolError, Start, Verdict

if TYPE_CHECKING:  # the verifier imports torch; sessions stay light
    from edge_controller.verifier.slots import VerifyOutcome


@dataclass
class RequestStats:
    """Counters of one generation request, in the glossary's words (docs/glossary.md)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0  # rounds that ended in a rejected draft token
    generated: int = 0
    min_margin: float = float("inf")  # smallest top-2 target logit margin seen (greedy)

    @property
    def acceptance_estimate(self) -> float:
        """Censored estimate of the per-token acceptance a: accepted / (accepted + rejections).

        A round with L accepted tokens says nothing about token L+1, so dividing by
        ``drafted`` would bias a low whenever drafts are short (DESIGN.md section 2).
        """
        trials = self.accepted + self.rejections
        return self.accepted / trials if trials else float("nan")


@dataclass
class Session:
    """One registered device; at most one generation request in flight."""

    identity: bytes  # the device's Z85 public key (its first route on an insecure controller)
    route: bytes | None  # routing id of the connection it last spoke on; None: no route now
    device_id: str  # its name: the one its key is listed under (insecure: what it said)
    draft_model: str
    last_seen: float
    version: int = PROTOCOL_VERSION  # the protocol version it speaks; answers go in it
    predraft_len: int = 0  # tokens it may draft past an upload (its welcome said so)
    request: Start | None = None
    slot: int | None = None  # verifier KV slot of the request in flight
    next_round: int = 0
    pending: Draft | None = None  # this round's draft, waiting for the round to close
    pending_bytes: int = 0  # its frame size
    answered_at: float = 0.0  # when the last verdict (or the request's control) was sent
    started_at: float = 0.0  # when its request started (or was resumed): prefill order
    drafted_at: float = 0.0  # its request's start, its last draft (or, decoded here, queued)
    prefill_left: int = 0  # prompt tokens the verifier has still to prefill (0: ready)
    missed_rounds: int = 0  # rounds in a row that closed without its draft
    last_verdict: tuple[Verdict, Draft] | None = None  # the last round answered, its draft
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def generating(self) -> bool:
        return self.request is not None

    @property
    def server_decode(self) -> bool:
        """Its request is decoded by the controller: it sends no drafts (version 5)."""
        return self.request is not None and self.request.server_decode

    @property
    def in_rounds(self) -> bool:
        """Generating with its prompt prefilled: a member of the rounds."""
        return self.request is not None and self.prefill_left == 0

    def idle(self, now: float, rounds: int, seconds: float, round_deadline_s: float) -> bool:
        """Its request has had no draft for ``rounds`` rounds in a row (closed without it,
        or deadlines passed when none closed) and for at least ``seconds``, counted from
        when it could draft (its last verdict or control)."""
        if not self.generating or self.pending is not None or self.server_decode:
            # (A prefilling request that sent no draft yet may idle too; a server-decoded
            # one sends none, and its drafts are the controller's own.)
            return False
        silent = now - max(self.drafted_at, self.answered_at)
        missed = max(self.missed_rounds, int(silent / round_deadline_s))
        return missed >= rounds and silent >= seconds

    def commit_round(self, outcome: VerifyOutcome,
                     eos_token_ids: set[int]) -> tuple[list[int], bool]:
        """Apply the verifier's outcome (accepted, next_token, margin) to the pending draft:
        the tokens it commits and whether the request is done; counts it in ``stats``."""
        draft, stats = self.pending, self.stats
        self.pending = None
        tokens, done = commit(
            draft.tokens, outcome.accepted, outcome.next_token, generated=stats.generated,
            max_new_tokens=self.request.max_new_tokens, eos_token_ids=eos_token_ids,
        )
        stats.rounds += 1
        stats.drafted += len(draft.tokens)
        stats.accepted += outcome.accepted
        stats.rejections += outcome.accepted < len(draft.tokens)
        stats.generated += len(tokens)
        stats.min_margin = min(stats.min_margin, outcome.margin)
        self.next_round += 1
        return tokens, done


class SessionRegistry:
    """The registered devices: by identity, and by the route each last spoke on."""

    def __init__(self) -> None:
        self._by_identity: dict[bytes, Session] = {}
        self._by_route: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._by_identity)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_identity.values()))

    def get(self, identity: bytes) -> Session | None:
        return self._by_identity.get(identity)

    def named(self, device_id: str) -> Session | None:
        return next((s for s in self._by_identity.values() if s.device_id == device_id), None)

    def name_for(self, identity: bytes, listed: str | None, asked: str) -> str:
        """The name a registering device gets. With keys (``listed`` is the name its key is
        listed under) that name, which a hello may only repeat; without keys the name it
        asked for, unless another connection holds it."""
        if listed is not None:
            if asked and asked != listed:
                raise ProtocolError(
                    "identity", f"this device's key is listed as {listed!r} on the controller, "
                    f"so it cannot register as {asked!r}: leave --device-id out or give "
                    f"{listed!r}", fatal=True)
            return listed
        if not asked:
            raise ProtocolError("invalid", "a controller without keys needs a device id in "
                                "the hello", fatal=True)
        holder = self.named(asked)
        if holder is not None and holder.identity != identity:
            # Not fatal: the holder may be this device's own connection before a reconnect,
            # which the controller drops once it notices; a resume tries again.
            raise ProtocolError("name_taken", f"device id {asked!r} is registered by another "
                                "connection; choose another --device-id")
        return asked

    def displaced_by(self, identity: bytes, name: str) -> list[Session]:
        """What a new registration of ``identity`` as ``name`` replaces: its own earlier one,
        and one under that name from a key that was listed there before (a new key)."""
        return [s for s in self if s.identity == identity or s.device_id == name]

    def no_longer_listed(self, name_of: Callable[[bytes], str | None]) -> list[Session]:
        """Sessions whose key is no longer listed under their name (revoked or renamed)."""
        return [s for s in self if name_of(s.identity) != s.device_id]

    def on_route(self, route: bytes) -> Session | None:
        return self._by_route.get(route)

    def frame_on(self, route: bytes, identity: bytes) -> None:
        """A frame from ``identity`` came on ``route``: libzmq gave that route to its
        connection, so any other session that had it has no route now."""
        holder = self._by_route.get(route)
        if holder is not None and holder.identity != identity:
            holder.route = None
            del self._by_route[route]

    def moved(self, session: Session, route: bytes) -> None:
        """The device spoke on ``route`` in its conversation (not a ping): answers go there
        from now on (a reconnect takes its own registration over)."""
        self._route(route, session)

    def add(self, session: Session) -> None:
        assert session.identity not in self._by_identity, "remove the old registration first"
        self._by_identity[session.identity] = session
        if session.route is not None:
            self._route(session.route, session)

    def _route(self, route: bytes, session: Session | None) -> None:
        holder = self._by_route.pop(route, None)
        if holder is not None and holder is not session:
            holder.route = None
        if session is not None:
            if session.route != route and self._by_route.get(session.route) is session:
                del self._by_route[session.route]
            session.route = route
            self._by_route[route] = session

    def remove(self, session: Session) -> None:
        if self._by_identity.get(session.identity) is session:
            del self._by_identity[session.identity]
        if session.route is not None and self._by_route.get(session.route) is session:
            del self._by_route[session.route]


def commit(
    draft_tokens: list[int],
    accepted: int,
    next_token: int,
    *,
    generated: int,
    max_new_tokens: int,
    eos_token_ids: set[int],
) -> tuple[list[int], bool]:
    """Tokens a round commits to the output, and whether the request is finished.

    The accepted draft prefix plus the correction/bonus token, cut after the first end of
    sequence token (kept, as the target alone would emit it) and at ``max_new_tokens``:
    exactly the stop rules of the target-alone reference.
    """
    tokens = [*draft_tokens[:accepted], next_token][: max_new_tokens - generated]
    for i, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: i + 1], True
    return tokens, generated + len(tokens) >= max_new_tokens
