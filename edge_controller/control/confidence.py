"""Confidence stopping: the draft length becomes a cap L_k, and device k stops a draft
before the first token its draft model gives a top-1 probability below h_k
(docs/system-model.md, "Confidence stopping").

Model. The top-1 probability c of each position the device evaluates falls in one of
``BINS`` bins; positions are taken as independent, with P(c in bin j) = pi_j at any
position and pi'_j at a position after an accepted prefix (the ones the verifier judges:
after a rejection a draft is surer of nothing), and, for a token whose draft prefix was
accepted, P(accepted | c in bin j) = alpha_j. With threshold h (a bin's lower edge) a
position is drafted with probability p(h) = sum_{j: edge_j >= h} pi_j, and after an
accepted prefix drafted and accepted with q(h) = sum_{j >= h} pi'_j alpha_j. Per draft,
with cap L:

    drafted     E[l]  = sum_{i=1..L} p^i              (tokens uploaded and verified)
    evaluated   E[e]  = sum_{i=1..L} p^(i-1)          (forwards: each token, and the one
                                                       declined, cost one)
    committed   E[N]  = 1 + sum_{i=1..L} q^i

and the round of docs/system-model.md with random lengths: shares equalise the expected
finish times E[e_k] t_k + d_k + (b0 + E[l_k] b) / (beta_k B s_k), the round waits for
the slowest *realised* draft, T = E[max_k f_k(l_k)] + T_v(sum_k (E[l_k] + 1)) over the
devices' independent length distributions (P(l = i) = (1 - p) p^i below the cap, p^L at
it), and G = sum_k E[N_k] / T. h = 0 is a plain draft of L (p = 1). Planning with the
max of expectations instead (optimistic wherever lengths vary) chose thresholds that
lost 5-6% against the plain plan in the simulator (docs/results.md).

Plan: from the heterogeneous plan (h = 0 everywhere), each device in turn takes the
(h, L) that maximises G with the others held (every cap at its threshold, every threshold
at caps within one of its cap), until a sweep changes nothing or after MAX_SWEEPS (a best
response, as ``threshold``; in the model it never scores below its start).
"""

from __future__ import annotations

import numpy as np

from edge_controller.control.model import Plan, SystemParams, UserParams, equalised_finish_time
from edge_controller.protocol import CONFIDENCE_SCALE

BINS = 10  # of the top-1 probability: [0, 0.1), [0.1, 0.2), ..., [0.9, 1]
THRESHOLDS = np.arange(BINS) / BINS  # h candidates: the bins' lower edges (0: never stop)
MAX_SWEEPS = 4


def confidence_bins(confidence: bytes) -> np.ndarray:
    """Bin index of each top-1 probability of a ``draft.confidence`` (protocol bytes: a
    bin is 25 of them, its lower edge a threshold exactly)."""
    raw = np.frombuffer(confidence, dtype=np.uint8).astype(int)
    return np.minimum(raw * BINS // CONFIDENCE_SCALE, BINS - 1)


def _tail(counts: np.ndarray) -> np.ndarray:
    """sum_{i >= j} counts_i / sum counts, per j: the share at or above each threshold."""
    share = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1e-12)
    return np.cumsum(share[..., ::-1], axis=-1)[..., ::-1]


def stopping_rates(seen: np.ndarray, reached: np.ndarray,
                   accept_rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, q), each (K, H): p(h) and q(h) of device k at threshold THRESHOLDS[j] (module
    docstring). Per device and bin (K, BINS): ``seen``, how often evaluated positions fell
    in it; ``reached``, evaluated positions after an accepted prefix; ``accept_rate``,
    alpha_j."""
    p = np.clip(_tail(np.asarray(seen, dtype=float)), 0.0, 1.0)
    p[..., 0] = 1.0  # h = 0 drafts every position
    judged = np.asarray(reached, dtype=float)
    q = np.cumsum((judged * accept_rate)[..., ::-1], axis=-1)[..., ::-1] / np.maximum(
        judged.sum(axis=-1, keepdims=True), 1e-12)
    return p, np.clip(q, 0.0, 1.0)


def _geometric_sum(x: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sum_{i=1..n} x^i, elementwise (n at x = 1)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x < 1.0, x * (1.0 - x**n) / (1.0 - x), n)


def expected_draft(p: np.ndarray, q: np.ndarray,
                   cap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E[l], E[e], E[N]) of drafts with cap L and rates p, q (module docstring)."""
    cap = np.asarray(cap, dtype=float)
    drafted = _geometric_sum(p, cap)
    with np.errstate(divide="ignore", invalid="ignore"):
        evaluated = np.where(p > 0, drafted / p, np.minimum(cap, 1.0))
    return drafted, evaluated, 1.0 + _geometric_sum(q, cap)


