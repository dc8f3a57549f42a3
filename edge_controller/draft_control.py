"""Live draft control: estimates per device in, draft lengths and uplink shares out.

The controller feeds this class what it observes (draft frames and their timing,
verification outcomes, round times, device telemetry); ``maybe_resolve`` re-solves the
configured policy (edge_controller/control) when devices join or leave or an estimate
moved, never per token, and returns the decisions that changed, for the controller to push.

What each model input is estimated from (symbols of docs/system-model.md):

* ``a_k``: censored acceptance from verdicts (AcceptanceEstimate): the geometric rate, or
  with ``control.acceptance = "curve"`` the per-position curve ``p_i`` (docs/system-model.md),
  once ``MIN_JUDGED`` draft positions were judged;
* ``t_k``: the device's own drafting time per token, reported in every draft;
* ``b0, b``: an affine fit of the draft frames' size against their length, per device;
* ``d_k``: the rest of the device's round: (draft arrival - verdict sent) - drafting -
  paced upload. It holds the link's round trip and any queueing;
* ``s_k``: spectral efficiency reported by the device (its radio; an emulated one in
  trials), else ``control.spectral_efficiency``;
* ``T_v``: an affine fit of round verification time against sum (L_k + 1), seeded from
  ``control.verify_time_file`` or a start-up calibration on this machine, refined every
  round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from edge_controller.config import CONFIDENCE_POLICY, ControlConfig
from edge_controller.control import (
    GeometricAcceptance,
    Plan,
    PositionAcceptance,
    SystemParams,
    UserParams,
    VerifyTime,
)
from edge_controller.control.bandit import (
    ONLINE_POLICIES,
    LengthBandit,
    delay_bucket,
    round_cost,
)
from edge_controller.control.confidence import confidence_plan, stopping_rates
from edge_controller.control.estimators import (
    AcceptanceEstimate,
    AffineFit,
    ConfidenceEstimate,
    RunningMean,
)
from edge_controller.control.serving import DEFAULT_PREDRAFT_LEN, plan_for
from edge_controller.control.solvers import WARM_STARTED, equal_share_plan
from edge_controller.protocol import CONFIDENCE_SCALE
from edge_controller.verifier.slots import SamplingParams, VerifyItem

log = logging.getLogger(__name__)

FIXED_POLICY = "fixed"  # the configured draft_len for everyone, unpaced uploads
MIN_JUDGED = 8  # draft positions judged before a device's acceptance estimate is used
MIN_CONFIDENCE_DRAFTS = 8  # drafts with confidences before a device is given a threshold
# devices x (L_max + 1) the confidence plan takes: its E[max] costs the square of it
# (~0.4 s a solve at 16 devices x 17 lengths, on the controller's loop)
MAX_CONFIDENCE_SUPPORT = 16 * 17


@dataclass(frozen=True)
class Decision:
    draft_len: int
    bandwidth_share: float
    uplink_rate_bps: float  # beta_k B s_k; 0 = unpaced
    stop_confidence: float = 0.0  # h_k: the confidence policy's stopping threshold
    report_confidence: bool = False  # its drafts carry their confidences


@dataclass
class DeviceEstimates:
    spectral_efficiency: float
    acceptance: AcceptanceEstimate
    draft_s_per_token: RunningMean = field(default_factory=RunningMean)
    delay_s: RunningMean = field(default_factory=RunningMean)
    upload_bits: AffineFit = field(default_factory=lambda: AffineFit(forget=0.95))
    tokens_per_round: RunningMean = field(default_factory=RunningMean)
    round_period_s: RunningMean = field(default_factory=RunningMean)
    last_verdict_at: float | None = None
    prev_verdict_at: float | None = None  # the one before: when this round began for it
    # the last draft's reported drafting time and the time its per-token bits took at the
    # paced rate (online policies' round credit)
    last_draft: tuple[float, float] | None = None
    drafted_under: tuple[int, float] = (0, 0.0)  # the last draft's cap and h in force
    bandits: dict[int, LengthBandit] = field(default_factory=dict)  # online*: per bucket
    confidence: ConfidenceEstimate = field(default_factory=ConfidenceEstimate)

    @property
    def goodput_tok_s(self) -> float:
        if self.tokens_per_round.value is None or not self.round_period_s.value:
            return 0.0
        return self.tokens_per_round.value / self.round_period_s.value

    def upload_law(self, default_overhead_bits: float, default_bits: float) -> tuple[float, float]:
        """(b0, b) of this device's uploads: fitted once two draft lengths were seen."""
        if self.upload_bits.ready:
            return self.upload_bits.coefficients()
        return default_overhead_bits, default_bits


