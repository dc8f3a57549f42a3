"""Multi-access draft control: choose draft lengths L_k and uplink shares beta_k.

Every policy has the signature ``policy(system, users, **options) -> Plan`` and is scored
by :func:`~edge_controller.control.model.evaluate`, so goodputs are comparable. Call them
by name through :func:`solve` / :data:`POLICIES` (Flower-strategy style). The derivations
and the optimality argument are in docs/system-model.md.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from edge_controller.control.model import (
    Plan,
    SystemParams,
    UserParams,
    compute_time_s,
    equalised_finish_time,
    equalised_finish_time_s,
    equalised_goodput,
    evaluate,
    finish_time_s,
    latest_of_others,
    shares_for_finish_time,
    upload_s_full_band,
)

logger = logging.getLogger(__name__)

Policy = Callable[..., Plan]

DEFAULT_FIXED_DRAFT_LEN = 4
BRUTE_FORCE_MAX_PLANS = 500_000
# heterogeneous: its tau grids, knapsack and warm starts
_GRID_BUDGET = 400_000  # finish-time points x K x (L_max + 1) per knapsack sweep
_MAX_POINTS = 48  # finish-time points of the first sweep, at most
_RANGE_POINTS = 32  # grid on which the range of useful finish times is bounded
_COMPUTE_BOUND_CANDIDATES = 4  # breakpoint plans scored exactly (small K)
_SLACK_MIN = 1e-4  # smallest slack above tau*(0) sampled (relative), small K
_WARM_WINDOW = 1.25  # a warm start sweeps tau within this factor of the previous plan's
_WARM_MIN_USERS = 32  # ...from this many devices on
_SORT_CUT_MAX = 40_000  # steps per finish time up to which the band price is found by sorting
_BUCKET_SHIFT = 48  # float64 bits kept for bucketing ratios: sign, exponent, 4 mantissa bits
_NAN_BUCKET = (0x7FF0_0000_0000_0000 >> _BUCKET_SHIFT) + 1  # inf's bucket is the last number
_TINY = np.finfo(float).tiny
_LARGEST = np.finfo(float).max


def _length_grid(system: SystemParams, num_users: int) -> np.ndarray:
    """(M, K) with row L = [L, ..., L]: every common draft length 0..L_max."""
    lengths = np.arange(system.max_draft_len + 1)[:, None]
    return np.broadcast_to(lengths, (lengths.shape[0], num_users))


def _equalised_plan(
    policy: str,
    system: SystemParams,
    users: UserParams,
    draft_len: np.ndarray,
    tau: float | None = None,
) -> Plan:
    """Plan with finish-time-equalising shares for given draft lengths (tau*(L) if known)."""
    if tau is None:
        tau = equalised_finish_time_s(system, users, draft_len)
    share = shares_for_finish_time(system, users, draft_len, tau)
    return evaluate(policy, system, users, draft_len, share)


def equal_share_plan(
    policy: str, system: SystemParams, users: UserParams, draft_len: np.ndarray
) -> Plan:
    """Plan with an equal share of the band for each device and the given lengths."""
    share = np.full(users.num_users, 1.0 / users.num_users)
    return evaluate(policy, system, users, draft_len, share)


def homogeneous(system: SystemParams, users: UserParams) -> Plan:
    """One L for all; shares equalise finish times (weak devices get more band).

    For each L in 0..L_max, tau*(L) is exact (see ``equalised_finish_time``); the best L
    is then found by enumeration, so the plan is optimal within rounding.
    """
    return _homogeneous(system, users, _Tables(system, users))[0]


def _homogeneous(
    system: SystemParams, users: UserParams, tables: _Tables
) -> tuple[Plan, np.ndarray]:
    """The homogeneous plan and tau*(L) of every common L (M,)."""
    taus = equalised_finish_time(tables.compute_s, tables.upload_s)
    lengths = tables.lengths[:, 0]
    round_s = taus + system.verify_time.of_tokens(users.num_users * (lengths + 1))
    best = int(np.argmax(tables.tokens.sum(axis=1) / round_s))
    draft_len = np.full(users.num_users, lengths[best])
    return _equalised_plan("homogeneous", system, users, draft_len, taus[best]), taus


def equal_best_len(system: SystemParams, users: UserParams) -> Plan:
    """Equal shares, the common L with the best goodput."""
    k = users.num_users
    lengths = _length_grid(system, k)
    round_time = finish_time_s(system, users, lengths, 1.0 / k).max(axis=-1)
    round_time = round_time + system.verify_time(lengths)
    goodput = users.acceptance.expected_tokens(lengths).sum(axis=-1) / round_time
    return equal_share_plan("equal-best-L", system, users, lengths[int(np.argmax(goodput))])


def agnostic(system: SystemParams, users: UserParams) -> Plan:
    """Equal shares, one L tuned for K copies of the average device (mean of each parameter)."""
    k = users.num_users
    average = users.average()
    lengths = np.arange(system.max_draft_len + 1)[:, None]  # (M, 1): one average device
    round_time = finish_time_s(system, average, lengths, 1.0 / k)[:, 0]
    round_time = round_time + system.verify_time(np.broadcast_to(lengths, (lengths.size, k)))
    goodput = k * average.acceptance.expected_tokens(lengths)[:, 0] / round_time
    draft_len = np.full(k, int(np.argmax(goodput)))
    return equal_share_plan("agnostic", system, users, draft_len)


def fixed_len(system: SystemParams, users: UserParams, fixed_draft_len: int | None = None) -> Plan:
    """Equal shares, one configured L for every device (default 4, a common library
    default, capped at L_max)."""
    if fixed_draft_len is None:
        fixed_draft_len = min(DEFAULT_FIXED_DRAFT_LEN, system.max_draft_len)
    if not 0 <= fixed_draft_len <= system.max_draft_len:
        raise ValueError(f"fixed_draft_len {fixed_draft_len} not in 0..{system.max_draft_len}")
    draft_len = np.full(users.num_users, fixed_draft_len)
    return equal_share_plan("fixed-L", system, users, draft_len)


def per_user_len(system: SystemParams, users: UserParams) -> Plan:
    """Equal shares, each device's own best L: the one maximising its own token rate
    E[N_k(L)] / (f_k(L) + T_v of its own L + 1 tokens) as if the round were its alone.

    That is what a device tuning itself from its own measurements would pick (seed 003's
    single-device optimum); it ignores the synchronous round and the shared verifier.
    """
    k = users.num_users
    lengths = _length_grid(system, k)
    own_time = finish_time_s(system, users, lengths, 1.0 / k)
    own_time = own_time + system.verify_time.of_tokens(lengths + 1)
    own_rate = users.acceptance.expected_tokens(lengths) / own_time
    return equal_share_plan("per-user-L", system, users, np.argmax(own_rate, axis=0))


_THRESHOLD_ITERATIONS = 8  # sweeps of responses; they settle in 2-4 on our scenarios
_THRESHOLD_TURNS_MAX = 32  # devices from which all respond at once (K solves per sweep)


def stopping_costs(
    system: SystemParams, users: UserParams, draft_len: np.ndarray, share: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(C_k, c_k): the round time C_k + c_k L while device k's own finish time is the
    round's latest, others' lengths and everyone's shares held: C_k = f_k(0) + T_v of the
    others' tokens and its own bonus token = d_k + b0 / r_k + T_v(...), and
    c_k = t_k + b / r_k + v1 (r_k = beta_k B s_k)."""
    k = users.num_users
    overhead = finish_time_s(system, users, np.zeros(k, dtype=int), share)  # d + b0 / r
    per_bit_s = np.ones(k) / (share * system.bandwidth_hz * users.spectral_efficiency)
    with np.errstate(invalid="ignore"):  # 0 bits at no share take no time (0 x inf)
        per_token_upload = np.nan_to_num(system.bits_per_token * per_bit_s, nan=0.0,
                                         posinf=np.inf)
    others = np.sum(np.asarray(draft_len) + 1) - (np.asarray(draft_len) + 1)
    fixed = overhead + system.verify_time.of_tokens(others + 1)
    per_token = users.draft_s_per_token + per_token_upload + system.verify_time.per_token_s
    return fixed, per_token


