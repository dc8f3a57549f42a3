"""Recorded traces of the default models, which synthetic devices and the replay verifier
replay (device_agent/synthetic.py, edge_controller/verifier/replay.py; docs/soak.md).

A trace (one prompt, one draft model) holds the target's greedy output for the prompt
(the truth every run must reproduce), the target's top-2 logit margin at each of its
tokens (near ties, DESIGN.md section 3) and, for every position ``p`` of the output, the
draft model's greedy continuation after ``prompt + truth[:p]``, ``MAX_DRAFT`` tokens long,
with the draft model's top-1 probability at each of its positions (its own confidence:
what confidence stopping replays) and the draft model's speed.
``scripts/record_traces.py`` records them.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

TRACE_FORMAT = 3  # 3: confidences
MAX_DRAFT = 16  # the controller's default max_draft_len: the longest draft ever asked
TRACES_DIR = Path(__file__).resolve().parent / "traces"


@dataclass(frozen=True)
class Trace:
    draft: str  # the draft model's id (the hello's draft_model)
    prompt_ids: list[int]
    truth: list[int]  # the target's greedy output for the prompt (max_new_tokens of it)
    margins: list[float]  # the target's top-2 logit margin where it chose each truth token
    drafts: list[list[int]]  # drafts[p]: the draft's greedy continuation after truth[:p]
    draft_s_per_token: float  # the real draft model's speed where it was recorded
    # confidences[p][i]: the draft model's top-1 probability where it drafted drafts[p][i]
    confidences: list[list[float]]

    def __post_init__(self) -> None:
        if not self.prompt_ids or not (len(self.drafts) == len(self.margins) == len(self.truth)
                                       == len(self.confidences)):
            raise ValueError(f"trace of {self.draft}: a margin, a draft and its confidences "
                             "per truth token")
        if any(len(c) != len(d) for c, d in zip(self.confidences, self.drafts, strict=True)):
            raise ValueError(f"trace of {self.draft}: a confidence per draft token")

    def runs(self, depth: int = MAX_DRAFT) -> np.ndarray:
        """Leading draft tokens the target accepts, at every position with a whole draft
        of ``depth`` tokens of truth ahead (greedy verification of the recorded draft)."""
        return np.array([int(np.cumprod(np.equal(self.drafts[p][:depth],
                                                 self.truth[p:p + depth])).sum())
                         for p in range(len(self.truth) - depth + 1)], dtype=int)


@dataclass(frozen=True)
class TraceSet:
    """Traces of one target and its drafts, with what a hello needs to say about them."""

    target: str
    fingerprint: str  # the drafts' tokenizer fingerprint (that of the target's tokenizer)
    vocab_size: int
    eos_token_ids: list[int]  # the target's end-of-sequence tokens
    recorded: dict[str, Any]  # how: models and their checksums, host, date, command
    traces: list[Trace]

    def save(self, path: Path) -> None:
        body = {"format": TRACE_FORMAT, **asdict(self)}
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(body, f, separators=(",", ":"))

    @classmethod
    def load(cls, path: Path) -> TraceSet:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            body = json.load(f)
        if body.pop("format", None) != TRACE_FORMAT:
            raise ValueError(f"{path}: not a trace file of format {TRACE_FORMAT}")
        body["traces"] = [Trace(**t) for t in body["traces"]]
        return cls(**body)

    def of_draft(self, draft: str) -> list[Trace]:
        return [t for t in self.traces if t.draft == draft]


def default_traces() -> TraceSet:
    """The traces shipped with the repository (models/traces/)."""
    return TraceSet.load(TRACES_DIR / "smollm2-135m.json.gz")


