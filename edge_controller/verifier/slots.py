"""Sessions' sequences in a verifier's slots, whatever computes their verdicts.

A slot holds one session's sequence: the prompt plus the committed output, the last token
"pending" (not yet fed). Of the prompt, the leading tokens whose K/V are cached grow chunk
by chunk (prefill); a round feeds ``[pending, d_1 .. d_L]`` of every item and commits the
accepted drafts plus one token. The bookkeeping, the checks and the order of a round live
here; :class:`~edge_controller.verifier.engine.Verifier` computes the verdicts with the
target model, :class:`~edge_controller.verifier.replay.ReplayVerifier` from recorded
transcripts (soaks on hosts without the compute for hundreds of sessions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

Chunk = tuple[int, list[int], int]  # (slot, tokens, start position) fed in one forward
NEAR_TIE_MARGIN = 1e-4  # DESIGN.md: greedy mismatches are tolerated only below this logit margin


@dataclass(frozen=True)
class SamplingParams:
    """How the target alone would pick its tokens; ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class CapacityError(RuntimeError):
    """A session cannot be served within the KV budget; str() is fit to send to the device."""


@dataclass
class VerifyItem:
    """One session's draft for this round; ``draft_tokens[0]`` sits at ``length(slot)``."""

    slot: int
    draft_tokens: list[int]
    sampling: SamplingParams
    q_ids: list[list[int]] | None = None  # sampling mode: sparse q per draft token
    q_counts: list[list[int]] | None = None  # q(id) = count / sum(counts)


@dataclass
class VerifyOutcome:
    accepted: int  # number of draft tokens accepted
    next_token: int  # correction (after a rejection) or bonus (after full acceptance)
    margin: float  # smallest top-2 logit margin over the decided positions (near ties)


