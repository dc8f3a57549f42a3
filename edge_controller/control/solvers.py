"""Multi-access draft control: choose draft lengths L_k and uplink shares beta_k.

Every policy has the signature ``policy(system, users, **options) -> Plan`` and is scored
by :func:`~edge_controller.control.model.evaluate`, so goodputs are comparable. Call them
by name through :func:`solve` / :data:`POLICIES` (Flower-strategy style). The derivations
and the optimality argument are in docs/system-model.md.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from edge_controller.control.model import (
    Plan,
    SystemParams,
    UserParams,
    compute_time_s,
    equalised_finish_time_s,
    equalised_goodput,
    evaluate,
    finish_time_s,
    shares_for_finish_time,
    upload_s_full_band,
)

logger = logging.getLogger(__name__)

Policy = Callable[..., Plan]

DEFAULT_FIXED_DRAFT_LEN = 4
BRUTE_FORCE_MAX_PLANS = 500_000
_GRID_BUDGET = 400_000  # finish-time points x K x (L_max + 1) per knapsack sweep


def _length_grid(system: SystemParams, num_users: int) -> np.ndarray:
    """(M, K) with row L = [L, ..., L]: every common draft length 0..L_max."""
    lengths = np.arange(system.max_draft_len + 1)[:, None]
    return np.broadcast_to(lengths, (lengths.shape[0], num_users))


def _equalised_plan(
    policy: str, system: SystemParams, users: UserParams, draft_len: np.ndarray
) -> Plan:
    """Plan with finish-time-equalising shares for given draft lengths."""
    tau = equalised_finish_time_s(system, users, draft_len)
    share = shares_for_finish_time(system, users, draft_len, tau)
    return evaluate(policy, system, users, draft_len, share)


def _equal_share_plan(
    policy: str, system: SystemParams, users: UserParams, draft_len: np.ndarray
) -> Plan:
    share = np.full(users.num_users, 1.0 / users.num_users)
    return evaluate(policy, system, users, draft_len, share)


def homogeneous(system: SystemParams, users: UserParams) -> Plan:
    """One L for all; shares equalise finish times (weak devices get more band).

    For each L in 0..L_max, tau*(L) is exact (see ``equalised_finish_time_s``); the best L
    is then found by enumeration, so the plan is optimal within rounding.
    """
    lengths = _length_grid(system, users.num_users)
    goodput, _ = equalised_goodput(system, users, lengths)
    return _equalised_plan("homogeneous", system, users, lengths[int(np.argmax(goodput))])


def equal_best_len(system: SystemParams, users: UserParams) -> Plan:
    """Equal shares, the common L with the best goodput."""
    k = users.num_users
    lengths = _length_grid(system, k)
    round_time = finish_time_s(system, users, lengths, 1.0 / k).max(axis=-1)
    round_time = round_time + system.verify_time(lengths)
    goodput = users.acceptance.expected_tokens(lengths).sum(axis=-1) / round_time
    return _equal_share_plan("equal-best-L", system, users, lengths[int(np.argmax(goodput))])


def agnostic(system: SystemParams, users: UserParams) -> Plan:
    """Equal shares, one L tuned for K copies of the average device (mean of each parameter)."""
    k = users.num_users
    average = users.average()
    lengths = np.arange(system.max_draft_len + 1)[:, None]  # (M, 1): one average device
    round_time = finish_time_s(system, average, lengths, 1.0 / k)[:, 0]
    round_time = round_time + system.verify_time(np.broadcast_to(lengths, (lengths.size, k)))
    goodput = k * average.acceptance.expected_tokens(lengths)[:, 0] / round_time
    draft_len = np.full(k, int(np.argmax(goodput)))
    return _equal_share_plan("agnostic", system, users, draft_len)


def fixed_len(system: SystemParams, users: UserParams, fixed_draft_len: int | None = None) -> Plan:
    """Equal shares, one configured L for every device (default 4, a common library
    default, capped at L_max)."""
    if fixed_draft_len is None:
        fixed_draft_len = min(DEFAULT_FIXED_DRAFT_LEN, system.max_draft_len)
    if not 0 <= fixed_draft_len <= system.max_draft_len:
        raise ValueError(f"fixed_draft_len {fixed_draft_len} not in 0..{system.max_draft_len}")
    draft_len = np.full(users.num_users, fixed_draft_len)
    return _equal_share_plan("fixed-L", system, users, draft_len)


def per_user_len(system: SystemParams, users: UserParams) -> Plan:
    """Equal shares, each device's own best L: the one maximising its own token rate
    E[N_k(L)] / (f_k(L) + T_v of its own L + 1 tokens) as if the round were its alone.

    That is what a device tuning itself from its own measurements would pick (seed 003's
    single-device optimum); it ignores the synchronous round and the shared verifier.
    """
    k = users.num_users
    lengths = _length_grid(system, k)
    own_time = finish_time_s(system, users, lengths, 1.0 / k)
    own_time = own_time + system.verify_time.base_s + system.verify_time.per_token_s * (lengths + 1)
    own_rate = users.acceptance.expected_tokens(lengths) / own_time
    return _equal_share_plan("per-user-L", system, users, np.argmax(own_rate, axis=0))


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


@dataclass(frozen=True)
class _Tables:
    """Per-device functions of L tabulated for L = 0..L_max: arrays of shape (M, K)."""

    lengths: np.ndarray  # (M, 1)
    tokens: np.ndarray  # E[N_k(L)]
    compute_s: np.ndarray  # c_k(L) = L t_k + d_k
    upload_s: np.ndarray  # w_k(L) = (b0 + L b) / (B s_k)
    verify_per_token_s: float  # v1

    @classmethod
    def build(cls, system: SystemParams, users: UserParams) -> _Tables:
        lengths = np.arange(system.max_draft_len + 1)[:, None]
        shape = (lengths.shape[0], users.num_users)
        return cls(
            lengths,
            users.acceptance.expected_tokens(np.broadcast_to(lengths, shape)),
            np.broadcast_to(compute_time_s(system, users, lengths), shape),
            np.broadcast_to(upload_s_full_band(system, users, lengths), shape),
            system.verify_time.per_token_s,
        )

    def shares(self, tau: np.ndarray) -> np.ndarray:
        """beta_k(L, tau) = w_k(L) / (tau - c_k(L)), inf where L cannot finish by tau.

        tau: (n,) -> (n, M, K)."""
        slack = np.asarray(tau)[:, None, None] - self.compute_s
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            share = np.where(self.upload_s > 0, self.upload_s / slack, 0.0)
        return np.where((slack > 0) | ((slack == 0) & (self.upload_s == 0)), share, np.inf)

    def values(self, price: float) -> np.ndarray:
        """E_k(L) - price v1 L: tokens net of the verification time they cost (Dinkelbach)."""
        return self.tokens - price * self.verify_per_token_s * self.lengths


def _knapsack_lengths(
    tables: _Tables, tau: np.ndarray, price: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lagrangian solution of the multiple-choice knapsack at each finish time in tau (n,).

    Item (k, L) has value E_k(L) - price v1 L and weight beta_k(L, tau); capacity 1. Value
    is concave and weight convex in L, so every L is on device k's hull and, for a
    bandwidth price mu, the closed-form choice is: take the steps L -> L+1 whose ratio
    mu_kL = d value / d weight exceeds mu. Taking steps in decreasing mu_kL until the band
    is full solves the LP relaxation with at most one fractional step.

    Returns (floor, ceil): (n, K) draft lengths without / with that fractional step.
    """
    share = tables.shares(tau)  # (n, M, K)
    step_value = np.diff(tables.values(price), axis=0)  # (M-1, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        step_share = np.diff(share, axis=1)  # (n, M-1, K); inf - inf: both infeasible
        ratio = np.where(step_share > 0, step_value / step_share, np.inf)
    ratio = np.where((step_value > 0) & ~np.isnan(step_share), ratio, -np.inf)
    # Hull order within a device; the running minimum only guards float ties.
    ratio = np.minimum.accumulate(ratio, axis=1)
    n = ratio.shape[0]
    flat_ratio = ratio.reshape(n, -1)
    flat_share = np.where(np.isfinite(step_share), step_share, 0.0).reshape(n, -1)
    order = np.argsort(-flat_ratio, axis=1)
    sorted_ratio = np.take_along_axis(flat_ratio, order, axis=1)
    cumulative = np.cumsum(np.take_along_axis(flat_share, order, axis=1), axis=1)
    capacity = 1.0 - share[:, 0, :].sum(axis=1)  # every device sends at least L = 0
    fits = (cumulative <= capacity[:, None]) & (sorted_ratio > 0)  # a prefix of the order
    num_taken = np.where(capacity >= 0, fits.sum(axis=1), 0)
    # The first step left out prices the band: mu = its ratio (inf if tau is infeasible).
    cut = np.concatenate([sorted_ratio, np.full((n, 1), -np.inf)], axis=1)
    mu = np.where(capacity >= 0, cut[np.arange(n), num_taken], np.inf)[:, None, None]
    floor = (ratio > mu).sum(axis=1)
    ceil = ((ratio >= mu) & (ratio > 0)).sum(axis=1)
    return floor, ceil


