"""The math of lossless verification: pure torch, vectorised, no model and no state.

Glossary (one round of one session, draft ``d_1 .. d_L`` at positions ``s .. s+L-1``)::

    draft       the L tokens a device proposes, with (sampling mode) the sparse distribution
                q_draft each was sampled from: q(id) = count / sum(counts)
    accepted    n = how many leading draft tokens the target keeps (0 <= n <= L)
    correction  the token the target emits at position s+n after rejecting d_{n+1}
    bonus       the token the target emits at position s+L after accepting all L drafts
    next token  the correction or the bonus: every round yields n + 1 target tokens

Greedy: d_i is accepted while it equals the target's argmax there; the next token is the
argmax at position s+n.

Sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", algorithm 1; Chen et al. 2023): d_i is accepted with probability
``min(1, p_target(d_i) / q_draft(d_i))``; on the first rejection the correction is drawn
from ``norm(max(0, p_target - q_draft))`` (from p_target when that residual is all zero);
after a full acceptance the bonus is drawn from p_target at position s+L. The emitted
tokens then follow p_target exactly, whatever q_draft is, as long as q_draft is exactly the
distribution the device sampled from (DESIGN.md, "Lossless sampling with a compact upload").

Random numbers are never drawn from a stateful generator: :func:`keyed_uniform` hashes
``(seed, absolute position, stream)``, so a session's outcome does not depend on which
other sessions share its batch, and a seeded run reproduces exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from edge_controller.verifier.slots import SamplingParams

STREAM_ACCEPT = 0  # the uniform that accepts or rejects the draft token at a position
STREAM_SAMPLE = 1  # the uniform that samples the target's own token at a position

_MASK64 = (1 << 64) - 1
TRUNCATION_CANDIDATES = 1024  # top-k/top-p look at this many top tokens before a full sort


def _signed(c: int) -> int:
    """A 64-bit constant as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_STREAM_KEY = _signed(0xD1B54A32D192ED03)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser: a bijection of 64-bit words with full avalanche."""
    x = x ^ _shift_right(x, 30)
    x = x * _MIX1
    x = x ^ _shift_right(x, 27)
    x = x * _MIX2
    return x ^ _shift_right(x, 31)


def _int64(value: Tensor | int) -> Tensor:
    return torch.as_tensor(value, dtype=torch.int64)


def keyed_uniform(seed: Tensor | int, position: Tensor | int, stream: Tensor | int) -> Tensor:
    """Uniform numbers in [0, 1) (float64, 53 random bits) that are pure functions of the key.

    Arguments broadcast against each other (int64 tensors or ints); each output element
    depends on its own ``(seed, position, stream)`` only, so computing it alone or inside
    any batch gives the same value. Seeds are taken modulo 2**64.
    """
    if isinstance(seed, int):
        seed = _signed(seed & _MASK64)
    key = _mix64(_int64(seed) + _int64(stream) * _STREAM_KEY)
    bits = _mix64(key + _int64(position) * _GOLDEN)
    return _shift_right(bits, 11).to(torch.float64) * 2.0**-53


def _params_tensors(
    rows: list[SamplingParams], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    temperature = torch.tensor([p.temperature for p in rows], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in rows], dtype=torch.int64, device=device)
    top_p = torch.tensor([p.top_p for p in rows], dtype=torch.float32, device=device)
    return temperature, top_k, top_p


def process_logits(
    logits: Tensor,  # [N, V] raw target logits, any float dtype
    params: SamplingParams | Sequence[SamplingParams],  # one for all rows, or one per row
) -> Tensor:  # [N, V] float32: p_target, each row sums to 1
    """The distribution the target-alone reference samples from, row by row.

    transformers' warper order: temperature, then top-k (ties at the k-th value kept), then
    top-p (drop the tokens whose higher-ranked tokens already hold top_p of the mass; the top
    token always kept). Greedy rows (temperature 0) get a one-hot at the argmax.
    """
    n, _ = logits.shape
    rows = [params] * n if isinstance(params, SamplingParams) else list(params)
    if len(rows) != n:
        raise ValueError(f"need one SamplingParams per row: {len(rows)} for {n} rows")
    temperature, top_k, top_p = _params_tensors(rows, logits.device)
    scaled = logits.float() / torch.where(temperature == 0, 1.0, temperature)[:, None]
    p_target = torch.empty_like(scaled)
    kinds = [
        "greedy" if p.greedy else "cut" if p.top_k > 0 or p.top_p < 1 else "plain" for p in rows
    ]
    for kind in set(kinds):
        index = torch.tensor([i for i, k in enumerate(kinds) if k == kind], device=logits.device)
        if kind == "greedy":
            top = scaled[index].argmax(dim=-1, keepdim=True)
            p_target[index] = torch.zeros_like(scaled[index]).scatter_(1, top, 1.0)
        elif kind == "cut":
            p_target[index] = _truncated(scaled[index], top_k[index], top_p[index])
        else:
            p_target[index] = scaled[index].softmax(dim=-1)
    return p_target


def _truncated(
    scaled: Tensor,  # [M, V] float32 logits after temperature
    top_k: Tensor,  # [M] int64, 0 = off
    top_p: Tensor,  # [M] float32 in (0, 1]
) -> Tensor:  # [M, V] float32
    """Top-k then top-p, computed on the top TRUNCATION_CANDIDATES tokens (a partial sort)
    for the rows where those provably contain every kept token, on a full sort elsewhere."""
    vocab = scaled.shape[-1]
    width = min(vocab, max(TRUNCATION_CANDIDATES, int(top_k.max()) + 1))
    p_target, inside = _truncated_within(scaled, top_k, top_p, width)
    if not bool(inside.all()):
        rest = (~inside).nonzero().squeeze(1)
        p_target[rest] = _truncated_within(scaled[rest], top_k[rest], top_p[rest], vocab)[0]
    return p_target


def _truncated_within(
    scaled: Tensor,  # [M, V]
    top_k: Tensor,  # [M]
    top_p: Tensor,  # [M]
    width: int,
) -> tuple[Tensor, Tensor]:  # p_target [M, V], exact [M] bool
    """Top-k and top-p among the ``width`` highest logits; ``exact`` marks the rows where no
    kept token lies outside them: top-k rows whose ties at the k-th value do not run past
    the candidates, other rows whose candidates hold at least top_p (the rest is dropped)."""
    if width < scaled.shape[-1]:
        values, ids = scaled.topk(width, dim=-1)  # descending
    else:
        values, ids = scaled.sort(dim=-1, descending=True)
    limited = top_k > 0
    kth = values.gather(1, (top_k.clamp(1, width) - 1)[:, None])
    kept = ~limited[:, None] | (values >= kth)
    log_total = values.masked_fill(~kept, -torch.inf).logsumexp(dim=-1)
    if not bool(limited.all()):
        log_total = torch.where(limited, log_total, scaled.logsumexp(dim=-1))
    probs = (values - log_total[:, None]).exp() * kept
    exact = torch.where(limited, values[:, -1] < kth[:, 0], probs.sum(dim=-1) >= top_p)
    probs = probs * (probs.cumsum(dim=-1) - probs < top_p[:, None])  # top-p on the mass above
    p_target = torch.zeros_like(scaled).scatter_(1, ids, probs / probs.sum(-1, keepdim=True))
    return p_target, exact | (width == scaled.shape[-1])


def sample_inverse_cdf(
    weights: Tensor,  # [N, V] non-negative, each row with a positive sum (need not be normalised)
    uniform: Tensor,  # [N] in [0, 1)
) -> Tensor:  # [N] int64: token ids, never one of zero weight
    """Inverse-CDF sampling in float64: the first id whose cumulative weight exceeds u * total."""
    cdf = weights.to(torch.float64).cumsum(dim=-1)
    target = (uniform.to(torch.float64) * cdf[:, -1])[:, None]
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return ids.clamp(max=weights.shape[-1] - 1)


def sample(
    p_target: Tensor,  # [N, V] from process_logits
    seed: Tensor,  # [N] int64
    position: Tensor,  # [N] int64: absolute sequence position of the token being sampled
) -> Tensor:  # [N] int64
    """The target-alone reference's token at ``position``; the bonus token uses the same key."""
    return sample_inverse_cdf(p_target, keyed_uniform(seed, position, STREAM_SAMPLE))


