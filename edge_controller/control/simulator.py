"""Round-by-round Monte Carlo of the synchronous system, independent of the goodput formula.

Each round every device drafts L_k tokens (L_k t_k s), waits its delay d_k, uploads
b0 + L_k b bits at rate beta_k B s_k; the round closes when the last upload is in, the
batch of sum_k (L_k + 1) tokens is verified (T_v), and each device gets its accepted
drafts plus one correction/bonus token. Acceptance is drawn position by position from the
device's acceptance model, or replayed from a measured trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_controller.control.model import Plan, SystemParams, UserParams

_CHUNK_ROUNDS = 1024


@dataclass(frozen=True)
class AcceptanceTrace:
    """Measured acceptance per device: runs[k][r] = leading drafts accepted in round r.

    drafted[k] is how many drafts each recorded round of device k held, so replaying a
    draft length L_k <= drafted[k] is exact: accepted = min(run, L_k).
    """

    runs: tuple[np.ndarray, ...]
    drafted: np.ndarray  # (K,)

    @classmethod
    def from_indicators(cls, indicators: Sequence[np.ndarray]) -> AcceptanceTrace:
        """Per device a (rounds, positions) 0/1 array: was draft position i accepted."""
        arrays = [np.asarray(x, dtype=bool) for x in indicators]
        runs = tuple(np.cumprod(x, axis=1).sum(axis=1) for x in arrays)
        return cls(runs, np.array([x.shape[1] for x in arrays]))

    @classmethod
    def from_accepted_counts(
        cls, counts: Sequence[np.ndarray], draft_len: Sequence[int]
    ) -> AcceptanceTrace:
        """Per device the accepted count of each recorded round at draft length draft_len[k]."""
        return cls(tuple(np.asarray(c, dtype=int) for c in counts), np.asarray(draft_len))


@dataclass(frozen=True)
class SimulationResult:
    goodput_tok_s: float  # total target tokens / total time
    user_goodput_tok_s: np.ndarray  # (K,)
    rounds: int
    elapsed_s: float
    tokens: np.ndarray  # (K,) target tokens delivered per device


def _draw_accepted(
    users: UserParams, draft_len: np.ndarray, rounds: int, rng: np.random.Generator
) -> np.ndarray:
    """(rounds, K) leading accepted drafts, drawn position by position."""
    depth = max(int(draft_len.max()), 1)
    probs = users.acceptance.position_probs(depth)  # (depth, K)
    accepted = rng.random((rounds, depth, users.num_users)) < probs
    within = np.arange(depth)[:, None] < draft_len  # positions actually drafted
    return np.cumprod(accepted & within, axis=1).sum(axis=1)


def _replay_accepted(
    trace: AcceptanceTrace, draft_len: np.ndarray, start: int, rounds: int
) -> np.ndarray:
    """(rounds, K) accepted drafts replayed cyclically from the trace."""
    columns = [
        np.minimum(runs[(start + np.arange(rounds)) % runs.size], length)
        for runs, length in zip(trace.runs, draft_len, strict=True)
    ]
    return np.stack(columns, axis=1)


def simulate(
    system: SystemParams,
    users: UserParams,
    plan: Plan,
    rounds: int = 4000,
    seed: int = 0,
    trace: AcceptanceTrace | None = None,
) -> SimulationResult:
    """Run ``rounds`` synchronous rounds of the plan; acceptance random or from ``trace``."""
    draft_len = np.asarray(plan.draft_len, dtype=int)
    share = np.asarray(plan.bandwidth_share, dtype=float)
    if trace is not None and np.any(draft_len > trace.drafted):
        raise ValueError(
            f"trace holds only {trace.drafted.tolist()} drafts per round; "
            f"cannot replay draft lengths {draft_len.tolist()}"
        )
    rng = np.random.default_rng(seed)
    # Event times of one round: drafting, radio delay, the upload at the held rate; the
    # round closes on the last upload, then verifies the batch of sum_k (L_k + 1) tokens.
    bits = system.overhead_bits + draft_len * system.bits_per_token
    rate = share * system.bandwidth_hz * users.spectral_efficiency  # bit/s
    with np.errstate(divide="ignore"):
        upload_s = np.where(bits > 0, bits / rate, 0.0)
    uploads_in = draft_len * users.draft_s_per_token + users.delay_s + upload_s
    batch_tokens = int(np.sum(draft_len + 1))
    round_s = uploads_in.max() + system.verify_time.of_tokens(batch_tokens)
    tokens = np.zeros(users.num_users)
    for start in range(0, rounds, _CHUNK_ROUNDS):
        n = min(_CHUNK_ROUNDS, rounds - start)
        if trace is None:
            accepted = _draw_accepted(users, draft_len, n, rng)
        else:
            accepted = _replay_accepted(trace, draft_len, start, n)
        tokens += (accepted + 1).sum(axis=0)
    elapsed = rounds * float(round_s)
    return SimulationResult(
        float(tokens.sum() / elapsed), tokens / elapsed, rounds, elapsed, tokens
    )
