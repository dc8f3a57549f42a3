"""The replay verifier: verdicts from recorded target transcripts, at a verify-time fit.

For soaks and capacity studies (scripts/load_test.py) on hosts without the compute to
verify hundreds of sessions: every prompt a synthetic device sends is one whose target
output was recorded (device_agent/synthetic.py), so the verdict for a greedy draft is
known without the target: the longest prefix of the draft that the recorded output
continues with, then the output's next token. Each round (and each prefill chunk) sleeps
for what a verify-time law says it costs (an affine fit of the tokens it feeds, or a
``scripts/bench_verify.py --sweep`` law of draft lengths and contexts), so the
controller's loop, batching and draft control see the time a real verifier would take. Lost or
duplicated tokens are then counted against the recording, the truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from edge_controller.verifier.slots import (
    CapacityError,
    Chunk,
    SlotTable,
    VerifyItem,
    VerifyOutcome,
)

REPLAY_MARGIN = 1.0  # recorded outputs have no near ties to report
VerifyTimeLaw = Callable[[Sequence[int], Sequence[int]], float]  # (draft lens, contexts) -> s


def affine_law(a: float, b: float) -> VerifyTimeLaw:
    """T_v = a + b x (tokens fed: each draft and its pending token)."""
    if min(a, b) < 0:
        raise ValueError("verify-time fit coefficients must be >= 0")
    return lambda lens, _contexts: a + b * sum(n + 1 for n in lens)


class ReplayVerifier(SlotTable):
    """``transcripts``: prompt -> the target's greedy output; ``verify_time``: the law a
    forward sleeps (a prefill chunk counts as a draft one token shorter than it).
    Where a draft runs to the end of a recorded output, the token after it is ``end_token``
    (an end of sequence): a request never asks past its recording, so the controller cuts
    it off, and one that did would end there instead of getting invented text."""

    def __init__(self, transcripts: dict[tuple[int, ...], list[int]], *, vocab_size: int,
                 max_sessions: int, max_len: int, verify_time: VerifyTimeLaw,
                 end_token: int):
        super().__init__(max_sessions=max_sessions, max_len=max_len, vocab_size=vocab_size)
        self.transcripts = transcripts
        self.verify_time = verify_time
        self.end_token = end_token
        self._truth: list[list[int]] = [[] for _ in range(max_sessions)]  # prompt + output

    def open(self, prompt_ids: list[int], prefill: bool = True) -> int:
        """A prompt whose recorded output continues it: a recorded prompt, or a recorded
        prompt followed by the start of its output (a resumed request)."""
        truth = self._recorded(prompt_ids)
        slot = super().open(prompt_ids, prefill=False)
        self._truth[slot] = truth
        if prefill:
            self.prefill(slot, len(prompt_ids))
        return slot

    def _recorded(self, sequence: list[int]) -> list[int]:
        for prompt, output in self.transcripts.items():
            truth = [*prompt, *output]
            if len(prompt) <= len(sequence) <= len(truth) and truth[: len(sequence)] == sequence:
                return truth
        raise CapacityError("this verifier replays recorded transcripts, and none starts with "
                            "this prompt (a synthetic device's prompts only)")

    def _run(self, items: list[VerifyItem], chunk: Chunk | None) -> list[VerifyOutcome]:
        lens = [len(it.draft_tokens) for it in items]
        contexts = [self.length(it.slot) for it in items]
        if chunk is not None:
            lens.append(len(chunk[1]) - 1)
            contexts.append(chunk[2])
        time.sleep(max(self.verify_time(lens, contexts), 0.0))
        return [self._outcome(item) for item in items]

    def _outcome(self, item: VerifyItem) -> VerifyOutcome:
        if not item.sampling.greedy:
            raise ValueError("the replay verifier verifies greedy drafts only")
        truth, at, draft = self._truth[item.slot], self.length(item.slot), item.draft_tokens
        if self._tokens[item.slot] != truth[:at]:
            raise ValueError(f"slot {item.slot} left its recorded transcript")
        accepted = 0
        while (accepted < len(draft) and at + accepted < len(truth)
               and draft[accepted] == truth[at + accepted]):
            accepted += 1
        following = truth[at + accepted] if at + accepted < len(truth) else self.end_token
        return VerifyOutcome(accepted, following, REPLAY_MARGIN)