class SlotTable:
    """``max_sessions`` slots of up to ``max_len`` tokens of a ``vocab_size`` vocabulary.

    Subclasses compute a round in :meth:`_run`: the outcomes of ``items`` (their
    ``[pending, d_1 .. d_L]`` from :meth:`_verify_request`) and, in the same pass, the
    K/V of a prefill chunk."""

    def __init__(self, *, max_sessions: int, max_len: int, vocab_size: int):
        if max_sessions < 1 or max_len < 1:
            raise ValueError("need max_sessions >= 1 and max_len >= 1")
        self.max_sessions = max_sessions
        self.max_len = max_len
        self.vocab_size = vocab_size
        self._tokens: list[list[int]] = [[] for _ in range(max_sessions)]  # per slot
        self._cached = [0] * max_sessions  # per slot: leading tokens whose K/V are cached
        self._open = [False] * max_sessions

    def _run(self, items: list[VerifyItem], chunk: Chunk | None) -> list[VerifyOutcome]:
        raise NotImplementedError

    # --- sessions ---------------------------------------------------------------------

    def open(self, prompt_ids: list[int], prefill: bool = True) -> int:
        """Allocate the lowest free slot for a prompt; its last token is pending.

        With ``prefill`` the rest of the prompt is prefilled now, in one forward; else it
        is prefilled later by chunks (:meth:`prefill`, or :meth:`verify`'s ``prefill``),
        so that a long prompt never stalls the other sessions' rounds."""
        if not prompt_ids:
            raise ValueError("prompt must hold at least one token")
        self._check_tokens(prompt_ids, "prompt")
        if len(prompt_ids) > self.max_len:
            raise CapacityError(
                f"prompt of {len(prompt_ids)} tokens exceeds the context limit of "
                f"{self.max_len} tokens"
            )
        if all(self._open):
            log.warning("refusing a session: all %d slots in use", self.max_sessions)
            raise CapacityError(
                f"server is full: all {self.max_sessions} verification slots are in use; "
                "retry later"
            )
        slot = self._open.index(False)
        self._open[slot] = True
        self._tokens[slot] = list(prompt_ids)
        self._cached[slot] = 0
        if prefill:
            self.prefill(slot, len(prompt_ids))
        log.debug("opened slot %d with a prompt of %d tokens", slot, len(prompt_ids))
        return slot

    def prefill_left(self, slot: int) -> int:
        """Prompt tokens of ``slot`` whose K/V are not cached yet (0: ready to verify)."""
        self._check_slot(slot)
        return len(self._tokens[slot]) - 1 - self._cached[slot]

    def prefill(self, slot: int, max_tokens: int) -> int:
        """Prefill up to ``max_tokens`` more of ``slot``'s prompt in one forward; return
        how many remain."""
        chunk = self._prefill_chunk(slot, max_tokens)
        if chunk is not None:
            self._run([], chunk)
            self._cached[slot] += len(chunk[1])
        return self.prefill_left(slot)

    def _prefill_chunk(self, slot: int, max_tokens: int) -> Chunk | None:
        """(slot, tokens, start position) of the next prefill chunk, if any is left."""
        if self.prefill_left(slot) <= 0 or max_tokens <= 0:
            return None
        start = self._cached[slot]
        end = start + min(max_tokens, self.prefill_left(slot))
        return slot, self._tokens[slot][start:end], start

    @property
    def slots_in_use(self) -> int:
        return sum(self._open)

    def close(self, slot: int) -> None:
        self._check_slot(slot)
        self._open[slot] = False
        log.debug("closed slot %d at length %d", slot, len(self._tokens[slot]))

    def length(self, slot: int) -> int:
        """Tokens in the sequence so far (prompt + committed output); the last is pending."""
        self._check_slot(slot)
        return len(self._tokens[slot])

    def tokens(self, slot: int) -> list[int]:
        """The session's sequence: prompt + committed output, the last one pending."""
        self._check_slot(slot)
        return list(self._tokens[slot])

    def truncate(self, slot: int, length: int) -> None:
        """Roll the session back to its first ``length`` tokens (the last becomes pending):
        the same rollback by length that a rejection does, e.g. to replay a round."""
        if not 1 <= length <= self.length(slot):
            raise ValueError(f"slot {slot}: cannot truncate to {length} tokens")
        del self._tokens[slot][length:]
        self._cached[slot] = min(self._cached[slot], length - 1)

    def room(self, slot: int) -> int:
        """The longest draft this session can still be verified with (negative: full)."""
        return self.max_len - self.length(slot)

    # --- verification -----------------------------------------------------------------

    def verify(
        self, items: list[VerifyItem], prefill: tuple[int, int] | None = None
    ) -> list[VerifyOutcome]:
        """One batched forward over ``[pending, d_1 .. d_L]`` of every item; commits the
        pending token and the accepted drafts; each next token becomes its slot's pending.
        ``prefill = (slot, n)`` also prefills up to n prompt tokens of that (still
        prefilling) slot in the same forward (chunked prefill, as vLLM mixes them).

        Raises (before any state changes) ValueError for a malformed item and
        CapacityError for a session whose draft would run past ``max_len``.
        """
        self._check_items(items)
        chunk = self._prefill_chunk(*prefill) if prefill is not None else None
        if not items and chunk is None:
            return []
        outcomes = self._run(items, chunk)
        if chunk is not None:
            self._cached[chunk[0]] += len(chunk[1])
        for item, outcome in zip(items, outcomes, strict=True):
            committed = item.draft_tokens[: outcome.accepted] + [outcome.next_token]
            self._tokens[item.slot] += committed
            self._cached[item.slot] = len(self._tokens[item.slot]) - 1
        return outcomes

    def verify_each(self, items: list[VerifyItem]) -> list[VerifyOutcome]:
        """Reference: the same math with one forward per item (batch size 1)."""
        return [self.verify([item])[0] for item in items]

    def _verify_request(self, item: VerifyItem) -> Chunk:
        """An item feeds [pending, d_1 .. d_L] from the pending token's position on."""
        pending = self.length(item.slot) - 1
        return item.slot, [self._tokens[item.slot][-1], *item.draft_tokens], pending

    # --- checks -----------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not (0 <= slot < self.max_sessions and self._open[slot]):
            raise ValueError(f"slot {slot} is not an open session")

    def _check_tokens(self, tokens: list[int], what: str) -> None:
        if any(not 0 <= t < self.vocab_size for t in tokens):
            raise ValueError(f"{what}: token ids must lie in 0..{self.vocab_size - 1}")

    def _check_items(self, items: list[VerifyItem]) -> None:
        slots = [it.slot for it in items]
        if len(set(slots)) != len(slots):
            raise ValueError("a session may appear only once per round")
        for item in items:
            if self.prefill_left(item.slot) > 0:
                raise ValueError(f"slot {item.slot} is still prefilling its prompt")
            self._check_tokens(item.draft_tokens, f"slot {item.slot} draft")
            if len(item.draft_tokens) > self.room(item.slot):
                raise CapacityError(
                    f"draft of {len(item.draft_tokens)} tokens would run past the context "
                    f"limit of {self.max_len} tokens (room for {max(self.room(item.slot), 0)})"
                )
            if not item.sampling.greedy:
                self._check_sparse_q(item)

    def _check_sparse_q(self, item: VerifyItem) -> None:
        q_ids, q_counts, n = item.q_ids or [], item.q_counts or [], len(item.draft_tokens)
        if len(q_ids) != n or len(q_counts) != n:  # an empty draft (L = 0) has no q
            raise ValueError(f"slot {item.slot}: sampling needs q_ids/q_counts per draft token")
        for token, ids, counts in zip(item.draft_tokens, q_ids, q_counts, strict=True):
            if not 0 < len(ids) == len(counts) or min(counts) <= 0 or token not in ids:
                raise ValueError(
                    f"slot {item.slot}: each q needs matching ids/counts, positive counts, "
                    "and the draft token in its support"
                )
            self._check_tokens(ids, f"slot {item.slot} q_ids")
