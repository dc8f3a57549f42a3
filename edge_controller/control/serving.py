"""The model of continuous batching and proactive drafting (docs/system-model.md,
"Continuous and proactive serving"), as numpy functions next to the synchronous round's
(edge_controller/control/model.py): the same symbols, per device k.

No round: each device cycles on its own. It drafts (D_k), uploads (U_k = (b0 + L_k b) /
(beta_k B s_k)), waits its delay d_k, waits for the forward in flight, and rides in the
next forward (F):

    C_k = D_k + U_k + d_k + rho_-k F / 2 + F,        D_k = L_k t_k (continuous)

The verifier runs a forward whenever drafts wait, all of them in one. X = sum_k 1 / C_k
drafts per second arrive; a forward carries n = max(1, X F) of them on average (the one
that started it, or in saturation every draft that arrived during the forward before),
so it lasts F = a + c n Lbar, Lbar = sum_k (L_k + 1) / C_k / X the mean tokens of a draft,
and the verifier is busy rho = X F / n of the time. A draft finds it busy with another
device's forward with probability rho_-k = rho (1 - X_k / X) (never with its own: it has
one draft out at a time), and then waits half a forward on average.

Proactive: from its upload to the verdict (W_k = d_k + rho_-k F / 2 + F) the device drafts
on: m_k = min(1 + L_k, cap, floor(W_k / t_k) + 1) tokens (every token begun before the
verdict; the one in hand is finished, so the cycle's wait is max(W_k, m_k t_k)), its
guess of the bonus token first (none when 1 + L_k or the cap is below 2, as the agent).
The verdict confirms the guess with probability P_k = P(all L_k accepted) p_k(L_k + 1)
(the bonus is the target's token at the next position; the draft's guess matches it as a
draft token there would be accepted), and the next draft then starts with
min(L_k, m_k - 1) tokens drafted:

    D_k = (L_k - P_k min(L_k, m_k - 1)) t_k                                   (proactive)

Goodput G = sum_k E[N_k(L_k)] / C_k. F is a fixed point (C_k grows with F, F with the
drafts per forward): iterated, damped, from the forward of one draft.

rho_-k is a heuristic, not a derivation: it is checked against the simulator
(docs/system-model.md). Left out there, with what each costs where measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from edge_controller.control.model import Plan, SystemParams, UserParams, upload_s_full_band
from edge_controller.control.solvers import _usable_warm_start, solve

SERVING_SCHEDULERS = ("continuous", "proactive")
DEFAULT_PREDRAFT_LEN = 16  # the controller's server.predraft_len default
_STEPS = 200
_BISECTIONS = 64  # of the band price mu, in log space: ~1e-16 of its range of decades
_BALANCING_ROUNDS = 4
MAX_MOVES = 200  # coordinate ascent over draft lengths: single changes at most
# Every device that uploads gets at least this share of the band (then renormalised):
# the optimum may give a device with a hopeless radio nothing, and a share of 0 would
# starve it in the model and leave it unpaced in the field.
MIN_SHARE = 1e-3
_RTOL = 1e-10


@dataclass(frozen=True)
class ServingPrediction:
    """What the model predicts for lengths and shares: per device (..., K), per plan (...)."""

    scheduler: str
    user_goodput_tok_s: np.ndarray  # E[N_k] / C_k
    goodput_tok_s: np.ndarray  # sum over devices
    cycle_s: np.ndarray  # C_k: one draft-to-verdict cycle
    fixed_s: np.ndarray  # C_k less the upload: what the band cannot shorten
    forward_s: np.ndarray  # F: a forward's mean time
    busy: np.ndarray  # rho: the verifier's busy fraction
    predrafted: np.ndarray  # m_k: tokens drafted past each upload (proactive; else 0)
    confirm_prob: np.ndarray  # P_k: the verdict confirms the guess (proactive; else 0)


def guess_confirmed_prob(users: UserParams, draft_len: np.ndarray) -> np.ndarray:
    """P_k = P(all L_k drafts accepted) * p_k(L_k + 1): the verdict confirms the guess;
    draft_len (..., K)."""
    draft_len = np.asarray(draft_len, dtype=int)
    probs = users.acceptance.position_probs(int(draft_len.max(initial=0)) + 1)
    survive = np.vstack([np.ones((1, users.num_users)), np.cumprod(probs, axis=0)])
    k = np.broadcast_to(np.arange(users.num_users), draft_len.shape)
    return survive[draft_len, k] * probs[draft_len, k]


def serving_goodput(system: SystemParams, users: UserParams, draft_len: ArrayLike,
                    share: ArrayLike, scheduler: str = "continuous",
                    predraft_len: int = DEFAULT_PREDRAFT_LEN) -> ServingPrediction:
    """The model's goodput of lengths ``draft_len`` and shares ``share`` (..., K; leading
    axes batch candidate plans) under ``scheduler`` (continuous, or proactive with up to
    ``predraft_len`` tokens past an upload)."""
    if scheduler not in SERVING_SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SERVING_SCHEDULERS)}")
    draft_len = np.asarray(draft_len, dtype=int)
    share = np.broadcast_to(np.asarray(share, dtype=float), draft_len.shape)
    t, d = users.draft_s_per_token, users.delay_s
    full = upload_s_full_band(system, users, draft_len)
    with np.errstate(divide="ignore", invalid="ignore"):
        upload = np.where(full > 0, full / share, 0.0)
    tokens = draft_len + 1
    law = system.verify_time
    proactive = scheduler == "proactive"
    confirm = (guess_confirmed_prob(users, draft_len) if proactive
               else np.zeros(draft_len.shape))
    cap = np.where(draft_len > 0, np.minimum(1 + draft_len, predraft_len), 0)
    none = np.zeros(draft_len.shape)

    def fixed(forward: np.ndarray, others_busy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        waiting = d + (others_busy / 2 + 1) * forward[..., None]  # sent -> verdict
        if not proactive:
            return draft_len * t + waiting, none
        with np.errstate(divide="ignore", invalid="ignore"):  # begun before the verdict
            predrafted = np.where(t > 0, np.minimum(cap, np.floor(waiting / t) + 1), cap)
        predrafted = np.where(cap >= 2, predrafted, 0)
        ahead = np.minimum(draft_len, np.maximum(predrafted - 1, 0))
        # the token in hand when the verdict comes is finished before the next draft
        return ((draft_len - confirm * ahead) * t + np.maximum(waiting, predrafted * t),
                predrafted)

    forward = np.asarray(law.of_tokens(tokens.mean(axis=-1)), dtype=float)
    busy = others_busy = np.zeros(draft_len.shape)
    for _ in range(_STEPS):
        rest, _ = fixed(forward, others_busy)
        rate = 1.0 / (rest + upload)  # X_k: drafts per second
        total = rate.sum(axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):  # no draft ever arrives
            mean_tokens = np.where(total > 0, (tokens * rate).sum(axis=-1) / total, 1.0)
            others = np.where(total[..., None] > 0, 1.0 - rate / total[..., None], 0.0)
        new = law.of_tokens(np.maximum(1.0, total * forward) * mean_tokens)
        busy = np.minimum(1.0, total * new / np.maximum(1.0, total * new))
        others_busy = busy[..., None] * others  # a device never waits for its own forward
        done = np.abs(new - forward) <= _RTOL * new
        forward = np.where(done, new, 0.5 * (forward + new))
        if done.all():
            break
    rest, predrafted = fixed(forward, others_busy)
    cycles = rest + upload
    user_goodput = users.acceptance.expected_tokens(draft_len) / cycles
    return ServingPrediction(scheduler, user_goodput, user_goodput.sum(axis=-1), cycles, rest,
                             forward, busy, predrafted, confirm)


def _shares(tokens: np.ndarray, fixed_s: np.ndarray, upload_s: np.ndarray) -> np.ndarray:
    """beta maximising sum_k E_k / (A_k + w_k / beta_k) with sum_k beta_k = 1, for
    (..., K) arrays.

    Each term E beta / (A beta + w) is concave in beta, so the optimum equalises the
    marginal E_k w_k / (A_k beta_k + w_k)^2 = mu over the devices that get a share:
    beta_k(mu) = max(0, (sqrt(E_k w_k / mu) - w_k) / A_k), and mu is found by bisection
    in log space (sum_k beta_k(mu) falls as mu rises). Devices that upload nothing get
    nothing; every other device at least MIN_SHARE."""
    sends = upload_s > 0
    w = np.where(sends, upload_s, 0.0)
    ew = tokens * w

    def at(mu: np.ndarray) -> np.ndarray:
        return np.maximum((np.sqrt(ew / mu[..., None]) - w) / fixed_s, 0.0)

    with np.errstate(divide="ignore", invalid="ignore"):
        hi = np.where(sends, tokens / w, 0.0).max(axis=-1)  # every share 0 at hi
    hi = np.maximum(hi, 1e-300)
    lo = np.full(hi.shape, 1e-300)
    for _ in range(_BISECTIONS):
        mid = np.sqrt(lo * hi)
        above = at(mid).sum(axis=-1) > 1.0
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    beta = np.where(sends, np.maximum(at(hi), MIN_SHARE), 0.0)
    return beta / np.maximum(beta.sum(axis=-1, keepdims=True), 1e-300)


def balanced(system: SystemParams, users: UserParams, draft_len: np.ndarray, scheduler: str,
             predraft_len: int = DEFAULT_PREDRAFT_LEN) -> tuple[np.ndarray, ServingPrediction]:
    """The best shares for lengths ``draft_len`` (..., K) under the serving model, and
    their prediction: shares from the cycles' fixed parts (_shares), which move with the
    verifier's load, so a few rounds of both, each plan keeping its best."""
    draft_len = np.asarray(draft_len, dtype=int)
    full = upload_s_full_band(system, users, draft_len)
    tokens = users.acceptance.expected_tokens(draft_len)
    sends = full > 0
    share = sends / np.maximum(sends.sum(axis=-1, keepdims=True), 1)
    best = serving_goodput(system, users, draft_len, share, scheduler, predraft_len)
    best_share = share
    for _ in range(_BALANCING_ROUNDS):
        share = _shares(tokens, best.fixed_s, full)
        trial = serving_goodput(system, users, draft_len, share, scheduler, predraft_len)
        better = trial.goodput_tok_s > best.goodput_tok_s
        if not better.any():
            break
        best_share = np.where(better[..., None], share, best_share)
        best = _where(better, trial, best)
    return best_share, best


