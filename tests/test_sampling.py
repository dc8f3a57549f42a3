"""The math of lossless verification, without a model: RNG keying, logits processing,
acceptance rules, and a statistical proof that speculative sampling with a sparse q
reproduces the target distribution (issue 3)."""

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from edge_controller.verifier.sampling import (
    STREAM_ACCEPT,
    STREAM_SAMPLE,
    SamplingParams,
    count_accepted,
    decided_margin,
    greedy_verify,
    keyed_uniform,
    process_logits,
    residual,
    sample,
    sample_inverse_cdf,
    speculative_verify,
)

P_VALUE_THRESHOLD = 1e-3


# --- keyed random numbers --------------------------------------------------------------


def test_keyed_uniform_is_a_pure_function_of_its_key():
    seeds = torch.tensor([7, 7, 8, 7])
    positions = torch.tensor([100, 101, 100, 100])
    batch = keyed_uniform(seeds, positions, STREAM_ACCEPT)
    pairs = zip(seeds.tolist(), positions.tolist(), strict=True)
    alone = torch.stack([keyed_uniform(s, p, STREAM_ACCEPT) for s, p in pairs])
    assert torch.equal(batch, alone)
    assert batch[0] == batch[3]
    assert len({batch[0].item(), batch[1].item(), batch[2].item()}) == 3
    assert keyed_uniform(7, 100, STREAM_SAMPLE) != batch[0]


def test_keyed_uniform_looks_uniform_and_independent():
    u = keyed_uniform(torch.arange(200)[:, None], torch.arange(500)[None, :], STREAM_SAMPLE)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    flat = u.flatten().numpy()
    assert stats.kstest(flat, "uniform").pvalue > P_VALUE_THRESHOLD
    neighbours = np.corrcoef(u[:, :-1].flatten().numpy(), u[:, 1:].flatten().numpy())[0, 1]
    assert abs(neighbours) < 0.01


def test_keyed_uniform_accepts_seeds_beyond_int64():
    assert keyed_uniform(2**64 + 5, 3, 0) == keyed_uniform(5, 3, 0)
    assert keyed_uniform(-1, 3, 0) == keyed_uniform(2**64 - 1, 3, 0)


# --- logits processing -------------------------------------------------------------------


WARPER_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=50, top_p=0.8),
    SamplingParams(temperature=0.5, top_k=1),
]


def hf_warped(logits, params):
    scores = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(None, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(None, scores)
    return scores.softmax(dim=-1)


@pytest.mark.parametrize("params", WARPER_CASES)
@pytest.mark.parametrize(
    "vocab, scale, candidate_mass",
    [(300, 3.0, (1.0, 1.0)), (5000, 8.0, (0.95, 1.0)), (5000, 0.3, (0.0, 0.8))],
    ids=["small-vocab", "peaked-partial-sort", "flat-full-sort"],
)
def test_process_logits_matches_transformers_warpers(params, vocab, scale, candidate_mass):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1)) * scale
    # the mass of the top 1024 tokens decides whether top-p can skip the full sort
    mass = (logits / params.temperature).softmax(-1).topk(min(vocab, 1024)).values.sum(-1)
    assert candidate_mass[0] - 1e-6 <= mass.min() and mass.max() <= candidate_mass[1] + 1e-6
    expected = hf_warped(logits, params)

    p_target = process_logits(logits, params)

    torch.testing.assert_close(p_target, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(p_target > 0, expected > 0)


def test_process_logits_mixes_partial_and_full_sort_rows():
    scale = torch.tensor([8.0, 0.3, 8.0, 0.3])[:, None]  # peaked and flat rows in one call
    logits = torch.randn(4, 5000, generator=torch.Generator().manual_seed(2)) * scale
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(0.7, top_p=0.95)] * 2
    pairs = zip(logits, params, strict=True)
    expected = torch.stack([hf_warped(row[None], p)[0] for row, p in pairs])

    p_target = process_logits(logits, params)

    torch.testing.assert_close(p_target, expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(p_target > 0, expected > 0)


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[4.0, 3.0, 3.0, 3.0, 1.0]])
    p_target = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p_target > 0).tolist() == [[True, True, True, True, False]]
    torch.testing.assert_close(p_target, hf_warped(logits, SamplingParams(1.0, top_k=2)))


