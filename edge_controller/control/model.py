"""The synchronous-round system model of docs/system-model.md, as numpy functions.

Symbols (per device k; arrays of shape (K,) unless said otherwise):
    t_k   draft_s_per_token       draft time per token (s)
    a_k   acceptance              per-token acceptance (geometric model) or a curve
    s_k   spectral_efficiency     uplink bit/s/Hz, so rate r_k = beta_k B s_k
    d_k   delay_s                 fixed per-round delay (s)
    B     bandwidth_hz, b bits_per_token, b0 overhead_bits, T_v = base_s + per_token_s sum(L+1)

Finish time  f_k = L_k t_k + d_k + (b0 + L_k b) / (beta_k B s_k)
Round time   T   = max_k f_k + T_v(L)
Goodput      G   = sum_k E[N_k(L_k)] / T        (the one function that scores every policy)

Draft lengths ``draft_len`` broadcast as (..., K): leading axes batch candidate plans.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import ArrayLike

# Newton on the concave 1/S(tau) converges from below; this many steps reach rounding error
# on every instance we have seen (it converges in one step for identical users).
_NEWTON_STEPS = 60
_NEWTON_RTOL = 1e-13


class Acceptance(Protocol):
    """How many target tokens a round yields per device: pluggable acceptance model."""

    @property
    def num_users(self) -> int: ...

    def expected_tokens(self, draft_len: np.ndarray) -> np.ndarray:
        """E[N_k(L)] = accepted drafts + 1 correction/bonus; draft_len (..., K) -> (..., K)."""
        ...

    def position_probs(self, max_len: int) -> np.ndarray:
        """(max_len, K): P(draft i accepted | drafts 1..i-1 accepted), i = 1..max_len."""
        ...

    def average(self) -> Acceptance:
        """One user with the mean of every parameter (the heterogeneity-agnostic view)."""
        ...


@dataclass(frozen=True)
class GeometricAcceptance:
    """I.i.d. per-token acceptance a_k: E[N(L)] = (1 - a^(L+1)) / (1 - a), L + 1 at a = 1."""

    rate: np.ndarray  # (K,) in [0, 1]

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", np.asarray(self.rate, dtype=float).reshape(-1))

    @property
    def num_users(self) -> int:
        return self.rate.size

    def expected_tokens(self, draft_len: np.ndarray) -> np.ndarray:
        a = self.rate
        n = np.asarray(draft_len, dtype=float) + 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            # -expm1(n log a) = 1 - a^n without cancellation as a -> 1.
            ratio = -np.expm1(n * np.log(a)) / (1.0 - a)
        return np.where(a == 1.0, n, ratio)

    def position_probs(self, max_len: int) -> np.ndarray:
        return np.broadcast_to(self.rate, (max_len, self.num_users))

    def average(self) -> GeometricAcceptance:
        return GeometricAcceptance(np.array([self.rate.mean()]))


@dataclass(frozen=True)
class PositionAcceptance:
    """Empirical per-position curve: probs[i, k] = P(draft i+1 accepted | 1..i accepted).

    E[N(L)] = 1 + sum_{i=1..L} prod_{j<=i} p_j. Increments are products of p <= 1, so E is
    concave in L for any curve (the heterogeneous solver relies on that). Lengths beyond
    the curve repeat its last position.
    """

    probs: np.ndarray  # (P, K)

    def __post_init__(self) -> None:
        probs = np.asarray(self.probs, dtype=float)
        object.__setattr__(self, "probs", probs.reshape(probs.shape[0], -1))

    @property
    def num_users(self) -> int:
        return self.probs.shape[1]

    def position_probs(self, max_len: int) -> np.ndarray:
        rows = np.minimum(np.arange(max_len), self.probs.shape[0] - 1)
        return self.probs[rows]

    def expected_tokens(self, draft_len: np.ndarray) -> np.ndarray:
        draft_len = np.asarray(draft_len, dtype=int)
        max_len = int(draft_len.max(initial=0))
        # table[L, k] = E[N_k(L)] for L = 0..max_len
        survive = np.cumprod(self.position_probs(max_len), axis=0)
        table = np.concatenate([np.ones((1, self.num_users)), 1.0 + np.cumsum(survive, axis=0)])
        users = np.broadcast_to(np.arange(self.num_users), draft_len.shape)
        return table[draft_len, users]

    def average(self) -> PositionAcceptance:
        return PositionAcceptance(self.probs.mean(axis=1, keepdims=True))


@dataclass(frozen=True)
class VerifyTime:
    """Batched verification time T_v = base_s + per_token_s * sum_k (L_k + 1)."""

    base_s: float
    per_token_s: float

    def __call__(self, draft_len: np.ndarray) -> np.ndarray:
        return self.of_tokens(np.sum(np.asarray(draft_len) + 1, axis=-1))

    def of_tokens(self, tokens: np.ndarray | float) -> np.ndarray | float:
        """T_v of a forward of ``tokens`` tokens (sum_k (L_k + 1))."""
        return self.base_s + self.per_token_s * tokens


@dataclass(frozen=True)
class SystemParams:
    bandwidth_hz: float  # B
    bits_per_token: float  # b
    verify_time: VerifyTime
    overhead_bits: float = 0.0  # b0, per upload message
    max_draft_len: int = 16

    def upload_bits(self, draft_len: np.ndarray) -> np.ndarray:
        """b0 + L b: bits a device uploads in a round."""
        return self.overhead_bits + np.asarray(draft_len) * self.bits_per_token


@dataclass(frozen=True)
class UserParams:
    """Per-device parameters as plain (K,) arrays; acceptance may be given as geometric rates."""

    draft_s_per_token: np.ndarray  # t_k
    acceptance: Acceptance  # or (K,) rates a_k, wrapped in GeometricAcceptance
    spectral_efficiency: np.ndarray  # s_k
    delay_s: np.ndarray | float = 0.0  # d_k
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        t = np.asarray(self.draft_s_per_token, dtype=float).reshape(-1)
        k = t.size
        acceptance = self.acceptance
        if not hasattr(acceptance, "expected_tokens"):
            acceptance = GeometricAcceptance(acceptance)
        if acceptance.num_users != k:
            raise ValueError(f"acceptance has {acceptance.num_users} users, expected {k}")
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "draft_s_per_token", t)
        set_(self, "acceptance", acceptance)
        set_(
            self,
            "spectral_efficiency",
            np.broadcast_to(np.asarray(self.spectral_efficiency, float), (k,)),
        )
        set_(self, "delay_s", np.broadcast_to(np.asarray(self.delay_s, dtype=float), (k,)))
        set_(self, "names", tuple(self.names) or tuple(f"user-{i}" for i in range(k)))

    @property
    def num_users(self) -> int:
        return self.draft_s_per_token.size

    def average(self) -> UserParams:
        """One user holding the mean of every parameter."""
        return UserParams(
            self.draft_s_per_token.mean(keepdims=True),
            self.acceptance.average(),
            self.spectral_efficiency.mean(keepdims=True),
            self.delay_s.mean(keepdims=True),
            names=("average",),
        )


@dataclass(frozen=True)
class Plan:
    """A policy's decision for one round and its predicted (analytic) goodput."""

    policy: str
    draft_len: np.ndarray  # (K,) int
    bandwidth_share: np.ndarray  # (K,) beta_k, sum <= 1
    user_goodput_tok_s: np.ndarray  # (K,) E[N_k] / T
    goodput_tok_s: float  # sum of the above
    round_time_s: float  # T = max_k f_k + T_v