def count_accepted(
    ok: Tensor,  # [B, L] bool: draft token i passes its test
    draft_len: Tensor,  # [B] int64: valid draft tokens per row (the rest is padding)
) -> Tensor:  # [B] int64: length of the leading run of passes
    """Accepted count n: the longest prefix of valid draft tokens that all pass."""
    valid = torch.arange(ok.shape[1], device=ok.device)[None, :] < draft_len[:, None]
    return (ok & valid).long().cumprod(dim=1).sum(dim=1)


def greedy_verify(
    target_argmax: Tensor,  # [B, T] int64: column j = the target's argmax after the j-th fed token
    draft: Tensor,  # [B, T-1] int64: draft tokens, padding arbitrary
    draft_len: Tensor,  # [B] int64
) -> tuple[Tensor, Tensor]:  # accepted [B], next_token [B]
    """Greedy verification: accept while the draft equals the argmax; then take the argmax."""
    accepted = count_accepted(draft == target_argmax[:, :-1], draft_len)
    next_token = target_argmax.gather(1, accepted[:, None]).squeeze(1)
    return accepted, next_token


def decided_margin(
    top2: Tensor,  # [B, T, 2]: the two largest target logits per column
    accepted: Tensor,  # [B] int64
) -> Tensor:  # [B] float32
    """Smallest top-2 logit gap over the columns that decided the outcome (0..n): a gap
    near rounding noise (< 1e-4) is where batched and unbatched runs may legally differ."""
    gap = (top2[..., 0] - top2[..., 1]).float()
    decided = torch.arange(gap.shape[1], device=gap.device)[None, :] <= accepted[:, None]
    return gap.masked_fill(~decided, torch.inf).amin(dim=1)


