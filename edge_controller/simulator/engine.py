"""The discrete-event simulator: the project's one simulator, of synchronous rounds
(SyncSimulation) and of continuous batching and proactive drafting (ServingSimulation).

Events of synchronous rounds, on one simulated clock (seconds):

    DRAFTED k    device k finished drafting its L_k tokens (L_k t_k after the round began)
    ARRIVED k    its upload of b0 + L_k b bits at beta_k B s_k bit/s and its delay d_k
                 are behind it: the draft is at the verifier
    VERIFIED     the round closed on the last arrival and the batch of sum_k (L_k + 1)
                 tokens was verified (T_v); every device gets its accepted drafts and one
                 correction/bonus token, and the next round begins
    DRIFT        the scenario's true parameters change ([[drift]] entries)

Events of continuous batching (each device cycles on its own, docs/scheduling.md):

    DRAFTED k    device k finished drafting (less what it pre-drafted, if proactive)
    ARRIVED k    its upload and delay are behind it: the draft waits at the verifier
    FORWARDED    the forward in flight is done: its devices get their verdicts and start
                 drafting again; every draft waiting (oldest first, within the token
                 budget) goes into the next forward
    LAUNCH       an idle verifier starts a forward, after everything else at the same
                 instant (the controller takes every message in before its next forward:
                 drafts that arrive together go together)
    DRIFT        as above

Proactive drafting: between its upload and its verdict a device drafts on (its guess,
then up to L more, within the cap, at its drafting speed); the verdict confirms the guess
when all of the draft was accepted and the draft's guess matches the bonus token, which
happens as often as a draft token at the next position is accepted (drawn from the
acceptance model; a trace replays it); the next draft then starts with what was drafted
past the guess.

Each leg uses the parameters true when it starts. Acceptance is drawn position by position
from the device's true acceptance model (geometric or a curve), or replayed from a
recorded trace. A *decider* chooses the lengths and shares: a fixed plan, the oracle (who
knows the truth and re-solves when it changes) or the live controller's DraftController,
fed what the controller would observe (edge_controller/simulator/deciders.py).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edge_controller.control.model import SystemParams, UserParams
from edge_controller.protocol import confidence_byte

DRAFTED, ARRIVED, VERIFIED, DRIFT = "drafted", "arrived", "verified", "drift"
FORWARDED, LAUNCH = "forwarded", "launch"
MAX_ROUNDS = 5_000_000  # every round lasts at least T_v's base: seconds / base_s bounds them


@dataclass(frozen=True)
class AcceptanceTrace:
    """Measured acceptance per device: runs[k][r] = leading drafts accepted in recorded
    round r of device k, which drafted drafted[k] tokens. Replaying a length
    L_k <= drafted[k] is exact: accepted = min(run, L_k); rounds replay cyclically.
    With ``confidence`` (confidence[k][r, i]: the draft model's top-1 probability at
    position i of that draft) a stopping threshold h_k replays too: the draft ends before
    the first position below h_k."""

    runs: tuple[np.ndarray, ...]
    drafted: np.ndarray  # (K,)
    confidence: tuple[np.ndarray, ...] | None = None  # (rounds, drafted[k]) per device

    @classmethod
    def from_indicators(cls, indicators: Sequence[np.ndarray]) -> AcceptanceTrace:
        """Per device a (rounds, positions) 0/1 array: was draft position i accepted."""
        arrays = [np.asarray(x, dtype=bool) for x in indicators]
        runs = tuple(np.cumprod(x, axis=1).sum(axis=1) for x in arrays)
        return cls(runs, np.array([x.shape[1] for x in arrays]))


@dataclass(frozen=True)
class Decisions:
    draft_len: np.ndarray  # (K,) int: with stopping thresholds, caps
    share: np.ndarray  # (K,) beta_k
    # (K,) h_k; not None: the drafts report their confidences (8 bits a position more)
    stop_confidence: np.ndarray | None = None


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
    # per device the draft's confidences as the wire carries them (draft.confidence);
    # empty where the acceptance replayed has none
    confidence: tuple[bytes, ...] = ()


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
    rounds: int  # synchronous rounds; forwards under continuous or proactive serving
    drafted: np.ndarray  # (K,) draft tokens uploaded
    accepted: np.ndarray  # (K,) of them accepted
    # (t, draft lengths) whenever the lengths in force changed, the first at t = 0
    draft_len_changes: list[tuple[float, np.ndarray]] = field(default_factory=list)
    # (P, K) tokens delivered in each phase: before the first change time, between each
    # change time and the next, after the last
    phase_tokens: np.ndarray = field(default_factory=lambda: np.zeros((1, 0)))
    busy_s: float = 0.0  # time the verifier spent in forwards
    predraft_paid: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (K,) proactive

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


class _Simulation:
    """What both simulations share: the event queue, acceptance, decisions, the start."""

    def __init__(
        self,
        system: SystemParams,
        users_at: Callable[[float], UserParams],
        decider: Decider,
        change_times: Sequence[float] = (),
        seed: int = 0,
        trace: AcceptanceTrace | None = None,
        marks: Sequence[float] = (),
    ) -> None:
        self.system = system
        self.users_at = users_at
        self.decider = decider
        self.change_times = sorted(change_times)
        # where result.phase_tokens splits: the changes, and any marks (a warm-up's end)
        self.phase_bounds = sorted(set(self.change_times) | set(marks))
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

    def _start(self, seconds: float) -> tuple[UserParams, Decisions, SimulationResult]:
        """A run starts from nothing (runs may repeat): the first truth and decisions, an
        empty result, the drifts queued."""
        if not 0 < seconds < np.inf:
            raise ValueError(f"simulated seconds must be finite and > 0, got {seconds}")
        most = seconds / self.system.verify_time.base_s
        if most > MAX_ROUNDS:
            raise ValueError(
                f"{seconds:g} simulated s of forwards as short as T_v's base "
                f"({self.system.verify_time.base_s:g} s) could be {most:.3g} of them, more "
                f"than {MAX_ROUNDS:,}: simulate less time")
        self._events.clear()
        users = self.users_at(0.0)
        k = users.num_users
        if self.trace is not None and len(self.trace.runs) != k:
            raise ValueError(f"the trace holds {len(self.trace.runs)} devices, not {k}")
        decisions = self._checked(self.decider.start(self.system, users), k)
        result = SimulationResult(seconds, np.zeros(k), 0, np.zeros(k), np.zeros(k),
                                  phase_tokens=np.zeros((len(self.phase_bounds) + 1, k)),
                                  predraft_paid=np.zeros(k))
        result.draft_len_changes.append((0.0, decisions.draft_len))
        for t in self.change_times:
            self._push(t, DRIFT)
        return users, decisions, result

    def _happenings(self, seconds: float) -> Iterator[tuple[float, str, int]]:
        """(time, kind, device) of each event in time order, up to ``seconds``."""
        while self._events:
            now, _, kind, device = heapq.heappop(self._events)
            if now > seconds:
                return
            yield now, kind, device

    def _drifted(self, now: float, k: int) -> tuple[UserParams, Decisions | None]:
        """The truth at a drift, and the decider's new decisions (None: unchanged)."""
        users = self.users_at(now)
        changed = self.decider.on_drift(now, users)
        return users, None if changed is None else self._checked(changed, k)

    def _checked(self, decisions: Decisions, k: int) -> Decisions:
        draft_len = np.asarray(decisions.draft_len, dtype=int).reshape(-1)
        share = np.asarray(decisions.share, dtype=float).reshape(-1)
        if draft_len.shape != (k,) or share.shape != (k,):
            raise ValueError(f"decisions for {draft_len.size} devices, expected {k}")
        if (draft_len < 0).any() or (draft_len > self.system.max_draft_len).any():
            raise ValueError(f"draft lengths {draft_len.tolist()} outside 0..L_max")
        stop = decisions.stop_confidence
        if stop is not None:
            stop = np.asarray(stop, dtype=float).reshape(-1)
            if stop.shape != (k,) or ((stop > 0).any() and (self.trace is None
                                                           or self.trace.confidence is None)):
                raise ValueError("stopping thresholds need one per device and a replay of "
                                 "drafts with their confidences")
        return Decisions(draft_len, share, stop)

    def _stopped(self, decisions: Decisions, round_index: int
                 ) -> tuple[np.ndarray, np.ndarray, tuple[bytes, ...]]:
        """(drafted, evaluated, confidences) of one round's drafts under the decisions'
        caps and thresholds: a draft stopped before position i evaluated i + 1 positions
        (the declined one too) and reports the declined one's confidence."""
        cap, stop = decisions.draft_len, decisions.stop_confidence
        if stop is None or self.trace is None or self.trace.confidence is None:
            return cap, cap, ()
        drafted, evaluated, reported = cap.copy(), cap.copy(), []
        for k, (conf, h) in enumerate(zip(self.trace.confidence, stop, strict=True)):
            row = conf[round_index % conf.shape[0]]
            below = np.flatnonzero(row[:cap[k]] < h)
            if below.size:
                drafted[k], evaluated[k] = below[0], below[0] + 1
            reported.append(bytes(confidence_byte(p) for p in row[:evaluated[k]]))
        return drafted, evaluated, tuple(reported)

    def _upload_s(self, users: UserParams, decisions: Decisions, device: int,
                  bits: float) -> float:
        rate = (decisions.share[device] * self.system.bandwidth_hz
                * users.spectral_efficiency[device])
        return 0.0 if bits <= 0 else bits / rate if rate > 0 else np.inf  # no share: never