def test_process_logits_mixes_greedy_and_sampling_rows():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    p_target = process_logits(logits, [SamplingParams(), SamplingParams(temperature=1.0)])
    assert torch.equal(p_target[0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(p_target[1], logits[1].softmax(-1))


# --- acceptance rules ------------------------------------------------------------------


def test_count_accepted_stops_at_first_failure_and_at_draft_length():
    ok = torch.tensor(
        [[True, True, False, True], [True, True, True, True], [False, True, True, True]]
    )
    assert count_accepted(ok, torch.tensor([4, 2, 4])).tolist() == [2, 2, 0]


def test_greedy_perfect_match_takes_the_bonus():
    argmax = torch.tensor([[5, 6, 7, 8]])
    accepted, next_token = greedy_verify(argmax, torch.tensor([[5, 6, 7]]), torch.tensor([3]))
    assert (accepted.item(), next_token.item()) == (3, 8)


def test_greedy_early_mismatch_takes_the_correction():
    argmax = torch.tensor([[5, 6, 7, 8]])
    accepted, next_token = greedy_verify(argmax, torch.tensor([[5, 9, 7]]), torch.tensor([3]))
    assert (accepted.item(), next_token.item()) == (1, 6)


def test_greedy_empty_draft_is_a_decode_step_and_padding_is_ignored():
    argmax = torch.tensor([[5, 6, 7], [4, 2, 2]])
    draft = torch.tensor([[5, 6], [4, 2]])  # row 1 has one real token, then padding
    accepted, next_token = greedy_verify(argmax, draft, torch.tensor([0, 1]))
    assert accepted.tolist() == [0, 1] and next_token.tolist() == [5, 2]


def test_decided_margin_ignores_columns_after_the_decision():
    top2 = torch.tensor([[[3.0, 2.0], [5.0, 4.99], [1.0, 0.0]]])
    assert decided_margin(top2, torch.tensor([0])).item() == pytest.approx(1.0)
    assert decided_margin(top2, torch.tensor([1])).item() == pytest.approx(0.01, abs=1e-5)


def test_residual_falls_back_to_p_target_when_empty():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.3, 0.2]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.6, 0.3]])
    rest = residual(p, q)
    assert rest[0].tolist() == [0.5, 0.5, 0.0]
    torch.testing.assert_close(rest[1], torch.tensor([0.4, 0.0, 0.0], dtype=torch.float64))


def test_inverse_cdf_never_picks_a_zero_weight_token():
    weights = torch.tensor([[0.0, 1.0, 0.0, 2.0]]).expand(5, 4)
    u = torch.tensor([0.0, 0.3, 1 / 3, 0.5, 1 - 2**-53])
    assert sample_inverse_cdf(weights, u).tolist() == [1, 1, 3, 3, 3]


# --- the speculative rule reproduces the target distribution (issue 3) -------------------

VOCAB = 6
P_COLUMNS = torch.tensor(
    [
        [0.40, 0.25, 0.15, 0.10, 0.10, 0.00],  # token 5 lies outside the target's support
        [0.05, 0.30, 0.30, 0.05, 0.20, 0.10],
        [0.10, 0.10, 0.10, 0.10, 0.10, 0.50],
    ]
)
Q_IDS = torch.tensor([[0, 1, 5], [2, 3, 4]])  # sparse draft support per position
Q_COUNTS = torch.tensor([[20_000.0, 30_000.0, 15_536.0], [40_000.0, 20_000.0, 5_536.0]])
DRAWS = 60_000