def own_round_times(
    system: SystemParams, users: UserParams, draft_len: np.ndarray, share: np.ndarray
) -> np.ndarray:
    """(M, K): T_k(L) = max(tau_-k, f_k(L)) + T_v(others' tokens + L + 1), the round time
    if device k drafted L and everyone else kept their length and share; tau_-k is the
    latest finish time of the others."""
    lengths = np.arange(system.max_draft_len + 1)[:, None]
    others_latest = latest_of_others(finish_time_s(system, users, draft_len, share))
    own = finish_time_s(system, users, np.broadcast_to(lengths, (lengths.size, users.num_users)),
                        share)
    others_tokens = np.sum(np.asarray(draft_len) + 1) - (np.asarray(draft_len) + 1)
    verify_s = system.verify_time.of_tokens(others_tokens + lengths + 1)
    return np.maximum(own, others_latest) + verify_s


def round_times_of_one(
    system: SystemParams, users: UserParams, draft_len: np.ndarray, device: int
) -> np.ndarray:
    """(M,): the round time tau*(L_-k, L) + T_v with device k at L = 0..L_max, everyone
    else at their length, the shares re-equalised for each such plan."""
    plans = np.repeat(np.asarray(draft_len)[None], system.max_draft_len + 1, axis=0)
    plans[:, device] = np.arange(system.max_draft_len + 1)
    return equalised_finish_time_s(system, users, plans) + system.verify_time(plans)


