"""The round scheduler: who is verified when.

Synchronous rounds (DESIGN.md section 2, the Multi-SPIN baseline): the first draft to
arrive opens a round; the round closes when every member's draft is in, or ``deadline_s``
after it opened; a draft that misses it joins the next round, nobody waits for it. Members
are the generating devices whose prompt is prefilled; a device that missed the last round
is not waited for until it drafts again (docs/limits.md). The scheduler sees sessions and
their pending drafts; it never touches sockets or the verifier (the controller runs the
batch it picks).
"""

from __future__ import annotations

from collections.abc import Iterable

from edge_controller.sessions import Session


class SyncScheduler:
    """The round now collecting drafts: when it opened, when it is due, who is in it."""

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s
        self.opened_at: float | None = None  # when the round now collecting drafts opened

    def on_draft(self, session: Session, now: float) -> None:
        """A member's draft is in (a prefilling session's waits until it is a member)."""
        session.missed_rounds = 0
        if session.in_rounds and self.opened_at is None:
            self.opened_at = now

    def wait_s(self, now: float, tick_s: float) -> float:
        """How long the controller may wait for messages before the round needs it."""
        if self.opened_at is None:
            return tick_s
        return min(tick_s, max(self.opened_at + self.deadline_s - now, 0.0))

    def due(self, sessions: Iterable[Session], now: float) -> bool:
        members = [s for s in sessions if s.in_rounds]
        if not any(s.pending is not None for s in members):
            self.opened_at = None  # its drafts are gone (ended, rolled back): nothing open
            return False
        all_in = all(s.pending is not None for s in members if s.missed_rounds == 0)
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

    def on_draft_gone(self, sessions: Iterable[Session]) -> None:
        """A waiting draft is gone (its request ended, or was rolled back): with no
        member's draft left waiting, the round it opened is empty."""
        if not any(s.in_rounds and s.pending is not None for s in sessions):
            self.opened_at = None

    def ready(self, session: Session, now: float) -> None:
        """A session's prompt is prefilled: a draft it sent meanwhile may open a round."""
        if session.pending is not None and self.opened_at is None:
            self.opened_at = now