class SyncSimulation(_Simulation):
    """Synchronous rounds of ``system`` whose users' truth at time t is ``users_at(t)``,
    changing at ``change_times``; lengths and shares from ``decider``."""

    def run(self, seconds: float,
            progress: Callable[[float], None] | None = None) -> SimulationResult:
        """Simulate ``seconds`` of simulated time; tokens count when their verdict is out.
        ``progress(now)`` is called after every round."""
        users, now_in_force, result = self._start(seconds)
        k = users.num_users
        pending: Decisions | None = None  # takes effect when the next round begins
        started, arrived = 0.0, np.full(k, np.nan)
        draft_s = bits = np.zeros(k)
        drafted, reported = now_in_force.draft_len, ()

        def begin_round(now: float) -> None:
            nonlocal started, now_in_force, pending, draft_s, bits, drafted, reported
            if pending is not None:
                if not np.array_equal(pending.draft_len, now_in_force.draft_len):
                    result.draft_len_changes.append((now, pending.draft_len))
                now_in_force, pending = pending, None
            started = now
            arrived.fill(np.nan)
            drafted, evaluated, reported = self._stopped(now_in_force, result.rounds)
            draft_s = evaluated * users.draft_s_per_token
            bits = np.broadcast_to(self.system.upload_bits(drafted), (k,)) + 8.0 * np.array(
                [len(c) for c in reported] or 0)
            for device in range(k):
                self._push(now + draft_s[device], DRAFTED, device)

        begin_round(0.0)
        for now, kind, device in self._happenings(seconds):
            if kind == DRIFT:
                users, changed = self._drifted(now, k)
                pending = pending if changed is None else changed
            elif kind == DRAFTED:
                upload_s = self._upload_s(users, now_in_force, device, bits[device])
                self._push(now + upload_s + users.delay_s[device], ARRIVED, device)
            elif kind == ARRIVED:
                arrived[device] = now
                if not np.isnan(arrived).any():
                    tokens = int(np.sum(drafted + 1))
                    self._push(now + float(self.system.verify_time.of_tokens(tokens)), VERIFIED)
            else:  # VERIFIED: verdicts out, the next round begins
                draft_len = drafted
                accepted = self._accepted(users, draft_len, result.rounds)
                result.tokens += accepted + 1
                result.phase_tokens[bisect.bisect_right(self.phase_bounds, now)] += accepted + 1
                result.drafted += draft_len
                result.accepted += accepted
                result.rounds += 1
                result.busy_s += now - float(arrived.max())
                record = RoundRecord(started, draft_len, draft_s, bits, arrived.copy(),
                                     now - float(arrived.max()), accepted, reported)
                changed = self.decider.after_round(now, record)
                pending = pending if changed is None else self._checked(changed, k)
                begin_round(now)
                if progress is not None:
                    progress(now)
        return result


