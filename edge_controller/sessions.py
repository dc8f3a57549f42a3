"""Per-device sessions held by the controller, and the rules that end a request."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_controller.protocol import Draft, Start


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

    identity: bytes  # ZeroMQ routing id of the device's DEALER socket
    device_id: str
    draft_model: str
    last_seen: float
    request: Start | None = None
    slot: int | None = None  # verifier KV slot of the request in flight
    next_round: int = 0
    pending: Draft | None = None  # this round's draft, waiting for the round to close
    pending_bytes: int = 0  # its frame size
    answered_at: float = 0.0  # when the last verdict (or the request's control) was sent
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def generating(self) -> bool:
        return self.request is not None


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