class DraftController:
    def __init__(self, config: ControlConfig, verify_time: AffineFit,
                 max_delay_s: float = float("inf"), scheduler: str = "sync",
                 predraft_len: int = DEFAULT_PREDRAFT_LEN):
        self.config = config
        # The serving the plans are for: synchronous rounds, or continuous batching and
        # proactive drafting with their own model (control/serving.py).
        self.scheduler = scheduler
        self.predraft_len = predraft_len
        self.verify_time = verify_time
        # The round waits for no device longer than its deadline, so no plan may either: a
        # device slower than that (or claiming to be) must not stretch everyone's round.
        self.max_delay_s = max_delay_s
        self.devices: dict[str, DeviceEstimates] = {}
        self.decisions: dict[str, Decision] = {}
        self.active: set[str] = set()  # devices with a request in flight: the round's members
        self._planned: set[str] = set()  # devices some plan has decided for
        self.plan_goodput_tok_s = 0.0
        self._solved_inputs: np.ndarray | None = None
        self._last_plan: tuple[list[str], Plan] | None = None  # warm start of the next solve
        self._membership_changed = True
        self._last_solve = -np.inf
        self._round_tokens = self._round_seconds = 0.0  # online*: the rounds' goodput
        self._rounds_learnt = 0  # online*: rounds credited (whose turn it is to explore)

    # ---- observations ----------------------------------------------------------------
    def join(self, device_id: str) -> Decision:
        self.devices[device_id] = DeviceEstimates(
            self.config.spectral_efficiency,
            AcceptanceEstimate(depth=max(self.config.max_draft_len, 1)))
        self.decisions[device_id] = self._initial_decision(device_id)
        self._membership_changed = True
        return self.decisions[device_id]

    def leave(self, device_id: str) -> None:
        self.devices.pop(device_id, None)
        self.decisions.pop(device_id, None)
        self.active.discard(device_id)
        self._planned.discard(device_id)
        self._membership_changed = True

    def on_request_start(self, device_id: str) -> dict[str, Decision]:
        """The device joins the rounds. Until a plan covers them, the devices in rounds
        share the band equally (idle registered ones take none): returns the decisions
        this changed for the others, for the controller to push."""
        self.active.add(device_id)
        self._membership_changed = True
        changed = {}
        for other in self.active - self._planned:
            decision = self._initial_decision(other)
            if decision != self.decisions.get(other):
                self.decisions[other] = decision
                if other != device_id:
                    changed[other] = decision
        return changed

    def on_draft(self, device_id: str, draft_len: int, draft_s: float, frame_bytes: int,
                 gap_s: float, first_round: bool = False, predrafted: int = 0,
                 declined: bool = False) -> None:
        """A draft arrived ``gap_s`` after the device's last verdict (or control) was sent.

        A request's first draft also paid for evaluating the prompt on the device: it tells
        the upload size, not the drafting speed or the delay. Of a proactive device's draft,
        ``predrafted`` tokens were drafted before that verdict: ``draft_s`` is the time
        spent on the rest. A draft that stopped on low confidence (``declined``) spent an
        evaluation on the token it declined too."""
        est = self.devices[device_id]
        decision = self.decisions[device_id]
        est.drafted_under = (decision.draft_len, decision.stop_confidence)
        est.upload_bits.update(draft_len, 8 * frame_bytes)
        if first_round:
            return
        # only a draft that could have stopped did (below its cap, with an h in force)
        declined = declined and draft_len < decision.draft_len and decision.stop_confidence > 0
        evaluated = draft_len - predrafted + declined
        if evaluated > 0 and draft_s >= 0:
            est.draft_s_per_token.update(draft_s / evaluated)
        rate = decision.uplink_rate_bps
        upload_s = 8 * frame_bytes / rate if rate > 0 else 0.0
        est.delay_s.update(max(gap_s - draft_s - upload_s, 0.0))
        _, per_token_bits = est.upload_law(self.config.overhead_bits, self.config.bits_per_token)
        est.last_draft = (draft_s, draft_len * per_token_bits / rate if rate > 0 else 0.0)

    def on_verdict(self, device_id: str, accepted: int, drafted: int, committed: int,
                   now: float, confidence: bytes = b"") -> None:
        """A verdict went out; ``confidence``: the draft's (draft.confidence), if any."""
        est = self.devices[device_id]
        est.acceptance.update(accepted, drafted)
        if confidence and self.decisions[device_id].report_confidence and _consistent(
                confidence, drafted, *est.drafted_under):
            est.confidence.update(confidence, drafted, accepted, est.drafted_under[1])
        est.tokens_per_round.update(committed)
        if est.last_verdict_at is not None:
            est.round_period_s.update(now - est.last_verdict_at)
        est.prev_verdict_at, est.last_verdict_at = est.last_verdict_at, now

    def on_request_end(self, device_id: str) -> None:
        """The device leaves the rounds; idle time between requests is not a round period."""
        if device_id in self.devices:
            est = self.devices[device_id]
            est.last_verdict_at = est.prev_verdict_at = est.last_draft = None
        if device_id in self.active:
            self.active.discard(device_id)
            self._membership_changed = True

    def on_round(self, tokens: int, seconds: float) -> None:
        self.verify_time.update(tokens, seconds)

    def on_telemetry(self, device_id: str, spectral_efficiency: float,
                     draft_s_per_token: float) -> None:
        est = self.devices[device_id]
        if spectral_efficiency > 0:
            est.spectral_efficiency = spectral_efficiency
        if draft_s_per_token > 0 and est.draft_s_per_token.value is None:
            est.draft_s_per_token.update(draft_s_per_token)

    def snapshot(self) -> dict[str, dict[str, float | None]]:
        """Every device's current estimates of the model inputs (status, timelines)."""
        snapshot = {}
        for device_id, est in self.devices.items():
            b0, b = est.upload_law(self.config.overhead_bits, self.config.bits_per_token)
            snapshot[device_id] = {
                # None until enough drafts were judged: a plan made from one unlucky round
                # can set everyone to L = 0, where acceptance is no longer observed.
                "acceptance": (est.acceptance.mean if est.acceptance.judged >= MIN_JUDGED
                               else None),
                "draft_s_per_token": est.draft_s_per_token.value,
                "delay_s": est.delay_s.value,
                "spectral_efficiency": est.spectral_efficiency,
                "overhead_bits": b0,
                "bits_per_token": b,
                "goodput_tok_s": est.goodput_tok_s,
            }
            if self.config.acceptance == "curve":
                snapshot[device_id]["acceptance_curve"] = est.acceptance.curve().tolist()
        return snapshot

    # ---- decisions -------------------------------------------------------------------
    def maybe_resolve(self, now: float | None = None) -> dict[str, Decision]:
        """Re-solve if due; return the decisions that changed (device id -> decision)."""
        now = time.monotonic() if now is None else now
        if self.config.policy == FIXED_POLICY or not self.devices:
            return {}
        if now - self._last_solve < self.config.resolve_interval_s:
            return {}
        # The round's members with measurements; a device still on its first draft keeps
        # its initial decision until it has some, without holding up everyone else's plan.
        snapshot = {d: e for d, e in self.snapshot().items() if d in self.active
                    and all(e[k] is not None for k in MODEL_INPUTS)}
        ids = sorted(snapshot)
        if not ids:
            return {}
        # With curves, a change of shape moves E[N(L_max)] even where the pooled rate stays.
        inputs = np.array([[snapshot[d][k] for k in MODEL_INPUTS]
                           + [1.0 + np.cumprod(snapshot[d].get("acceptance_curve", [])).sum()]
                           + self._confidence_inputs(d) for d in ids])
        moved = self._solved_inputs is None or self._solved_inputs.shape != inputs.shape or (
            np.abs(inputs - self._solved_inputs) > self.config.resolve_threshold
            * np.maximum(np.abs(self._solved_inputs), 1e-9)).any()
        if not (moved or self._membership_changed):
            return {}
        self._last_solve = now
        try:
            problem = problem_from_snapshot(snapshot, self.verify_time.coefficients(),
                                            self.config.bandwidth_hz, self.config.max_draft_len,
                                            self.max_delay_s)
            warm = (self._last_plan[1] if self._last_plan and self._last_plan[0] == ids
                    and self.config.policy in WARM_STARTED else None)
            started = time.perf_counter()
            thresholds = np.zeros(len(ids))
            if self.config.policy in ONLINE_POLICIES:
                # Lengths learnt, equal shares: a round's credit needs each device's own
                # finish time, which shares equalising finish times would hide.
                lengths = np.array([self.decisions[d].draft_len for d in ids])
                plan = equal_share_plan(self.config.policy, *problem, lengths)
            elif self.config.policy == CONFIDENCE_POLICY:
                plan, thresholds = self._confidence_plan(ids, problem, warm)
            else:
                options = ({"fixed_draft_len": self.config.draft_len}
                           if self.config.policy == "fixed-L" else {})
                plan = plan_for(self.scheduler, self.config.policy, *problem,
                                self.predraft_len, warm=warm, **options)
            solve_s = time.perf_counter() - started
            if not (np.isfinite(plan.bandwidth_share).all() and np.isfinite(plan.goodput_tok_s)):
                raise ValueError("the solver returned a plan with non-finite numbers")
        except ValueError as exc:
            log.warning("draft control: %s; keeping the current decisions", exc)
            return {}
        self._solved_inputs, self._membership_changed = inputs, False
        self._last_plan = (ids, plan)
        self.plan_goodput_tok_s = plan.goodput_tok_s
        changed = {}
        self._planned |= set(ids)
        for i, device_id in enumerate(ids):
            share = min(max(float(plan.bandwidth_share[i]), 0.0), 1.0)  # solver float noise
            # A zero share only happens when the model charges the upload nothing (the
            # serving model gives every uploading device a minimum share); the device
            # then goes unpaced (rate 0) rather than at a crawl.
            rate = share * self.config.bandwidth_hz * self.devices[device_id].spectral_efficiency
            decision = Decision(int(plan.draft_len[i]), share, rate, float(thresholds[i]),
                                self.config.policy == CONFIDENCE_POLICY)
            if decision != self.decisions.get(device_id):
                self.decisions[device_id] = changed[device_id] = decision
        log.info("draft control (%s, %s solve %.1f ms): predicted %.1f tok/s; %s",
                 self.config.policy, "warm" if warm else "cold", solve_s * 1e3,
                 plan.goodput_tok_s, ", ".join(
                     f"{d}: L={self.decisions[d].draft_len} "
                     f"share={self.decisions[d].bandwidth_share:.2f}"
                     + (f" h={self.decisions[d].stop_confidence:.1f}"
                        if self.decisions[d].report_confidence else "") for d in ids))
        return changed

    def _confidence_inputs(self, device_id: str) -> list[float]:
        """The confidence policy's inputs beyond the model's: p(h) and q(h) (all in
        [0, 1], most well away from 0: a bin's share moving from 0.001 to 0.002 is no
        news)."""
        if self.config.policy != CONFIDENCE_POLICY:
            return []
        est = self.devices[device_id].confidence
        p, q = stopping_rates(est.seen[None], est.reached[None], est.accept_rate()[None])
        # offset so that moves in rarely reached bins (p, q near 0) do not count as large
        return [*(p[0] + 1.0), *(q[0] + 1.0)]

    def _confidence_plan(self, ids: list[str], problem: tuple[SystemParams, UserParams],
                         warm: Plan | None) -> tuple[Plan, np.ndarray]:
        """Caps and thresholds (control/confidence.py) from the heterogeneous plan. A device
        that has not reported MIN_CONFIDENCE_DRAFTS drafts' confidences yet (or drafts
        nothing) is planned as one that never stops, at its acceptance estimate, h = 0
        (control.stop_confidence, where set, fixes one h for everyone)."""
        plan = plan_for("sync", "heterogeneous", *problem, warm=warm)
        if len(ids) * (self.config.max_draft_len + 1) > MAX_CONFIDENCE_SUPPORT:
            log.warning("draft control: %d devices x %d lengths is beyond the confidence "
                        "plan's size (%d); planning without stopping", len(ids),
                        self.config.max_draft_len + 1, MAX_CONFIDENCE_SUPPORT)
            return plan, np.zeros(len(ids))
        estimates = [self.devices[d].confidence for d in ids]
        p, q = stopping_rates(np.array([e.seen for e in estimates]),
                              np.array([e.reached for e in estimates]),
                              np.array([e.accept_rate() for e in estimates]))
        unknown = np.array([e.drafts < MIN_CONFIDENCE_DRAFTS for e in estimates])
        p[unknown] = 1.0
        q[unknown] = problem[1].acceptance.position_probs(1)[0][unknown, None]
        plan, h = confidence_plan(*problem, p, q, plan.draft_len, self.config.stop_confidence)
        return plan, np.where(unknown, self.config.stop_confidence, h)

    def on_round_result(self, played: dict[str, tuple[int, int, float]],
                        now: float) -> dict[str, Decision]:
        """Online policies, after a synchronous round whose verdicts went out at ``now``:
        ``played`` maps every draft the round verified to (its length, tokens committed,
        its arrival, on ``now``'s clock). The round began at the members' previous
        verdicts; each member that was in the round before it (not on a request's first
        draft, nor done) has its bandit credited (control/bandit.py) and its next length
        chosen. Returns the decisions that changed: they go with the next verdicts."""
        if self.config.policy not in ONLINE_POLICIES:
            return {}
        credited = [d for d in played if d in self.active and d in self.devices
                    and self.devices[d].prev_verdict_at is not None
                    and self.devices[d].last_draft is not None]
        if not credited:
            return {}
        start = max(self.devices[d].prev_verdict_at for d in credited)
        round_s = now - start
        if round_s <= 0:
            return {}
        ids = list(played)
        lengths = np.array([played[d][0] for d in ids])
        tokens = np.array([played[d][1] for d in ids], dtype=float)
        arrived = np.maximum(np.array([played[d][2] for d in ids]) - start, 0.0)
        self._round_tokens = 0.98 * self._round_tokens + tokens.sum()
        self._round_seconds = 0.98 * self._round_seconds + round_s
        goodput = self._round_tokens / self._round_seconds
        if self.config.policy == "online-naive":
            # the seed's naive UCB: each device alone, on the mean of its per-round ratios
            gains, costs, goodput = tokens / round_s, np.zeros(len(ids)), 0.0
        else:
            # Nothing drafted, a draft arrives its drafting and per-token upload time sooner;
            # a claimed drafting time beyond the arrival is clamped (only its own credit).
            draft_s, upload_s = np.array([
                (self.devices[d].last_draft if d in self.devices else None) or (0.0, 0.0)
                for d in ids]).T
            free = np.maximum(arrived - np.minimum(draft_s, arrived) - upload_s, 0.0)
            _, per_token_s = (self.verify_time.coefficients() if self.verify_time.ready
                              else (0.0, 0.0))
            gains, costs = tokens, round_cost(arrived, free, lengths, per_token_s)
        # One device explores per round, in turn (control/bandit.py); naive: all of them.
        turn = sorted(credited)
        self._rounds_learnt += 1
        explorer = turn[self._rounds_learnt % len(turn)]
        changed = {}
        for device_id, length, gain, cost in zip(ids, lengths, gains, costs, strict=True):
            if device_id not in credited:
                continue
            bandit = self._bandit(device_id)
            bandit.update(int(length), float(gain), float(cost))
            decision = self.decisions[device_id]
            choice = bandit.choose(goodput, explore=self.config.policy == "online-naive"
                                   or device_id == explorer)
            if choice != decision.draft_len:
                self.decisions[device_id] = changed[device_id] = Decision(
                    choice, decision.bandwidth_share, decision.uplink_rate_bps)
        return changed

    def _bandit(self, device_id: str) -> LengthBandit:
        est, config = self.devices[device_id], self.config
        edges = tuple(ms / 1e3 for ms in config.online_delay_buckets_ms)
        bucket = (delay_bucket(est.delay_s.value, edges)
                  if config.policy == "online-contextual" else 0)
        if bucket not in est.bandits:
            est.bandits[bucket] = LengthBandit(
                config.max_draft_len + 1, min(config.draft_len, config.max_draft_len),
                config.online_exploration,
                config.online_discount if config.policy == "online-discounted" else 1.0)
        return est.bandits[bucket]

    def _initial_decision(self, device_id: str) -> Decision:
        if self.config.policy == FIXED_POLICY:
            return Decision(self.config.draft_len, 1.0, 0.0)
        confidence = self.config.policy == CONFIDENCE_POLICY
        # Until estimates exist: the configured length, an equal share of the band among
        # the devices in the rounds (idle registered ones take none of it), at the rate
        # the device's radio reported (else control.spectral_efficiency).
        share = 1.0 / max(len(self.active), 1)
        rate = share * self.config.bandwidth_hz * self.devices[device_id].spectral_efficiency
        return Decision(self.config.draft_len, share, rate, report_confidence=confidence)


