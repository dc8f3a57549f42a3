"""The schedulers: who is verified when (docs/scheduling.md).

Synchronous rounds (DESIGN.md section 2, the Multi-SPIN baseline): the first draft to
arrive opens a round; the round closes when every member's draft is in, or ``deadline_s``
after it opened; a draft that misses it joins the next round, nobody waits for it. Members
are the generating devices whose prompt is prefilled; a device that missed the last round
is not waited for until it drafts again (docs/limits.md).

Continuous batching (as Orca and vLLM do for decoding): whenever the verifier is free,
every draft that is in goes into the next forward, up to ``batch_tokens`` tokens, oldest
first; a draft that arrives during a forward joins the next one.

A scheduler sees sessions and their pending drafts; it never touches sockets or the
verifier (the controller runs the batch it picks).
"""

from __future__ import annotations

from collections.abc import Iterable

from edge_controller.sessions import Session


def _waiting(sessions: Iterable[Session]) -> list[Session]:
    """Members of the rounds whose draft is in."""
    return [s for s in sessions if s.in_rounds and s.pending is not None]


class Scheduler:
    """What both kinds share: ``opened_at`` is when the oldest draft now waiting arrived
    (None: none waits); the controller prefills a prompt in a forward of its own only then."""

    def __init__(self) -> None:
        self.opened_at: float | None = None

    def on_draft(self, session: Session, now: float) -> None:
        """A member's draft is in (a prefilling session's waits until it is a member)."""
        session.missed_rounds = 0
        if session.in_rounds and self.opened_at is None and self.opens(session):
            self.opened_at = now

    def opens(self, session: Session) -> bool:
        """Whether this session's draft opens a round."""
        return True

    def on_draft_gone(self, sessions: Iterable[Session]) -> None:
        """A waiting draft is gone (its request ended, or was rolled back): with no
        member's draft left waiting, nothing is open."""
        if not _waiting(sessions):
            self.opened_at = None

    def ready(self, session: Session, now: float) -> None:
        """A session's prompt is prefilled: a draft it sent meanwhile may open a round."""
        if session.pending is not None and self.opened_at is None and self.opens(session):
            self.opened_at = now

    def wait_s(self, now: float, tick_s: float) -> float:
        """How long the controller may wait for messages before the verifier needs it."""
        raise NotImplementedError

    def due(self, sessions: Iterable[Session], now: float) -> bool:
        """Whether a forward should run now (the verifier being free)."""
        raise NotImplementedError

    def close(self, sessions: Iterable[Session]) -> list[Session]:
        """The sessions whose drafts the next forward verifies."""
        raise NotImplementedError


class SyncScheduler(Scheduler):
    """Synchronous rounds: the round now collecting drafts, when it is due, who is in it.

    A request the controller decodes itself (server_decode) is always ready and rides
    along: its draft does not open a round, so the drafting devices pace the rounds as
    before; but it waits for them at most ``deadline_s``; with no drafting device in the
    rounds, every round is due at once."""

    def __init__(self, deadline_s: float):
        super().__init__()
        self.deadline_s = deadline_s

    def opens(self, session: Session) -> bool:
        return not session.server_decode

    def wait_s(self, now: float, tick_s: float) -> float:
        if self.opened_at is None:
            return tick_s
        return min(tick_s, max(self.opened_at + self.deadline_s - now, 0.0))

    def due(self, sessions: Iterable[Session], now: float) -> bool:
        members = [s for s in sessions if s.in_rounds]
        if not any(s.pending is not None for s in members):
            self.opened_at = None  # its drafts are gone (ended, rolled back): nothing open
            return False
        drafting = [s for s in members if not s.server_decode]
        if not drafting:
            return True
        if self.opened_at is None:
            # Only decoded-here drafts wait: for a drafting device's, but no longer than
            # the deadline, so a slow or silent one cannot stall them.
            waiting = [s.drafted_at for s in members if s.server_decode and s.pending]
            return bool(waiting) and now >= min(waiting) + self.deadline_s
        all_in = all(s.pending is not None for s in drafting if s.missed_rounds == 0)
        return all_in or now >= self.opened_at + self.deadline_s

    def close(self, sessions: Iterable[Session]) -> list[Session]:
        """Close the round: the sessions whose drafts it verifies. Members without a draft
        in it have missed it."""
        self.opened_at = None
        batch = []
        for session in sessions:
            if session.in_rounds and session.pending is not None:
                batch.append(session)
            elif session.in_rounds:
                session.missed_rounds += 1
        return batch


class ContinuousScheduler(Scheduler):
    """Continuous batching: every draft that is in, whenever the verifier is free.

    Fairness: drafts go in oldest first and a forward takes them in that order while they
    fit ``batch_tokens`` (a draft of L tokens costs L + 1); the first one left out is the
    oldest waiting, so it goes first in the next forward. Since the budget holds the
    longest draft, no device waits more than one forward behind the budget.
    """

    def __init__(self, batch_tokens: int):
        super().__init__()
        self.batch_tokens = batch_tokens

    def wait_s(self, now: float, tick_s: float) -> float:
        return tick_s if self.opened_at is None else 0.0

    def due(self, sessions: Iterable[Session], now: float) -> bool:
        if not _waiting(sessions):
            self.opened_at = None
            return False
        return True

    def close(self, sessions: Iterable[Session]) -> list[Session]:
        waiting = sorted(_waiting(sessions), key=lambda s: s.drafted_at)
        batch, tokens = [], 0
        for session in waiting:
            cost = len(session.pending.tokens) + 1
            if batch and tokens + cost > self.batch_tokens:
                break
            batch.append(session)
            tokens += cost
        left = waiting[len(batch):]
        self.opened_at = left[0].drafted_at if left else None
        return batch
