"""The discrete-event simulator of synchronous rounds: the project's one simulator.

Events, on one simulated clock (seconds):

    DRAFTED k    device k finished drafting its L_k tokens (L_k t_k after the round began)
    ARRIVED k    its upload of b0 + L_k b bits at beta_k B s_k bit/s and its delay d_k
                 are behind it: the draft is at the verifier
    VERIFIED     the round closed on the last arrival and the batch of sum_k (L_k + 1)
                 tokens was verified (T_v); every device gets its accepted drafts and one
                 correction/bonus token, and the next round begins
    DRIFT        the scenario's true parameters change ([[drift]] entries)

Each leg uses the parameters true when it starts. Acceptance is drawn position by position
from the device's true acceptance model (geometric or a curve), or replayed from a
recorded trace. A *decider* chooses the lengths and shares: a fixed plan, the oracle (who
knows the truth and re-solves when it changes) or the live controller's DraftController,
fed what the controller would observe (edge_controller/simulator/deciders.py).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge_controller.control.model import SystemParams, UserParams

DRAFTED, ARRIVED, VERIFIED, DRIFT = "drafted", "arrived", "verified", "drift"
MAX_ROUNDS = 5_000_000  # every round lasts at least T_v's base: seconds / base_s bounds them


@dataclass(frozen=True)
class AcceptanceTrace:
    """Measured acceptance per device: runs[k][r] = leading drafts accepted in recorded
    round r of device k, which drafted drafted[k] tokens. Replaying a length
    L_k <= drafted[k] is exact: accepted = min(run, L_k); rounds replay cyclically."""

    runs: tuple[np.ndarray, ...]
    drafted: np.ndarray  # (K,)

    @classmethod
    def from_indicators(cls, indicators: Sequence[np.ndarray]) -> AcceptanceTrace:
        """Per device a (rounds, positions) 0/1 array: was draft position i accepted."""
        arrays = [np.asarray(x, dtype=bool) for x in indicators]
        runs = tuple(np.cumprod(x, axis=1).sum(axis=1) for x in arrays)
        return cls(runs, np.array([x.shape[1] for x in arrays]))


@dataclass(frozen=True)
class Decisions:
    draft_len: np.ndarray  # (K,) int
    share: np.ndarray  # (K,) beta_k


@dataclass(frozen=True)
class RoundRecord:
    """What one round showed the controller, per device (arrays of shape (K,))."""

    started: float  # when the verdicts of the previous round went out
    draft_len: np.ndarray
    draft_s: np.ndarray  # drafting time
    upload_bits: np.ndarray
    arrived: np.ndarray  # arrival times at the verifier
    verify_s: float  # T_v of the batch
    accepted: np.ndarray


class Decider(Protocol):
    """Chooses draft lengths and shares; sees the truth only if it is the oracle."""

    def start(self, system: SystemParams, users: UserParams) -> Decisions: ...

    def after_round(self, now: float, record: RoundRecord) -> Decisions | None:
        """Decisions for the next round (None: unchanged)."""
        ...

    def on_drift(self, now: float, users: UserParams) -> Decisions | None:
        """The truth changed (only the oracle may look at ``users``)."""
        ...


@dataclass
class SimulationResult:
    seconds: float  # simulated time
    tokens: np.ndarray  # (K,) target tokens delivered by ``seconds``
    rounds: int
    drafted: np.ndarray  # (K,) draft tokens uploaded
    accepted: np.ndarray  # (K,) of them accepted
    # (t, draft lengths) whenever the lengths in force changed, the first at t = 0
    draft_len_changes: list[tuple[float, np.ndarray]] = field(default_factory=list)
    # (P, K) tokens delivered in each phase: before the first change time, between each
    # change time and the next, after the last
    phase_tokens: np.ndarray = field(default_factory=lambda: np.zeros((1, 0)))

    @property
    def user_goodput_tok_s(self) -> np.ndarray:
        return self.tokens / self.seconds

    @property
    def goodput_tok_s(self) -> float:
        return float(self.tokens.sum() / self.seconds)


def _draw_accepted(
    users: UserParams, draft_len: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(K,) leading accepted drafts of one round, drawn position by position."""
    depth = max(int(draft_len.max(initial=0)), 1)
    accepted = rng.random((depth, users.num_users)) < users.acceptance.position_probs(depth)
    within = np.arange(depth)[:, None] < draft_len
    return np.cumprod(accepted & within, axis=0).sum(axis=0)