def sparse_q_at(
    q_ids: Tensor,  # [B, L, Kq] int64: support of each draft token's q (padding: any valid id)
    q_probs: Tensor,  # [B, L, Kq] float64: q(id), 0 on padding
    token: Tensor,  # [B, L] int64
) -> Tensor:  # [B, L] float64: q_draft(token)
    return (q_probs * (q_ids == token[..., None])).sum(dim=-1)


def residual(
    p_target: Tensor,  # [B, V]
    q_dense: Tensor,  # [B, V]
) -> Tensor:  # [B, V] float64: max(0, p - q), or p where that is all zero (unnormalised)
    """What a correction is drawn from after a rejection."""
    p = p_target.to(torch.float64)
    rest = (p - q_dense.to(torch.float64)).clamp(min=0)
    empty = rest.sum(dim=-1, keepdim=True) <= 0
    return torch.where(empty, p, rest)


def speculative_verify(
    p_target: Tensor,  # [B, T, V] float32: column j = distribution of the token at start + j
    draft: Tensor,  # [B, T-1] int64
    draft_len: Tensor,  # [B] int64
    q_ids: Tensor,  # [B, T-1, Kq] int64
    q_probs: Tensor,  # [B, T-1, Kq] float64, rows sum to 1 over valid draft tokens
    seed: Tensor,  # [B] int64
    start: Tensor,  # [B] int64: absolute position of draft[:, 0]
) -> tuple[Tensor, Tensor]:  # accepted [B], next_token [B]
    """Lossless speculative sampling with sparse draft distributions (rule in module doc).

    Worked example: start = 10, L = 3; d_1 is tested with keyed_uniform(seed, 10, ACCEPT),
    d_2 with (seed, 11, ACCEPT), ...; if d_2 is rejected (n = 1) the correction at position
    11 is drawn from the residual of column 1 with keyed_uniform(seed, 11, SAMPLE); after a
    full acceptance the bonus at position 13 is drawn from column 3 with (seed, 13, SAMPLE).
    """
    batch, width, _ = p_target.shape
    columns = torch.arange(width, device=p_target.device)
    position = start[:, None] + columns[None, :]  # [B, T]
    p_draft = p_target[:, :-1].gather(2, draft[..., None]).squeeze(2).to(torch.float64)
    q_draft = sparse_q_at(q_ids, q_probs, draft)
    u_accept = keyed_uniform(seed[:, None], position[:, :-1], STREAM_ACCEPT)
    accepted = count_accepted(u_accept * q_draft < p_draft, draft_len)

    rows = torch.arange(batch, device=p_target.device)
    p_next = p_target[rows, accepted]  # [B, V]
    rejected = accepted < draft_len
    at = accepted.clamp(max=max(width - 2, 0))
    q_dense = torch.zeros_like(p_next, dtype=torch.float64)
    if width > 1:
        q_dense.scatter_add_(1, q_ids[rows, at], q_probs[rows, at])
    q_dense = q_dense * rejected[:, None]
    u_sample = keyed_uniform(seed, start + accepted, STREAM_SAMPLE)
    next_token = sample_inverse_cdf(residual(p_next, q_dense), u_sample)
    return accepted, next_token