def _where(pick: np.ndarray, a: ServingPrediction, b: ServingPrediction) -> ServingPrediction:
    """Per plan (``pick``, shape (...)), ``a``'s prediction where True, else ``b``'s."""
    fields = {}
    for f in dataclasses.fields(ServingPrediction):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            mask = pick.reshape(pick.shape + (1,) * (np.ndim(x) - pick.ndim))
            x = np.where(mask, x, y)
        fields[f.name] = x
    return ServingPrediction(**fields)


def plan_for(scheduler: str, policy: str, system: SystemParams, users: UserParams,
             predraft_len: int = DEFAULT_PREDRAFT_LEN, warm: Plan | None = None,
             **options) -> Plan:
    """The plan ``policy`` makes for ``scheduler``'s serving: the synchronous round's
    solvers for ``sync``, serving_plan for continuous and proactive."""
    if scheduler == "sync":
        return solve(policy, system, users, warm=warm, **options)
    return serving_plan(policy, system, users, scheduler, predraft_len, warm=warm, **options)


def serving_plan(policy: str, system: SystemParams, users: UserParams, scheduler: str,
                 predraft_len: int = DEFAULT_PREDRAFT_LEN, warm: Plan | None = None,
                 **options) -> Plan:
    """A plan for serving under ``scheduler``, scored by the serving model (its
    ``round_time_s``: the devices' mean cycle). ``heterogeneous`` is solved for it: from
    ``warm``'s lengths where usable, else the synchronous plan's, steepest ascent over
    single changes: every device's every L in 0..L_max, each with its best shares
    (balanced), scored in one batch; the best change is made, until none gains. Every
    other policy keeps its synchronous plan, scored here."""
    if policy != "heterogeneous":
        sync = solve(policy, system, users, warm=warm, **options)
        draft_len = np.asarray(sync.draft_len, dtype=int)
        share = np.asarray(sync.bandwidth_share, dtype=float)
        best = serving_goodput(system, users, draft_len, share, scheduler, predraft_len)
        return Plan(policy, draft_len, share, best.user_goodput_tok_s,
                    float(best.goodput_tok_s), float(best.cycle_s.mean()))
    draft_len = np.asarray(warm.draft_len if _usable_warm_start(system, users, warm)
                           else solve(policy, system, users).draft_len, dtype=int)
    share, best = balanced(system, users, draft_len, scheduler, predraft_len)
    k, lengths = users.num_users, np.arange(system.max_draft_len + 1)
    for _ in range(MAX_MOVES):
        candidates = np.repeat(draft_len[None], k * lengths.size, axis=0)
        candidates[np.arange(candidates.shape[0]), np.repeat(np.arange(k), lengths.size)] = (
            np.tile(lengths, k))
        shares, predictions = balanced(system, users, candidates, scheduler, predraft_len)
        pick = int(np.argmax(predictions.goodput_tok_s))
        if predictions.goodput_tok_s[pick] <= best.goodput_tok_s * (1 + 1e-9):
            break
        draft_len, share = candidates[pick], shares[pick]
        best = serving_goodput(system, users, draft_len, share, scheduler, predraft_len)
    return Plan(policy, draft_len, share, best.user_goodput_tok_s, float(best.goodput_tok_s),
                float(best.cycle_s.mean()))