class ServingSimulation(_Simulation):
    """Continuous batching (and with ``proactive``, proactive drafting up to
    ``predraft_len`` tokens past an upload) of ``system``; the truth and decisions as
    SyncSimulation's, a device taking new decisions at its next draft. Deciders see no
    rounds here (``after_round`` is not called): fixed plans and the oracle."""

    def __init__(self, system: SystemParams, users_at: Callable[[float], UserParams],
                 decider: Decider, change_times: Sequence[float] = (), seed: int = 0,
                 trace: AcceptanceTrace | None = None, proactive: bool = False,
                 predraft_len: int = 16, batch_tokens: int = 256,
                 marks: Sequence[float] = ()) -> None:
        super().__init__(system, users_at, decider, change_times, seed, trace, marks)
        if batch_tokens < system.max_draft_len + 1:
            raise ValueError("batch_tokens must hold the longest draft (max_draft_len + 1)")
        self.proactive = proactive
        self.predraft_len = predraft_len
        self.batch_tokens = batch_tokens

    def _verdict(self, users: UserParams, device: int, draft_len: int,
                 index: int) -> tuple[int, bool]:
        """(leading drafts accepted, the guess of the bonus token right) for one draft."""
        if self.trace is not None:
            runs, drafted = self.trace.runs[device], int(self.trace.drafted[device])
            if draft_len > drafted:
                raise ValueError(f"the trace holds {drafted} drafts per round for device "
                                 f"{device}; cannot replay draft length {draft_len}")
            if self.proactive and draft_len >= drafted:
                raise ValueError(f"the trace holds {drafted} drafts per round for device "
                                 f"{device}: whether a guess after {draft_len} is right "
                                 "needs one more; replay shorter drafts")
            run = int(runs[index % runs.size])
            return min(run, draft_len), run > draft_len
        probs = users.acceptance.position_probs(draft_len + 1)[:, device]
        passed = self.rng.random(draft_len + 1) < probs
        accepted = int(np.cumprod(passed[:draft_len]).sum())
        return accepted, accepted == draft_len and bool(passed[draft_len])

    def run(self, seconds: float,
            progress: Callable[[float], None] | None = None) -> SimulationResult:
        """Simulate ``seconds``; tokens count when their verdict is out. ``progress(now)``
        is called after every forward."""
        users, in_force, result = self._start(seconds)
        k = users.num_users
        length = np.zeros(k, dtype=int)  # of the draft each device has in flight
        sent_at = np.zeros(k)  # when its upload went out (pre-drafting starts)
        ahead = np.zeros(k, dtype=int)  # drafted past a confirmed guess
        drafts = np.zeros(k, dtype=int)  # drafts verified per device (trace replay)
        waiting: list[int] = []  # devices whose draft is in, oldest first
        in_forward: list[int] = []

        def start_draft(device: int, now: float) -> None:
            length[device] = in_force.draft_len[device]
            used = min(int(length[device]), int(ahead[device]))
            ahead[device] = 0
            self._push(now + (length[device] - used) * users.draft_s_per_token[device],
                       DRAFTED, device)

        def launch(now: float) -> None:
            tokens = 0
            while waiting and (not in_forward or tokens + length[waiting[0]] + 1
                               <= self.batch_tokens):
                device = waiting.pop(0)
                in_forward.append(device)
                tokens += int(length[device]) + 1
            forward_s = float(self.system.verify_time.of_tokens(tokens))
            result.busy_s += min(forward_s, seconds - now)  # within the run
            self._push(now + forward_s, FORWARDED)

        for device in range(k):
            start_draft(device, 0.0)
        for now, kind, device in self._happenings(seconds):
            if kind == DRIFT:
                users, changed = self._drifted(now, k)
                if changed is not None:
                    in_force = changed
                    result.draft_len_changes.append((now, in_force.draft_len))
            elif kind == DRAFTED:
                # b0 and b may be per device (a trial's measured upload laws)
                bits = float(np.broadcast_to(self.system.upload_bits(length), (k,))[device])
                upload_s = self._upload_s(users, in_force, device, bits)
                sent_at[device] = now + upload_s
                self._push(now + upload_s + users.delay_s[device], ARRIVED, device)
            elif kind == ARRIVED:
                waiting.append(device)
                if not in_forward and len(waiting) == 1:
                    # after whatever else happens at this instant, as the controller's
                    # loop takes every message in before its next forward
                    self._push(now, LAUNCH)
            elif kind == LAUNCH:
                if waiting and not in_forward:
                    launch(now)
            else:  # FORWARDED: verdicts out; those drafts' devices draft again
                phase = bisect.bisect_right(self.phase_bounds, now)
                for member in in_forward:
                    draft_len = int(length[member])
                    accepted, guessed = self._verdict(users, member, draft_len,
                                                      int(drafts[member]))
                    drafts[member] += 1
                    result.tokens[member] += accepted + 1
                    result.phase_tokens[phase, member] += accepted + 1
                    result.drafted[member] += draft_len
                    result.accepted[member] += accepted
                    free_at = now
                    if self.proactive:
                        done = self._predrafted(users, member, draft_len,
                                                now - sent_at[member])
                        # the token in hand when the verdict came is finished first
                        free_at = max(now, sent_at[member]
                                      + done * float(users.draft_s_per_token[member]))
                        if done and guessed:
                            ahead[member] = done - 1
                            result.predraft_paid[member] += 1
                    start_draft(member, free_at)
                in_forward.clear()
                result.rounds += 1
                if waiting:
                    self._push(now, LAUNCH)
                if progress is not None:
                    progress(now)
        return result

    def _predrafted(self, users: UserParams, device: int, draft_len: int,
                    window_s: float) -> int:
        """Tokens drafted past an upload whose verdict came ``window_s`` after it, the
        guess included: every token begun before the verdict (the agent finishes the one
        in hand), at most 1 + L within the cap; none where the agent would not pre-draft
        (fewer than 2 allowed)."""
        most = min(1 + draft_len, self.predraft_len)
        if most < 2:
            return 0
        t = float(users.draft_s_per_token[device])
        return most if t <= 0 else min(most, int(window_s // t) + 1)