def round_goodput(system: SystemParams, users: UserParams, p: np.ndarray, q: np.ndarray,
                  cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G, shares) of caps and rates (..., K) with shares equalising expected finish
    times; the round time is E[max_k f_k] over each device's distribution of draft
    lengths (independent devices), not the max of expectations."""
    cap = np.asarray(cap, dtype=int)
    drafted, evaluated, committed = expected_draft(p, q, cap)
    t, d = users.draft_s_per_token, users.delay_s
    full_band = system.bandwidth_hz * users.spectral_efficiency
    compute, upload_full_band = evaluated * t + d, system.upload_bits(drafted) / full_band
    tau = equalised_finish_time(compute, upload_full_band)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(upload_full_band > 0,
                         upload_full_band / (tau[..., None] - compute), 0.0)
    # P(l = i) for i = 0..L_max: (1 - p) p^i below the cap, p^L at it.
    lengths = np.arange(system.max_draft_len + 1)
    below = lengths < cap[..., None]
    pp = p[..., None]
    prob = np.where(below, (1.0 - pp) * pp**lengths, np.where(lengths == cap[..., None],
                                                                pp**lengths, 0.0))
    bits = (np.broadcast_to(system.overhead_bits, t.shape)[:, None]
            + np.broadcast_to(system.bits_per_token, t.shape)[:, None] * lengths)  # (K, L+1)
    with np.errstate(divide="ignore", invalid="ignore"):
        upload = np.where(share[..., None] > 0, bits / (share[..., None] * full_band[:, None]),
                          0.0)
    finish = (np.where(below, lengths + 1, lengths) * t[..., None] + d[..., None] + upload)
    # E[max]: the product of the devices' CDFs at every support point of any device.
    points = finish.reshape(*finish.shape[:-2], -1)  # (..., K (L+1))
    cdf = (prob[..., None] * (finish[..., None] <= points[..., None, None, :])).sum(axis=-2)
    joint = np.prod(np.minimum(cdf, 1.0), axis=-2)  # (..., M): P(max <= point)
    order = np.argsort(points, axis=-1)
    x, f = np.take_along_axis(points, order, -1), np.take_along_axis(joint, order, -1)
    expected_max = (x * np.diff(f, axis=-1, prepend=0.0)).sum(axis=-1)
    verify = system.verify_time.of_tokens((drafted + 1).sum(axis=-1))
    return committed.sum(axis=-1) / (expected_max + verify), share


def confidence_plan(system: SystemParams, users: UserParams, p: np.ndarray, q: np.ndarray,
                    start_len: np.ndarray, fixed_h: float = 0.0) -> tuple[Plan, np.ndarray]:
    """(plan, h): caps L_k, thresholds h_k and shares by best responses from ``start_len``
    at h = 0 (module docstring); ``p``, ``q`` (K, H) from :func:`stopping_rates`. The
    plan's draft_len are the caps, its goodput the model's. ``fixed_h`` > 0 (one of
    THRESHOLDS): every device stops at it, only the caps are chosen."""
    k_users, n_h = p.shape
    n_len = system.max_draft_len + 1
    only = int(round(fixed_h * BINS))
    h = np.full(k_users, only)
    cap = np.minimum(np.asarray(start_len, dtype=int), n_len - 1)
    users_idx = np.arange(k_users)
    best = float(round_goodput(system, users, p[users_idx, h], q[users_idx, h], cap)[0])
    thresholds = [only] if only else range(n_h)
    for _ in range(MAX_SWEEPS):
        moved = False
        for k in range(k_users):
            # Every cap at the device's threshold, every threshold at caps near its cap.
            pairs = {(int(h[k]), length) for length in range(n_len)} | {
                (j, length) for j in thresholds
                for length in range(max(cap[k] - 1, 0), min(cap[k] + 2, n_len))}
            grid_h, grid_len = np.array(sorted(pairs)).T
            rows_p = np.repeat(p[users_idx, h][None], grid_h.size, axis=0)
            rows_q = np.repeat(q[users_idx, h][None], grid_h.size, axis=0)
            rows_cap = np.repeat(cap[None], grid_h.size, axis=0)
            rows_p[:, k], rows_q[:, k], rows_cap[:, k] = p[k, grid_h], q[k, grid_h], grid_len
            goodput, _ = round_goodput(system, users, rows_p, rows_q, rows_cap)
            pick = int(np.argmax(goodput))
            if goodput[pick] > best * (1 + 1e-9):
                best, h[k], cap[k], moved = float(goodput[pick]), grid_h[pick], grid_len[pick], True
        if not moved:
            break
    pk, qk = p[users_idx, h], q[users_idx, h]
    goodput, share = round_goodput(system, users, pk, qk, cap)
    committed = expected_draft(pk, qk, cap)[2]
    round_s = float(committed.sum() / goodput)
    plan = Plan("confidence", cap, share, committed / round_s, float(goodput), round_s)
    return plan, THRESHOLDS[h]
