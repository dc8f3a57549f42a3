"""What the agent's round loop needs of a drafter, whatever runs it.

:class:`DraftEngine` is the interface: llama.cpp (:class:`device_agent.drafter.Drafter`,
the default), no drafter at all (:class:`~device_agent.drafter.TokenizerOnly`, ``--draft
none``: tokenizer only, the controller decodes), the soak's trace replay
(:class:`device_agent.synthetic.ReplayDrafter`), and further runtimes (ONNX Runtime) behind
the same members. This module needs neither llama.cpp nor torch, so that a device with
another runtime imports it alone. The sampling helpers live here too: every engine must
draw draft tokens and build the uploaded sparse q exactly as they say (DESIGN.md,
"Lossless sampling with a compact upload").

The round loop's contract, per request: ``begin(prompt)``; then per round ``draft(n)``
(which may include ``after=`` tokens uploaded but not yet committed, when pre-drafting,
and may end early when ``stop()`` says so), the upload, and ``accept(committed)`` with
what the verdict committed. An engine keeps its own cache in step with the committed
sequence: a draft token that was not committed leaves no trace in a later draft.

:class:`KVCacheDrafter` is that contract for any runtime with a KV cache that can be
rolled back to a prefix: the round loop, the cache bookkeeping, the sampling, pacing and
counters live here once, and a runtime supplies four primitives (what its cache holds,
roll back, evaluate, newest logits). llama.cpp and ONNX Runtime
(:mod:`device_agent.onnx_drafter`) are the two.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from edge_controller.protocol import MAX_TOP_K, Q_SCALE, confidence_byte


@dataclass
class DraftResult:
    tokens: list[int]  # [L] draft token ids
    q_ids: list[list[int]] = field(default_factory=list)  # [L][<=k] sampling mode; [] greedy
    q_counts: list[list[int]] = field(default_factory=list)  # [L][<=k]; q = count / sum
    seconds: float = 0.0  # wall time of draft(), incl. evaluating committed tokens
    stopped: bool = False  # ended early by draft()'s ``stop``
    # [L] the draft model's top-1 probability at each position (softmax of the logits at
    # temperature 1): its own confidence, for stopping a draft early (trace replay: the
    # recorded one).
    top1: list[float] = field(default_factory=list)
    # The top-1 probability of the token the draft declined: it ended before it, below
    # draft()'s ``min_confidence`` (confidence stopping). None: it did not.
    declined: float | None = None

    def part(self, start: int, stop: int | None = None) -> DraftResult:
        """Positions ``start:stop`` of this draft, every per-position list alike (and the
        declined token's probability, if the part runs to the end)."""
        to_end = stop is None or stop >= len(self.tokens)
        return DraftResult(self.tokens[start:stop], self.q_ids[start:stop],
                           self.q_counts[start:stop], top1=self.top1[start:stop],
                           declined=self.declined if to_end else None)

    def then(self, later: DraftResult) -> DraftResult:
        """This draft followed by ``later`` (drafted after it), taking ``later``'s time."""
        return DraftResult(self.tokens + later.tokens, self.q_ids + later.q_ids,
                           self.q_counts + later.q_counts, later.seconds, later.stopped,
                           self.top1 + later.top1, later.declined)

    def confidence_bytes(self) -> bytes:
        """``draft.confidence`` on the wire: a byte per token, and one for the declined
        token, if any (protocol.confidence_byte)."""
        probs = self.top1 + ([] if self.declined is None else [self.declined])
        return bytes(confidence_byte(p) for p in probs)


@dataclass(frozen=True)
class ChatFormat:
    """A draft model's chat template (Jinja) and the texts of its BOS and EOS tokens, which
    templates may write: what ``device-agent serve`` turns messages into a prompt with."""

    template: str
    bos_token: str = ""
    eos_token: str = ""


def sparse_q(logits: np.ndarray, temperature: float, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The draft's sparse distribution at one position, as it travels on the wire.

    logits: [V] float. Returns (ids, counts), most likely first: the top-k of
    ``softmax(logits / temperature)``, renormalised and rounded to integer counts summing
    to about ``Q_SCALE``; zero counts are dropped. q(id) = count / counts.sum() exactly.
    """
    k = min(top_k, logits.size)
    ids = np.argpartition(logits, -k)[-k:]
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    scaled = logits[ids].astype(np.float64) / temperature
    probs = np.exp(scaled - scaled[0])
    counts = np.rint(probs / probs.sum() * Q_SCALE).astype(np.int64)
    keep = counts > 0
    return ids[keep], counts[keep]


def top1_probability(logits: np.ndarray) -> float:
    """max softmax(logits): the model's probability of its own most likely token."""
    peak = float(logits.max())
    return 1.0 / float(np.exp(logits.astype(np.float64) - peak).sum())


def sample_sparse(ids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one id with probability exactly count / counts.sum() (integer arithmetic)."""
    r = rng.integers(counts.sum())
    return int(ids[np.searchsorted(np.cumsum(counts), r, side="right")])


def position_rng(seed: int, position: int) -> np.random.Generator:
    """The draft's random numbers for one absolute sequence position of a seeded request."""
    return np.random.default_rng([seed, position])


@runtime_checkable
class DraftEngine(Protocol):
    """A drafter as the agent uses it (the module docstring gives the contract)."""

    drafts: bool  # False: it drafts nothing and the controller decodes its requests
    model_id: str  # what the device reports as its draft model
    fingerprint: str  # the tokenizer's: must equal the target's (models/fingerprint.py)
    vocab_size: int
    eos_token_ids: list[int]
    n_ctx: int  # the longest sequence (prompt + output + draft) it can hold
    chat_format: ChatFormat | None  # None: the model has no chat template

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> bytes: ...

    def begin(self, prompt_ids: list[int]) -> None: ...

    def draft(self, n: int, *, temperature: float = 0.0, top_k: int = 32, seed: int = 0,
              after: Sequence[int] = (), stop: Callable[[], bool] | None = None,
              min_confidence: float = 0.0) -> DraftResult: ...

    def accept(self, committed: list[int]) -> None: ...


class KVCacheDrafter(ABC):
    """A draft model whose KV cache can be rolled back to any prefix, behind the round loop.

    KV cache reuse. The cache lives across rounds and requests. Two sequences matter: the
    *committed* one (prompt + every round's committed tokens, ``self.sequence``) and the
    *evaluated* one (what the cache holds, :meth:`_cached`, which also holds last round's
    draft tokens). ``draft`` truncates the cache to their longest common
    prefix, capped at ``len(sequence) - 1`` so the newest committed token is evaluated again
    and its logits are fresh, evaluates the rest of the committed sequence, then n times:
    read the newest logits, pick a draft token, evaluate it (all but the last one, which the
    next round evaluates only if it was accepted). Worked example, 5-token prompt P, L = 3::

        round 1  evaluate P (5) + d1 d2 (2)                           7 evaluations
                 verdict: d1 accepted, correction c -> sequence P d1 c
        round 2  keep P d1 (6), evaluate c (1) + e1 e2 (2)            3 = L
                 verdict: all accepted, bonus b -> sequence P d1 c e1 e2 e3 b
        round 3  keep up to e2 (9), evaluate e3 b (2) + 2 drafts      4 = L + 1

    After the first round a round evaluates at most L + 1 tokens (DESIGN.md allows L + 2),
    plus one for each L = 0 round just before it: a round with L = 0 evaluates nothing, so an
    idle device uploads at once, and its committed token joins the next round's batch.

    Sampling (temperature > 0) is lossless only if the uploaded q is exactly what the token
    was drawn from (DESIGN.md, "Lossless sampling with a compact upload"): :func:`sparse_q`
    quantises the top-k of ``softmax(logits / temperature)`` to the wire's integer counts,
    and :func:`sample_sparse` draws from exactly ``counts / sum(counts)`` with a numpy
    generator keyed by (seed, absolute position), never through the runtime's own sampler.
    A position's random numbers only ever decide draft tokens at that position, and a draft
    token that is not committed is discarded, so reusing them when a position is drafted
    again after a rejection keeps drafts independent of the verifier's coins.

    Pre-drafting (proactive drafting, docs/scheduling.md). While a draft is verified, the
    agent drafts on past it: ``draft(n, after=uploaded)`` drafts after the committed sequence
    *followed by* ``after``, as if it were committed: first the guess for the bonus token,
    then the tokens after it. If the verdict commits exactly ``after`` + the guess, the
    tokens past the guess are what the next round would draft: the same context, the same
    positions, so the same random numbers (sampling) and the same greedy choices. Otherwise
    they are dropped, and the next ``draft`` rolls the cache back to the committed sequence
    like any rejected draft: the pre-draft leaves no trace. ``stop`` is asked after each
    token, so that a verdict arriving while the device pre-drafts ends the pre-draft after
    the token in hand (a paced token still takes its whole time, as on a slower board).

    Counters (read by telemetry and tests): ``evaluated_tokens`` (total evaluated),
    ``last_round_evaluated``, ``rounds`` (draft calls), ``drafted_tokens``. A subclass sets
    ``model_id``, ``fingerprint``, ``vocab_size``, ``eos_token_ids`` and ``n_ctx``,
    tokenizes, and implements the four primitives below.
    """

    drafts = True

    def __init__(self, pace_s_per_token: float = 0.0):
        self.pace_s_per_token = pace_s_per_token
        self.sequence: list[int] = []  # prompt + committed tokens
        self.evaluated_tokens = 0
        self.last_round_evaluated = 0
        self.rounds = 0
        self.drafted_tokens = 0

    @abstractmethod
    def _cached(self) -> Sequence[int]:
        """The token ids the cache holds, in order."""

    @abstractmethod
    def _truncate(self, pos: int) -> None:
        """Drop cache positions >= pos."""

    @abstractmethod
    def _evaluate(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the cache, evaluating them."""

    @abstractmethod
    def _logits(self) -> np.ndarray:
        """[V] logits after the newest evaluated token."""

    def begin(self, prompt_ids: list[int]) -> None:
        """Start a request. Nothing is evaluated yet: the first draft evaluates the prompt,
        reusing whatever prefix the cache shares with it."""
        if not 0 < len(prompt_ids) < self.n_ctx:
            raise ValueError(f"prompt must hold 1..{self.n_ctx - 1} tokens")
        self.sequence = list(prompt_ids)

    def draft(
        self, n: int, *, temperature: float = 0.0, top_k: int = 32, seed: int = 0,
        after: Sequence[int] = (), stop: Callable[[], bool] | None = None,
        min_confidence: float = 0.0,
    ) -> DraftResult:
        """Draft ``n`` tokens after the committed sequence and ``after`` (greedy if
        temperature == 0). ``stop()``, asked after each token, ends the draft early by
        returning True. Confidence stopping: the draft ends before the first token whose
        position's top-1 probability is below ``min_confidence`` (``declined`` says it)."""
        started = time.perf_counter()
        if not self.sequence:
            raise RuntimeError("draft() before begin()")
        context = self.sequence + list(after)
        if len(context) + n > self.n_ctx:
            raise ValueError(
                f"{len(context)} + {n} tokens exceed the context of {self.n_ctx}"
            )
        if temperature < 0 or not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"need temperature >= 0 and 1 <= top_k <= {MAX_TOP_K}")
        evaluated_before = self.evaluated_tokens
        result = DraftResult(tokens=[])
        for i in range(n):
            token_started = time.perf_counter()
            if i == 0:
                self._sync(context)
            else:
                self._eval(result.tokens[-1:])
            logits = self._logits()
            top1 = top1_probability(logits)
            if top1 < min_confidence:
                result.declined = top1
                self._pace(token_started)  # its evaluation was spent all the same
                break
            result.top1.append(top1)
            if temperature == 0:
                token = int(np.argmax(logits))
            else:
                ids, counts = sparse_q(logits, temperature, top_k)
                position = len(context) + i
                token = sample_sparse(ids, counts, position_rng(seed, position))
                result.q_ids.append(ids.tolist())
                result.q_counts.append(counts.tolist())
            result.tokens.append(token)
            self._pace(token_started)
            if stop is not None and i + 1 < n and stop():
                result.stopped = True
                break
        self.rounds += 1
        self.drafted_tokens += len(result.tokens)
        self.last_round_evaluated = self.evaluated_tokens - evaluated_before
        result.seconds = time.perf_counter() - started
        return result

    def accept(self, committed: list[int]) -> None:
        """Append the round's committed tokens (accepted drafts + correction or bonus)."""
        self.sequence.extend(committed)

    def _pace(self, token_started: float) -> None:
        """A paced token takes its time, whatever arrives meanwhile."""
        spare = self.pace_s_per_token - (time.perf_counter() - token_started)
        if spare > 0:
            time.sleep(spare)

    def _sync(self, context: list[int]) -> None:
        """Make the cache hold ``context``, its newest token freshly evaluated."""
        cached = np.asarray(self._cached(), dtype=np.int64)
        shared = np.asarray(context[: len(cached)], dtype=np.int64)
        mismatch = np.flatnonzero(cached[: len(shared)] != shared)
        keep = min(int(mismatch[0]) if mismatch.size else len(shared), len(context) - 1)
        if keep < len(cached):
            self._truncate(keep)
        self._eval(context[keep:])

    def _eval(self, tokens: list[int]) -> None:
        self._evaluate(tokens)
        self.evaluated_tokens += len(tokens)