def latest_of_others(times: np.ndarray) -> np.ndarray:
    """(K,) for each device, the latest of the other devices' times (-inf for one device)."""
    times = np.asarray(times, dtype=float)
    if times.size < 2:
        return np.full(times.size, -np.inf)
    second, first = np.sort(times)[-2:]
    return np.where(times == first, second, first)


def compute_time_s(system: SystemParams, users: UserParams, draft_len: np.ndarray) -> np.ndarray:
    """c_k = L_k t_k + d_k: the part of f_k that bandwidth cannot shorten."""
    return np.asarray(draft_len) * users.draft_s_per_token + users.delay_s


def upload_s_full_band(system: SystemParams, users: UserParams, draft_len: np.ndarray):
    """w_k = (b0 + L_k b) / (B s_k): upload time with the whole band (beta_k = 1)."""
    rate = system.bandwidth_hz * users.spectral_efficiency
    return system.upload_bits(draft_len) / rate


def finish_time_s(
    system: SystemParams, users: UserParams, draft_len: np.ndarray, share: np.ndarray
) -> np.ndarray:
    """f_k = c_k + w_k / beta_k; the upload term is 0 when w_k = 0 (then beta_k = 0 is enough)."""
    w = upload_s_full_band(system, users, draft_len)
    with np.errstate(divide="ignore", invalid="ignore"):
        upload = np.where(w > 0, w / share, 0.0)
    return compute_time_s(system, users, draft_len) + upload