def _consistent(confidence: bytes, drafted: int, cap: int, stop_confidence: float) -> bool:
    """Could a device told (cap, h) have reported these confidences for ``drafted``
    tokens? Every drafted token at or above h, a declined one only below h and below the
    cap. Reports that could not be true are not learnt from (a pre-draft made under an
    older h may fail this honestly: it is only not learnt from either)."""
    edge = round(stop_confidence * CONFIDENCE_SCALE)
    drafted_ok = all(b >= edge for b in confidence[:drafted])
    if len(confidence) == drafted:
        return drafted_ok
    return drafted_ok and drafted < cap and confidence[drafted] < edge


MODEL_INPUTS = ("draft_s_per_token", "acceptance", "spectral_efficiency", "delay_s",
                "overhead_bits", "bits_per_token")


def problem_from_snapshot(
    estimates: dict[str, dict], verify_time: tuple[float, float], bandwidth_hz: float,
    max_draft_len: int = 16, max_delay_s: float = float("inf"),
) -> tuple[SystemParams, UserParams]:
    """The solvers' inputs from per-device estimates (``DraftController.snapshot()``, or a
    timeline's plan event), devices in sorted order; delays capped at ``max_delay_s``.
    Acceptance is the per-position curve where every device has one, else geometric."""
    ids = sorted(estimates)
    t, a, s, d, b0, b = np.array([[estimates[i][k] for k in MODEL_INPUTS] for i in ids]).T
    d = np.minimum(d, max_delay_s)
    curves = [estimates[i].get("acceptance_curve") for i in ids]
    acceptance = (PositionAcceptance(np.array(curves).T) if all(curves)
                  else GeometricAcceptance(a))
    system = SystemParams(
        bandwidth_hz=bandwidth_hz, bits_per_token=b, overhead_bits=b0,
        verify_time=VerifyTime(*verify_time), max_draft_len=max_draft_len,
    )
    return system, UserParams(t, acceptance, s, d, names=tuple(ids))