def _spec_round(rule):
    """DRAWS sessions, each with a 2-token draft sampled from the sparse q; returns
    (first emitted token [DRAWS], accepted, next_token)."""
    q_probs = (Q_COUNTS / Q_COUNTS.sum(dim=1, keepdim=True)).double()
    rng = np.random.default_rng(1234)
    picks = np.stack([rng.choice(3, size=DRAWS, p=q_probs[i].numpy()) for i in range(2)], 1)
    draft = Q_IDS[torch.arange(2), torch.from_numpy(picks)]  # [DRAWS, 2]
    p_target = P_COLUMNS.expand(DRAWS, 3, VOCAB)
    seed = torch.arange(DRAWS, dtype=torch.int64) * 7919 + 17
    start = torch.full((DRAWS,), 40)
    accepted, next_token = rule(
        p_target,
        draft,
        torch.full((DRAWS,), 2),
        Q_IDS.expand(DRAWS, 2, 3),
        q_probs.expand(DRAWS, 2, 3),
        seed,
        start,
    )
    first = torch.where(accepted > 0, draft[:, 0], next_token)
    return draft, accepted, next_token, first


def _chisquare(tokens, p):
    observed = np.bincount(tokens.numpy(), minlength=VOCAB).astype(float)
    p = p.double().numpy()
    expected = p / p.sum() * observed.sum()
    support = expected > 0
    assert observed[~support].sum() == 0, "a token outside the target's support came out"
    return stats.chisquare(observed[support], expected[support]).pvalue


def _resample_from_p_on_rejection(p_target, draft, draft_len, q_ids, q_probs, seed, start):
    """A deliberately wrong rule: the common bug of drawing the correction from p_target
    instead of the residual max(0, p - q)."""
    batch, width, _ = p_target.shape
    position = start[:, None] + torch.arange(width - 1)[None, :]
    p_draft = p_target[:, :-1].gather(2, draft[..., None]).squeeze(2).double()
    q_draft = (q_probs * (q_ids == draft[..., None])).sum(-1)
    u = keyed_uniform(seed[:, None], position, STREAM_ACCEPT)
    accepted = count_accepted(u * q_draft < p_draft, draft_len)
    p_next = p_target[torch.arange(batch), accepted]
    return accepted, sample(p_next, seed, start + accepted)


def test_speculative_sampling_reproduces_the_target_distribution():
    draft, accepted, next_token, first = _spec_round(speculative_verify)

    second = torch.where(accepted > 1, draft[:, 1], next_token)[accepted >= 1]
    bonus = next_token[accepted == 2]
    assert _chisquare(first, P_COLUMNS[0]) > P_VALUE_THRESHOLD
    assert _chisquare(second, P_COLUMNS[1]) > P_VALUE_THRESHOLD
    assert _chisquare(bonus, P_COLUMNS[2]) > P_VALUE_THRESHOLD
    assert len(bonus) > 1000 and (accepted == 0).sum() > 1000  # every path exercised


def test_the_distribution_test_rejects_a_wrong_rule():
    _, _, _, first = _spec_round(_resample_from_p_on_rejection)
    assert _chisquare(first, P_COLUMNS[0]) < P_VALUE_THRESHOLD


def test_speculative_outcome_does_not_depend_on_the_batch():
    draft, accepted, next_token, _ = _spec_round(speculative_verify)
    q_probs = (Q_COUNTS / Q_COUNTS.sum(dim=1, keepdim=True)).double()
    for b in (0, 17, DRAWS - 1):
        acc, nxt = speculative_verify(
            P_COLUMNS[None],
            draft[b : b + 1],
            torch.tensor([2]),
            Q_IDS[None],
            q_probs[None],
            torch.tensor([b * 7919 + 17]),
            torch.tensor([40]),
        )
        assert (acc.item(), nxt.item()) == (accepted[b].item(), next_token[b].item())


def test_bonus_token_equals_the_target_alone_sample():
    p = torch.tensor([[[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]])
    seed, start = torch.tensor([99]), torch.tensor([12])
    acc, nxt = speculative_verify(
        p,
        torch.tensor([[1]]),
        torch.tensor([1]),
        torch.tensor([[[1]]]),
        torch.ones(1, 1, 1, dtype=torch.float64),
        seed,
        start,
    )
    assert acc.item() == 1
    assert nxt.item() == sample(p[:, 1], seed, start + 1).item()