class SyncSimulation:
    """Synchronous rounds of ``system`` whose users' truth at time t is ``users_at(t)``,
    changing at ``change_times``; lengths and shares from ``decider``."""

    def __init__(
        self,
        system: SystemParams,
        users_at: Callable[[float], UserParams],
        decider: Decider,
        change_times: Sequence[float] = (),
        seed: int = 0,
        trace: AcceptanceTrace | None = None,
    ) -> None:
        self.system = system
        self.users_at = users_at
        self.decider = decider
        self.change_times = sorted(change_times)
        self.rng = np.random.default_rng(seed)
        self.trace = trace
        self._events: list[tuple[float, int, str, int]] = []
        self._seq = 0

    def _push(self, t: float, kind: str, device: int = -1) -> None:
        heapq.heappush(self._events, (t, self._seq, kind, device))
        self._seq += 1

    def _accepted(self, users: UserParams, draft_len: np.ndarray,
                  round_index: int) -> np.ndarray:
        if self.trace is None:
            return _draw_accepted(users, draft_len, self.rng)
        if (draft_len > self.trace.drafted).any():
            raise ValueError(f"the trace holds {self.trace.drafted.tolist()} drafts per round; "
                             f"cannot replay draft lengths {draft_len.tolist()}")
        return np.array([min(int(runs[round_index % runs.size]), int(length))
                         for runs, length in zip(self.trace.runs, draft_len, strict=True)])

    def run(self, seconds: float,
            progress: Callable[[float], None] | None = None) -> SimulationResult:
        """Simulate ``seconds`` of simulated time; tokens count when their verdict is out.
        ``progress(now)`` is called after every round."""
        if not 0 < seconds < np.inf:
            raise ValueError(f"simulated seconds must be finite and > 0, got {seconds}")
        most = seconds / self.system.verify_time.base_s
        if most > MAX_ROUNDS:
            raise ValueError(
                f"{seconds:g} simulated s of rounds as short as T_v's base "
                f"({self.system.verify_time.base_s:g} s) could be {most:.3g} rounds, more than "
                f"{MAX_ROUNDS:,}: simulate less time")
        self._events.clear()  # a run starts from nothing: runs may repeat
        users = self.users_at(0.0)
        k = users.num_users
        if self.trace is not None and len(self.trace.runs) != k:
            raise ValueError(f"the trace holds {len(self.trace.runs)} devices, not {k}")
        now_in_force = self._checked(self.decider.start(self.system, users), k)
        pending: Decisions | None = None  # takes effect when the next round begins
        result = SimulationResult(seconds, np.zeros(k), 0, np.zeros(k), np.zeros(k),
                                  phase_tokens=np.zeros((len(self.change_times) + 1, k)))
        result.draft_len_changes.append((0.0, now_in_force.draft_len))
        for t in self.change_times:
            self._push(t, DRIFT)
        started, arrived = 0.0, np.full(k, np.nan)
        draft_s = bits = np.zeros(k)

        def begin_round(now: float) -> None:
            nonlocal started, now_in_force, pending, draft_s, bits
            if pending is not None:
                if not np.array_equal(pending.draft_len, now_in_force.draft_len):
                    result.draft_len_changes.append((now, pending.draft_len))
                now_in_force, pending = pending, None
            started = now
            arrived.fill(np.nan)
            draft_s = now_in_force.draft_len * users.draft_s_per_token
            bits = np.broadcast_to(self.system.upload_bits(now_in_force.draft_len), (k,))
            for device in range(k):
                self._push(now + draft_s[device], DRAFTED, device)

        begin_round(0.0)
        while self._events:
            now, _, kind, device = heapq.heappop(self._events)
            if now > seconds:
                break
            if kind == DRIFT:
                users = self.users_at(now)
                changed = self.decider.on_drift(now, users)
                pending = pending if changed is None else self._checked(changed, k)
            elif kind == DRAFTED:
                rate = (now_in_force.share[device] * self.system.bandwidth_hz
                        * users.spectral_efficiency[device])
                upload_s = (0.0 if bits[device] <= 0 else bits[device] / rate if rate > 0
                            else np.inf)  # no share for a non-empty upload: it never arrives
                self._push(now + upload_s + users.delay_s[device], ARRIVED, device)
            elif kind == ARRIVED:
                arrived[device] = now
                if not np.isnan(arrived).any():
                    tokens = int(np.sum(now_in_force.draft_len + 1))
                    self._push(now + float(self.system.verify_time.of_tokens(tokens)), VERIFIED)
            else:  # VERIFIED: verdicts out, the next round begins
                draft_len = now_in_force.draft_len
                accepted = self._accepted(users, draft_len, result.rounds)
                result.tokens += accepted + 1
                result.phase_tokens[bisect.bisect_right(self.change_times, now)] += accepted + 1
                result.drafted += draft_len
                result.accepted += accepted
                result.rounds += 1
                record = RoundRecord(started, draft_len, draft_s, bits, arrived.copy(),
                                     now - float(arrived.max()), accepted)
                changed = self.decider.after_round(now, record)
                pending = pending if changed is None else self._checked(changed, k)
                begin_round(now)
                if progress is not None:
                    progress(now)
        return result

    def _checked(self, decisions: Decisions, k: int) -> Decisions:
        draft_len = np.asarray(decisions.draft_len, dtype=int).reshape(-1)
        share = np.asarray(decisions.share, dtype=float).reshape(-1)
        if draft_len.shape != (k,) or share.shape != (k,):
            raise ValueError(f"decisions for {draft_len.size} devices, expected {k}")
        if (draft_len < 0).any() or (draft_len > self.system.max_draft_len).any():
            raise ValueError(f"draft lengths {draft_len.tolist()} outside 0..L_max")
        return Decisions(draft_len, share)