def calibrate_verify_time(verifier, vocab_size: int, fit: AffineFit, reps: int = 2) -> None:
    """Seed the T_v fit with timed rounds on this machine: batches of 1..4 sessions with
    drafts of 0 and 4 tokens over a short random prompt (a few seconds on a CPU)."""
    rng = np.random.default_rng(0)
    sessions = min(4, verifier.max_sessions)
    log.info("calibrating verification time on this machine (%d sessions) ...", sessions)
    slots = [verifier.open(rng.integers(0, vocab_size, 16).tolist()) for _ in range(sessions)]
    try:
        for draft_len in (0, 4):
            for k in sorted({1, sessions}):
                items = [VerifyItem(slot, rng.integers(0, vocab_size, draft_len).tolist(),
                                    SamplingParams()) for slot in slots[:k]]
                verifier.verify(items)  # warm-up; also moves the slots on, which is harmless
                for _ in range(reps):
                    started = time.perf_counter()
                    verifier.verify(items)
                    fit.update(k * (draft_len + 1), time.perf_counter() - started)
    finally:
        for slot in slots:
            verifier.close(slot)
    base_s, per_token_s = fit.coefficients()
    log.info("verification time: %.1f ms + %.2f ms per token", base_s * 1e3, per_token_s * 1e3)


def seed_from_law(fit: AffineFit, law, context: int) -> None:
    """``law(draft_lens, contexts)`` (seconds of a forward) evaluated at the batches the
    calibration times, at ``context``, into ``fit``."""
    for draft_len in (0, 4):
        for k in (1, 4):
            fit.update(k * (draft_len + 1), law([draft_len] * k, [context] * k))


def seed_verify_time(fit: AffineFit, path: str, context: int) -> None:
    """Seed the T_v fit from a ``scripts/bench_verify.py --sweep`` file instead of calibrating:
    its law evaluated at the same batches the calibration times, at a typical ``context``.
    Real rounds then refine it (the fit forgets)."""
    from edge_controller.verifier.cost import VerifyCost

    cost = VerifyCost.load(path)
    seed_from_law(fit, cost.predict, context)
    base_s, per_token_s = fit.coefficients()
    log.info("verification time from %s (%s form): %.1f ms + %.2f ms per token", path,
             cost.form, base_s * 1e3, per_token_s * 1e3)