def evaluate(
    policy: str,
    system: SystemParams,
    users: UserParams,
    draft_len: ArrayLike,
    share: ArrayLike,
) -> Plan:
    """Score draft lengths and shares: G = sum_k E[N_k(L_k)] / (max_k f_k + T_v)."""
    draft_len = np.asarray(draft_len, dtype=int)
    share = np.asarray(share, dtype=float)
    round_time = finish_time_s(system, users, draft_len, share).max() + system.verify_time(
        draft_len
    )
    user_goodput = users.acceptance.expected_tokens(draft_len) / round_time
    return Plan(policy, draft_len, share, user_goodput, float(user_goodput.sum()), round_time)


def equalised_finish_time_s(
    system: SystemParams, users: UserParams, draft_len: np.ndarray
) -> np.ndarray:
    """tau*(L): the smallest common finish time the band can buy, for draft_len (..., K)."""
    return equalised_finish_time(
        compute_time_s(system, users, draft_len),
        upload_s_full_band(system, users, draft_len),
    )


def equalised_finish_time(
    compute_s: np.ndarray, upload_s: np.ndarray, near: np.ndarray | None = None
) -> np.ndarray:
    """tau* for compute times c_k and full-band upload times w_k, both (..., K) -> (...).

    Shares beta_k = w_k / (tau - c_k) make every finish time tau; tau* solves
    S(tau) = sum_k w_k / (tau - c_k) = 1 over devices with w_k > 0, and is at least
    max_k c_k. H = 1/S is concave and increasing in tau (a parallel-resistance sum of linear
    terms), so Newton on H = 1 started below the root, at max_k (c_k + w_k), climbs
    monotonically to it; for identical devices it lands in one step. ``near`` (...): a
    guess close to tau* (e.g. a finish time these lengths were chosen to fit in): by
    concavity one Newton step from any point lands at or below the root, so the climb
    starts from there when that is higher, saving most steps.
    """
    c = np.asarray(compute_s, dtype=float)
    w = np.broadcast_to(upload_s, c.shape)
    sends = w > 0
    c_max = c.max(axis=-1)
    # A device that uploads nothing needs no share: at c = -inf its terms vanish (0 / inf),
    # so the loop needs no masks over (..., K).
    c = np.where(sends, c, -np.inf)
    tau = np.maximum((c + w).max(axis=-1), c_max)
    # An upload below the float resolution of its compute time (c + w == c) would start
    # Newton at zero slack (w / 0, then inf / inf); start one ulp above instead.
    active = sends.any(axis=-1)
    tau = np.where(active, np.maximum(tau, np.nextafter(c_max, np.inf)), tau)
    slack, term = np.empty_like(c), np.empty_like(c)  # reused: fresh big arrays page-fault

    def newton_step(tau: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.subtract(tau[..., None], c, out=slack)
        s1 = np.divide(w, slack, out=term).sum(axis=-1)
        s2 = np.divide(term, slack, out=term).sum(axis=-1)
        return (s1 * s1 - s1) / s2, s1

    with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 where nothing is sent
        if near is not None:
            near = np.asarray(near, dtype=float)
            usable = active & (near > tau)  # above the start, so above every c_k
            step, _ = newton_step(np.where(usable, near, tau))
            tau = np.where(usable, np.maximum(tau, near + step), tau)
        for _ in range(_NEWTON_STEPS):
            step, s1 = newton_step(tau)
            # S <= 1 at the start means the root lies below max_k c_k: tau* = max_k c_k.
            step = np.where(active & (s1 > 1.0), step, 0.0)
            tau = tau + step
            if not np.any(step > _NEWTON_RTOL * tau):
                break
    return np.maximum(tau, c_max)


def shares_for_finish_time(
    system: SystemParams, users: UserParams, draft_len: np.ndarray, tau: np.ndarray
) -> np.ndarray:
    """beta_k = w_k / (tau - c_k): the least share that lets device k finish by tau."""
    c = compute_time_s(system, users, draft_len)
    w = upload_s_full_band(system, users, draft_len)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(w > 0, w / (np.asarray(tau)[..., None] - c), 0.0)


def equalised_goodput(
    system: SystemParams,
    users: UserParams,
    draft_len: np.ndarray,
    near: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(G, tau*) with finish-time-equalising shares, batched over leading axes of draft_len;
    ``near``: finish times close to tau* to start from (see ``equalised_finish_time``)."""
    tau = equalised_finish_time(
        compute_time_s(system, users, draft_len),
        upload_s_full_band(system, users, draft_len),
        near,
    )
    tokens = users.acceptance.expected_tokens(draft_len).sum(axis=-1)
    return tokens / (tau + system.verify_time(draft_len)), tau