def stopping_lengths(tokens: np.ndarray, others_tokens: np.ndarray, round_s: np.ndarray):
    """(K,) each device's optimal stopping length: the first L at which one more draft no
    longer raises the round's goodput (A_k + E_k(L)) / T_k(L), i.e. where

        S_k(L+1) T_k(L) <= (T_k(L+1) - T_k(L)) (A_k + E_k(L)),

    S(L+1) = E(L+1) - E(L) the chance that the first L+1 drafts are all accepted, A_k the
    others' expected tokens. tokens, round_s (M, K): E_k(L), T_k(L) for L = 0..L_max. E is
    concave and T_k convex in L, so the first L where drafting stops paying is the
    optimum. One device alone (A = 0, T = C + c L): S(L+1) (C + c L) <= c E(L), seed 003's
    threshold (docs/system-model.md, "Threshold policy").
    """
    gain = np.diff(tokens, axis=0) * round_s[:-1]
    cost = np.diff(round_s, axis=0) * (others_tokens + tokens[:-1])
    stops = np.vstack([gain <= cost, np.ones((1, tokens.shape[1]), dtype=bool)])  # L_max caps
    return stops.argmax(axis=0)


def critical_delays(tokens: np.ndarray, others_tokens: np.ndarray, fixed_s: np.ndarray,
                    per_token_s: np.ndarray, delay_s: np.ndarray) -> np.ndarray:
    """(M-1, K): the delay above which device k drafts more than L tokens, L = 0..L_max-1,
    where its finish time is the round's latest (for one device alone, always).

    The stopping rule at equality with T = C + c L: C = c ((A + E(L)) / S(L+1) - L), less
    the part of C that is not delay (``stopping_costs``); inf where S(L+1) = 0. Row 0 is
    the delay below which speculation does not pay at all, row 1 the one below which
    L = 1 is optimal; rows grow ~ log(d) / log(1/a) for a geometric rate a.
    """
    lengths = np.arange(tokens.shape[0] - 1)[:, None]
    survive = np.diff(tokens, axis=0)
    with np.errstate(divide="ignore"):
        needed = np.where(survive > 0,
                          per_token_s * ((others_tokens + tokens[:-1]) / survive - lengths),
                          np.inf)
    return needed - (fixed_s - delay_s)