def _best_response(tables: _Tables, plan: Plan, tau: float) -> np.ndarray:
    """Every device's closed-form best L at the multipliers of a plan with finish time tau.

    One more unit of share would shorten the round by 1 / S2 with
    S2 = sum_k w_k / (tau - c_k)^2, so bandwidth is worth mu = G / S2 tokens and device k
    picks argmax_L E_k(L) - G v1 L - mu beta_k(L, tau).
    """
    cols = np.arange(plan.draft_len.size)
    upload_s = tables.upload_s[plan.draft_len, cols]
    slack = tau - tables.compute_s[plan.draft_len, cols]
    sends = upload_s > 0
    s2 = np.sum(upload_s[sends] / slack[sends] ** 2)
    price = plan.goodput_tok_s / s2 if s2 > 0 else 0.0
    share = tables.shares(np.array([tau]))[0]
    with np.errstate(invalid="ignore"):  # 0 * inf where nothing is uploaded
        score = tables.values(plan.goodput_tok_s) - price * share
    score = np.where(np.isfinite(share), score, -np.inf)
    return np.argmax(score, axis=0)


def heterogeneous(
    system: SystemParams,
    users: UserParams,
    finish_time_points: int = 24,
    refinements: int = 2,
    polish_steps: int = 4,
) -> Plan:
    """Per-device L_k in one synchronous round: decomposition over the finish time tau.

    Outer: tau swept on a geometric grid over [tau*(0), tau*(L_max)] (the optimum's tau lies
    there because tau*(L) grows with every L_k), then on finer grids around the best
    point; the goodput price is updated Dinkelbach-style from the best plan so far
    (starting from the homogeneous optimum). Inner: the Lagrangian knapsack at each tau.
    Last, best-response polish at the plan's own multipliers. Every candidate's shares are
    re-solved exactly (tau*(L)) and scored, so the result is feasible and never worse
    than homogeneous; docs/system-model.md bounds the gap.
    """
    best = homogeneous(system, users)
    if system.max_draft_len == 0:
        return replace(best, policy="heterogeneous")
    tables = _Tables.build(system, users)
    bounds = equalised_finish_time_s(system, users, tables.lengths[[0, -1]] + 0 * tables.tokens[:2])
    # Large K: the goodput is smooth in tau, so a coarser grid loses little; cap the work.
    points = max(6, min(finish_time_points, _GRID_BUDGET // tables.tokens.size))
    taus = np.geomspace(max(bounds[0], 1e-12), max(bounds[1], 1e-12), points)
    for _ in range(refinements + 1):
        floor, ceil = _knapsack_lengths(tables, taus, best.goodput_tok_s)
        candidates = np.concatenate([floor, ceil])
        goodput, _ = equalised_goodput(system, users, candidates)
        i = int(np.argmax(goodput))
        if goodput[i] > best.goodput_tok_s:
            best = _equalised_plan("heterogeneous", system, users, candidates[i])
        j = i % taus.size
        lo, hi = taus[max(j - 1, 0)], taus[min(j + 1, taus.size - 1)]
        taus = np.geomspace(lo, hi, min(points, 6) + 2)[1:-1]  # points between the neighbours
    for _ in range(polish_steps):
        tau = best.round_time_s - float(system.verify_time(best.draft_len))
        draft_len = _best_response(tables, best, tau)
        plan = _equalised_plan("heterogeneous", system, users, draft_len)
        if plan.goodput_tok_s <= best.goodput_tok_s:
            break
        best = plan
    return replace(best, policy="heterogeneous")


POLICIES: dict[str, Policy] = {
    "homogeneous": homogeneous,
    "heterogeneous": heterogeneous,
    "agnostic": agnostic,
    "equal-best-L": equal_best_len,
    "fixed-L": fixed_len,
    "per-user-L": per_user_len,
    "brute-force": brute_force,
}


def solve(policy: str, system: SystemParams, users: UserParams, **options) -> Plan:
    """Run the named policy; ``options`` go to it (e.g. fixed_draft_len for fixed-L)."""
    try:
        solver = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; choose from {sorted(POLICIES)}") from None
    return solver(system, users, **options)
