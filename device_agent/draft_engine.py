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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from edge_controller.protocol import Q_SCALE


@dataclass
class DraftResult:
    tokens: list[int]  # [L] draft token ids
    q_ids: list[list[int]] = field(default_factory=list)  # [L][<=k] sampling mode; [] greedy
    q_counts: list[list[int]] = field(default_factory=list)  # [L][<=k]; q = count / sum
    seconds: float = 0.0  # wall time of draft(), incl. evaluating committed tokens
    stopped: bool = False  # ended early by draft()'s ``stop``


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

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...

    def detokenize(self, ids: list[int]) -> bytes: ...

    def begin(self, prompt_ids: list[int]) -> None: ...

    def draft(self, n: int, *, temperature: float = 0.0, top_k: int = 32, seed: int = 0,
              after: Sequence[int] = (), stop: Callable[[], bool] | None = None
              ) -> DraftResult: ...

    def accept(self, committed: list[int]) -> None: ...