def threshold(system: SystemParams, users: UserParams) -> Plan:
    """Every device stops drafting by its own optimal-stopping rule (seed 003's delay
    threshold, ``stopping_lengths``) given its delay, draft time and acceptance (a rate or
    a curve) and the round it shares: the others' finish times, tokens and verification
    load. From each device's alone optimum, devices respond in turn, each seeing the
    others' latest lengths, with the shares re-equalised for every candidate; a response
    is kept when it raises the round's goodput, so sweeps climb and stop. From
    ``_THRESHOLD_TURNS_MAX`` devices on, all respond at once, priced at equal shares,
    while that raises the goodput. Each device needs only its own measurements and a few numbers
    about the round; ``heterogeneous`` solves all lengths jointly (docs/system-model.md).
    """
    tables = _Tables(system, users)
    k = users.num_users
    # Start from each device alone with an equal share (A = 0, T = C + c L): from all-zero
    # lengths, any one device's first token would stretch everyone's round, and no single
    # response would ever move.
    fixed, per_token = stopping_costs(system, users, np.zeros(k, dtype=int), np.full(k, 1 / k))
    draft_len = stopping_lengths(tables.tokens, np.zeros(k), fixed + per_token * tables.lengths)
    best = _equalised_plan("threshold", system, users, draft_len)
    for _ in range(_THRESHOLD_ITERATIONS):
        tokens = users.acceptance.expected_tokens(best.draft_len)
        others = tokens.sum() - tokens
        if k < _THRESHOLD_TURNS_MAX:
            moved = False
            for i in range(k):
                round_s = round_times_of_one(system, users, best.draft_len, i)[:, None]
                response = stopping_lengths(tables.tokens[:, i:i + 1], others[i:i + 1],
                                            round_s)[0]
                if response == best.draft_len[i]:
                    continue
                candidate = best.draft_len.copy()
                candidate[i] = response
                plan = _equalised_plan("threshold", system, users, candidate)
                if plan.goodput_tok_s > best.goodput_tok_s:
                    best, moved = plan, True
                    tokens = users.acceptance.expected_tokens(best.draft_len)
                    others = tokens.sum() - tokens
            if not moved:
                break
        else:  # every device priced at an equal share (equalised ones price slack as band)
            chosen = stopping_lengths(tables.tokens, others, own_round_times(
                system, users, best.draft_len, np.full(k, 1.0 / k)))
            if np.array_equal(chosen, best.draft_len):
                break
            plan = _equalised_plan("threshold", system, users, chosen)
            if plan.goodput_tok_s <= best.goodput_tok_s:
                break
            best = plan
    return best


def brute_force(
    system: SystemParams, users: UserParams, max_plans: int = BRUTE_FORCE_MAX_PLANS
) -> Plan:
    """Exact reference: every vector of draft lengths, shares exact for each (1-D in tau)."""
    k, m = users.num_users, system.max_draft_len + 1
    if m**k > max_plans:
        raise ValueError(f"brute force would enumerate {m}^{k} plans (> {max_plans})")
    lengths = np.array(list(itertools.product(range(m), repeat=k))).reshape(-1, k)
    goodput, _ = equalised_goodput(system, users, lengths)
    return _equalised_plan("brute-force", system, users, lengths[int(np.argmax(goodput))])


class _Workspace(threading.local):
    """Scratch arrays the sweeps reuse, per thread, kept from one solve to the next.

    Reuse is the point at large K: a fresh multi-megabyte temporary comes from mmap and
    pays its page faults again (about a fifth of a 10,000-device solve). The arrays grow
    to the largest problem solved in the thread and stay (~25 MB at K = 10,000).
    """

    def __init__(self) -> None:
        self.arrays: dict[tuple[str, type], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type = float) -> np.ndarray:
        """A named array of this shape (contents undefined)."""
        size = math.prod(shape)
        key = (name, dtype)
        array = self.arrays.get(key)
        if array is None or array.size < size:
            array = self.arrays[key] = np.empty(size, dtype)
        return array[:size].reshape(shape)


_WORKSPACE = _Workspace()


class _Tables:
    """Per-device functions of L tabulated for L = 0..L_max: arrays of shape (M, K)."""

    def __init__(self, system: SystemParams, users: UserParams) -> None:
        lengths = np.arange(system.max_draft_len + 1)[:, None]
        shape = (lengths.shape[0], users.num_users)
        self.lengths = lengths  # (M, 1)
        self.tokens = users.acceptance.expected_tokens(np.broadcast_to(lengths, shape))
        self.compute_s = compute_time_s(system, users, lengths)  # c_k(L) = L t_k + d_k
        self.upload_s = upload_s_full_band(system, users, lengths)  # w_k(L) = (b0 + L b) / (B s_k)
        self.verify_per_token_s = system.verify_time.per_token_s  # v1
        self.buffer = _WORKSPACE.get

    @cached_property
    def step_tokens(self) -> np.ndarray:
        """(M-1, K): E_k(L+1) - E_k(L)."""
        return np.diff(self.tokens, axis=0)

    @cached_property
    def _upload_floored(self) -> np.ndarray:
        # A free upload (w = 0) still needs tau > c: floored, its share is ~0 where L
        # finishes in time and inf where it cannot, like every other device's.
        return np.maximum(self.upload_s, _TINY)

    def shares(self, tau: np.ndarray) -> np.ndarray:
        """beta_k(L, tau) = w_k(L) / (tau - c_k(L)), inf where L cannot finish by tau.

        tau: (n,) -> (n, M, K), in the "share" buffer."""
        tau = np.asarray(tau, dtype=float)
        slack = self.buffer("share", (tau.size, *self.compute_s.shape))
        np.subtract(tau[:, None, None], self.compute_s, out=slack)
        np.maximum(slack, 0.0, out=slack)
        with np.errstate(divide="ignore"):
            return np.divide(self._upload_floored, slack, out=slack)

    def values(self, price: float) -> np.ndarray:
        """E_k(L) - price v1 L: tokens net of the verification time they cost (Dinkelbach)."""
        return self.tokens - price * self.verify_per_token_s * self.lengths


def _sorted_band_prices(
    ratio: np.ndarray, step_share: np.ndarray, capacity: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The LP's band price at every finish time (row) at once: sort each row's steps by
    ratio and take the prefix that fits; mu is the ratio of the first step left out (0 if
    all fit).

    Returns thresholds (floor, ceil): "ratio > floor" leaves that step out, "ratio > ceil"
    takes it."""
    n = ratio.shape[0]
    flat_ratio = ratio.reshape(n, -1)
    takeable = np.flatnonzero(flat_ratio > 0)  # nan, 0 and negative ratios never are
    row = takeable // flat_ratio.shape[1]
    step_ratio = flat_ratio.ravel()[takeable]
    order = np.lexsort((-step_ratio, row))  # one sort for all rows: by row, falling ratio
    row, step_ratio = row[order], step_ratio[order]
    cumulative = np.cumsum(step_share.reshape(n, -1).ravel()[takeable][order])
    rows = np.arange(n)
    start, end = np.searchsorted(row, rows), np.searchsorted(row, rows, side="right")
    before = np.concatenate([[0.0], cumulative])[start]  # band of the rows above
    fits = cumulative - before[row] <= capacity[row]  # a prefix of every row
    left_out = start + np.bincount(row, weights=fits, minlength=n).astype(np.intp)
    cut = np.where(left_out < end, np.append(step_ratio, 0.0)[left_out], 0.0)
    return cut, np.fmax(np.nextafter(cut, -np.inf), 0.0)


def _bucketed_band_price(
    tables: _Tables, ratio: np.ndarray, step_share: np.ndarray, capacity: float
) -> float:
    """The band price ``_sorted_band_prices`` finds (its floor threshold), for one finish
    time, without sorting every step (large K).

    The top bits of a positive float64 (exponent and 4 mantissa bits) order it into one
    of 32,768 buckets, 16 per octave. One weighted histogram gives the band that every
    bucket and all above it take; only the steps in the bucket where the band runs out are
    sorted. Buckets 0 (ratio <= 0) and above inf (nan) are never taken.
    """
    bucket = tables.buffer("bucket", ratio.shape, np.int64)
    np.right_shift(ratio.view(np.int64), _BUCKET_SHIFT, out=bucket)
    np.maximum(bucket, 0, out=bucket)  # negative ratios have the sign bit set
    band = np.bincount(bucket.ravel(), weights=step_share.ravel(), minlength=_NAN_BUCKET + 1)
    band[0] = 0.0
    band[_NAN_BUCKET:] = 0.0
    from_top = np.cumsum(band[::-1])[::-1]  # band of every step in bucket j or above
    if from_top[1] <= capacity:
        return 0.0
    cut_bucket = int(np.count_nonzero(from_top > capacity)) - 1
    members = np.flatnonzero(bucket.ravel() == cut_bucket)
    member_ratio = ratio.ravel()[members]
    order = np.argsort(-member_ratio)
    cumulative = from_top[cut_bucket + 1] + np.cumsum(step_share.ravel()[members][order])
    return float(member_ratio[order[np.count_nonzero(cumulative <= capacity)]])


def _knapsack_candidates(
    tables: _Tables, tau: np.ndarray, price: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lagrangian solution of the multiple-choice knapsack at each finish time in tau (n,).

    Item (k, L) has value E_k(L) - price v1 L and weight beta_k(L, tau); capacity 1. Value
    is concave and weight convex in L, so every L is on device k's hull and, for a
    bandwidth price mu, the closed-form choice is: take the steps L -> L+1 whose ratio
    mu_kL = d value / d weight exceeds mu. Taking steps in decreasing mu_kL until the band
    is full solves the LP relaxation with at most one fractional step.

    Returns (lengths, tau): candidate draft lengths (c, K) and the finish time each was
    chosen for (c,): the floor plans (without the fractional step) and, below the large-K
    regime where one step of one device cannot matter, the ceil plans (with it).
    """
    share = tables.shares(tau)  # (n, M, K)
    n, shape = tau.size, tables.step_tokens.shape
    step_value = tables.buffer("value", shape)
    np.subtract(tables.step_tokens, price * tables.verify_per_token_s, out=step_value)
    step_share = tables.buffer("step", (n, *shape))
    ratio = tables.buffer("ratio", (n, *shape))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.subtract(share[:, 1:], share[:, :-1], out=step_share)  # nan: both infeasible
        np.divide(step_value, step_share, out=ratio)  # 0 into an infeasible length
    # Every device sends at least L = 0; where even that does not fit, the band's price
    # is inf (only free steps are taken).
    capacity = 1.0 - share[:, 0].sum(axis=1)
    taken = tables.buffer("taken", ratio.shape, bool)
    if ratio[0].size > _SORT_CUT_MAX:
        mu = np.full(n, np.inf)
        for i in np.flatnonzero(capacity >= 0):
            mu[i] = _bucketed_band_price(tables, ratio[i], step_share[i], capacity[i])
        return np.greater(ratio, mu[:, None, None], out=taken).sum(axis=1), tau
    mu_floor, mu_ceil = _sorted_band_prices(ratio, step_share, capacity)
    mu_floor = np.where(capacity >= 0, mu_floor, np.inf)
    mu_ceil = np.where(capacity >= 0, mu_ceil, _LARGEST)
    floor = np.greater(ratio, mu_floor[:, None, None], out=taken).sum(axis=1)
    ceil = np.greater(ratio, mu_ceil[:, None, None], out=taken).sum(axis=1)
    return np.concatenate([floor, ceil]), np.tile(tau, 2)


@dataclass
class _Best:
    """The best draft lengths found so far, their goodput and finish time tau*(L) (the
    Plan, with its shares, is built once at the end)."""

    goodput: float
    draft_len: np.ndarray
    tau: float

    def plan(self, policy: str, system: SystemParams, users: UserParams) -> Plan:
        return _equalised_plan(policy, system, users, self.draft_len, self.tau)


def _best_response(tables: _Tables, plan: _Best, tau: float) -> np.ndarray:
    """Every device's closed-form best L at the multipliers of a plan with finish time tau.

    One more unit of share would shorten the round by 1 / S2 with
    S2 = sum_k w_k / (tau - c_k)^2, so bandwidth is worth mu = G / S2 tokens and device k
    picks argmax_L E_k(L) - G v1 L - mu beta_k(L, tau) (-inf where L cannot finish).
    """
    cols = np.arange(plan.draft_len.size)
    upload_s = tables.upload_s[plan.draft_len, cols]
    slack = tau - tables.compute_s[plan.draft_len, cols]
    sends = upload_s > 0
    s2 = np.sum(upload_s[sends] / slack[sends] ** 2)
    # Free uploads: the band is worth ~nothing, but an L that cannot finish stays -inf.
    price = plan.goodput / s2 if s2 > 0 else _TINY
    score = tables.shares(np.array([tau]))[0]
    np.multiply(score, -price, out=score)
    score += tables.values(plan.goodput)
    return np.argmax(score, axis=0)


def _compute_bound_candidates(
    system: SystemParams, tables: _Tables, price: float, first: float
) -> tuple[np.ndarray, np.ndarray]:
    """The best plans if uploads were free: then a round lasts max_k c_k(L_k), and as tau
    grows past c_k(L+1) device k may take its step L -> L+1. Sweeping every such
    breakpoint in order (one sort, running sums) scores all of them; the few best become
    exact candidates, and their taus join the knapsack's grid.

    Steps are only those worth their verification time at this price (E_k(L+1) - E_k(L)
    > price v1), a prefix of each device's by concavity. With greedy uploads (a few bits
    per token) the band barely binds and the optimum sits just past a breakpoint, which a
    geometric grid of tau would hit only by chance.
    """
    worth = tables.step_tokens > price * tables.verify_per_token_s  # (M-1, K)
    step, device = np.nonzero(worth)
    k = tables.tokens.shape[1]
    if step.size == 0:
        return np.zeros((0, k), int), np.zeros(0)
    due = tables.compute_s[step + 1, device]  # a step can be taken once tau reaches this
    order = np.argsort(due, kind="stable")
    step_tokens = tables.step_tokens[step, device][order]
    due = np.maximum(due[order], first)
    tokens = tables.tokens[0].sum() + np.cumsum(step_tokens)
    taken = np.arange(1, order.size + 1)
    goodput = tokens / (due + system.verify_time.of_tokens(k + taken))
    # The last step due at each tau (steps due together are taken together).
    last = np.flatnonzero(np.append(due[1:] != due[:-1], True))
    best = last[np.argsort(goodput[last])[::-1][:_COMPUTE_BOUND_CANDIDATES]]
    device = device[order]
    candidates = np.array([np.bincount(device[: i + 1], minlength=k) for i in best])
    return candidates.reshape(-1, k), due[best]


def _geometric(lo: float, hi: float, num: int) -> np.ndarray:
    """num points from lo to hi, evenly spaced in log (np.geomspace without its checks)."""
    return lo * (hi / lo) ** np.linspace(0.0, 1.0, num)


def _finish_time_range(
    system: SystemParams,
    users: UserParams,
    tables: _Tables,
    common_taus: np.ndarray,
    goodput: float,
) -> tuple[float, float]:
    """Where the optimum's finish time tau can lie: in [tau*(0), tau*(L_max)] (tau*(L)
    grows with every L_k), and only where a plan finishing then could beat ``goodput``.

    A plan with finish time tau drafts at most L_k(tau) = max{L : c_k(L) <= tau} per
    device, so its goodput is at most N(tau) / (tau + v0 + v1 K) with
    N(tau) = sum_k E_k(L_k(tau)). On a grid tau_0 < tau_1 < ..., every tau in
    [tau_i, tau_i+1] is bounded by N(tau_i+1) / (tau_i + v0 + v1 K); the range ends at the
    last grid cell whose bound reaches ``goodput``.
    """
    lo, hi = (max(float(t), 1e-12) for t in common_taus[[0, -1]])
    grid = _geometric(lo, hi, _RANGE_POINTS)
    reach = tables.buffer("reach", (grid.size, users.num_users))
    np.subtract(grid[:, None], users.delay_s, out=reach)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        np.divide(reach, users.draft_s_per_token, out=reach)
    np.nan_to_num(reach, copy=False, nan=system.max_draft_len)  # 0 / 0: free drafting
    np.clip(reach, 0, system.max_draft_len, out=reach)
    tokens = tables.tokens[reach.astype(np.intp), np.arange(users.num_users)].sum(axis=1)
    bound = tokens[1:] / (grid[:-1] + system.verify_time.of_tokens(users.num_users))
    useful = np.flatnonzero(bound >= goodput)
    return lo, (float(grid[useful[-1] + 1]) if useful.size else lo)


def _better(
    system: SystemParams, users: UserParams, best: _Best, candidates: np.ndarray, near: np.ndarray
) -> tuple[_Best, int, np.ndarray]:
    """Score the candidates exactly (tau* from ``near``): the best of them and ``best``,
    the index of the best candidate, and every candidate's tau*."""
    goodput, tau = equalised_goodput(system, users, candidates, near)
    i = int(np.argmax(goodput))
    if goodput[i] > best.goodput:
        best = _Best(float(goodput[i]), candidates[i], float(tau[i]))
    return best, i, tau


def _usable_warm_start(system: SystemParams, users: UserParams, warm: Plan | None) -> bool:
    return (
        warm is not None
        and warm.draft_len.shape == (users.num_users,)
        and warm.draft_len.min(initial=0) >= 0
        and warm.draft_len.max(initial=0) <= system.max_draft_len
    )


def heterogeneous(
    system: SystemParams,
    users: UserParams,
    finish_time_step: float = 0.1,
    refinements: int = 1,
    polish_steps: int = 4,
    warm: Plan | None = None,
) -> Plan:
    """Per-device L_k in one synchronous round: decomposition over the finish time tau.

    Outer: tau swept over the range where the optimum can lie (``_finish_time_range``): a
    geometric grid, and for small K also a geometric grid of the slack above tau*(0) and
    the best compute breakpoints (``_compute_bound_candidates``); then finer grids around
    the best point. The goodput price is updated Dinkelbach-style from the best plan so far
    (starting from the homogeneous optimum). Inner: the Lagrangian knapsack at each tau.
    Last, best-response polish at the plan's own multipliers. Every candidate's shares are
    re-solved exactly (tau*(L)) and scored, so the result is feasible and never worse than
    homogeneous; docs/system-model.md bounds the gap.

    ``warm``: the previous plan for the same devices (the live controller's re-solves). It
    is re-scored as a candidate and, from 32 devices on, the sweep covers only a window
    around its tau; if the best point lands on the window's edge, the full range is swept
    after all.
    """
    tables = _Tables(system, users)
    homogeneous_plan, common_taus = _homogeneous(system, users, tables)
    if system.max_draft_len == 0:
        return replace(homogeneous_plan, policy="heterogeneous")
    common = int(homogeneous_plan.draft_len[0])
    best = _Best(homogeneous_plan.goodput_tok_s, homogeneous_plan.draft_len, common_taus[common])
    first, last = _finish_time_range(system, users, tables, common_taus, best.goodput)
    budget = _GRID_BUDGET // tables.tokens.size
    refine_points = max(3, min(6, budget))

    def grid(lo: float, hi: float) -> np.ndarray:
        # Points ~finish_time_step apart (relative); at large K the goodput is smooth in
        # tau, so coarser grids lose little: cap the work.
        points = int(np.ceil(np.log(hi / lo) / np.log1p(finish_time_step))) + 1
        return _geometric(lo, hi, max(6, min(points, _MAX_POINTS, budget)))

    taus, structure = grid(first, last), np.zeros(0)
    if tables.step_tokens.size <= _SORT_CUT_MAX:
        # Small K: the goodput has structure at every scale of slack above tau*(0) (a
        # little band frees a step for one device) and just past compute breakpoints.
        slack = _geometric(_SLACK_MIN * first, max(last - first, _SLACK_MIN * first), 12)
        candidates, near = _compute_bound_candidates(system, tables, best.goodput, first)
        if candidates.size:
            best, _, tau = _better(system, users, best, candidates, near)
            slack = np.append(slack, tau - first)
        structure = first + slack[(slack > 0) & (first + slack <= last)]
        taus = np.union1d(taus, structure)
    windowed = False
    if _usable_warm_start(system, users, warm):
        best, _, centre = _better(system, users, best, warm.draft_len[None], None)
        window = (max(first, centre[0] / _WARM_WINDOW), min(last, centre[0] * _WARM_WINDOW))
        # Few devices: far-apart local optima, and a cold sweep costs ~1 ms anyway.
        if window[0] < window[1] and users.num_users >= _WARM_MIN_USERS:
            inside = structure[(structure >= window[0]) & (structure <= window[1])]
            taus, windowed = np.union1d(grid(*window), inside), True
    for stage in range(refinements + 1):
        candidates, near = _knapsack_candidates(tables, taus, best.goodput)
        best, i, _ = _better(system, users, best, candidates, near)
        j = i % taus.size  # the grid point of the stage's best candidate
        if (
            windowed
            and stage == 0
            and ((j == 0 and taus[0] > first) or (j == taus.size - 1 and taus[-1] < last))
        ):
            # On the warm window's edge: the optimum may lie beyond; sweep the full range.
            cold = heterogeneous(system, users, finish_time_step, refinements, polish_steps)
            return cold if cold.goodput_tok_s >= best.goodput else best.plan(
                "heterogeneous", system, users)
        lo, hi = taus[max(j - 1, 0)], taus[min(j + 1, taus.size - 1)]
        taus = _geometric(lo, hi, refine_points + 2)[1:-1]  # between the neighbours
    for _ in range(polish_steps):
        response = _best_response(tables, best, best.tau)[None]
        polished, _, _ = _better(system, users, best, response, np.array([best.tau]))
        if polished is best:
            break
        best = polished
    return best.plan("heterogeneous", system, users)


POLICIES: dict[str, Policy] = {
    "homogeneous": homogeneous,
    "heterogeneous": heterogeneous,
    "threshold": threshold,
    "agnostic": agnostic,
    "equal-best-L": equal_best_len,
    "fixed-L": fixed_len,
    "per-user-L": per_user_len,
    "brute-force": brute_force,
}


# Policies that can start from the previous plan for the same devices (``warm=``).
WARM_STARTED = frozenset({"heterogeneous"})


def solve(
    policy: str, system: SystemParams, users: UserParams, warm: Plan | None = None, **options
) -> Plan:
    """Run the named policy; ``options`` go to it (e.g. fixed_draft_len for fixed-L).
    ``warm``: the previous plan for the same devices, used by the policies that can."""
    try:
        solver = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; choose from {sorted(POLICIES)}") from None
    if warm is not None and policy in WARM_STARTED:
        options["warm"] = warm
    return solver(system, users, **options)
