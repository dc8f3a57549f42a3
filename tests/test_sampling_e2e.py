"""Sampling through the real drafter and the real target follows the target's distribution.

For many seeds, a drafter (the q4_0 llama.cpp one, then the ONNX Runtime one) samples a
4-token draft from its top-k truncated distribution, and the batched verifier accepts or
corrects it against the fp32 target. The first generated token must be distributed as
the target's own processed distribution at that position (chi-square), although the
draft's distribution differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import models
from device_agent.cli import open_drafter
from edge_controller.verifier.engine import Verifier
from edge_controller.verifier.sampling import process_logits
from edge_controller.verifier.slots import SamplingParams, VerifyItem

pytestmark = pytest.mark.slow

DRAWS = 480
BATCH = 32
PARAMS = dict(temperature=1.0, top_p=1.0, top_k=6)


def assert_follows(tokens: list[int], p: np.ndarray) -> None:
    """The drawn ``tokens`` follow the distribution ``p`` ([V]): none outside its support,
    and chi-square (rare tokens lumped into one bin) above p = 1e-3."""
    support = np.flatnonzero(p > 0)
    assert set(tokens) <= set(support.tolist()), "a token the target can never emit"
    observed = np.array([tokens.count(t) for t in support])
    expected = p[support] / p[support].sum() * len(tokens)
    keep = expected >= 5  # lump rare tokens into one bin, as chi-square needs
    observed = np.append(observed[keep], observed[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    result = stats.chisquare(observed, expected)
    assert result.pvalue > 1e-3, f"chi-square p={result.pvalue:.2e}: {observed} vs {expected}"


def target_first_token_distribution(model, prompt_ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1:].float()
    p = process_logits(logits, [SamplingParams(**PARAMS)])
    return p[0].double().numpy()


@pytest.mark.parametrize("draft", ["q4_0", "onnx"])
def test_first_tokens_follow_the_target_distribution(target, draft):
    model, _ = target
    drafter = open_drafter(str(models.ensure(include=[draft]).drafts[draft]))
    # One token: the verifier needs no prefill (it is the pending token), so a draw costs
    # little more than its draft.
    prompt = drafter.tokenize(" My", add_bos=False)[:1]
    p_target = target_first_token_distribution(model, prompt)
    verifier = Verifier(model, max_sessions=BATCH, max_len=64)

    first_tokens, accepted_first, q_first = [], 0, None
    for start in range(0, DRAWS, BATCH):
        seeds = range(start, start + BATCH)
        items = []
        for seed in seeds:
            drafter.begin(prompt)
            draft = drafter.draft(4, temperature=1.0, top_k=16, seed=seed)
            q_first = q_first or (draft.q_ids[0], draft.q_counts[0])  # same context every draw
            items.append(VerifyItem(verifier.open(prompt), draft.tokens,
                                    SamplingParams(**PARAMS, seed=seed),
                                    draft.q_ids, draft.q_counts))
        for item, outcome in zip(items, verifier.verify(items), strict=True):
            first = item.draft_tokens[0] if outcome.accepted else outcome.next_token
            accepted_first += outcome.accepted > 0
            first_tokens.append(first)
            verifier.close(item.slot)

    assert_follows(first_tokens, p_target)
    # Speculative sampling accepts the first draft token with probability sum_x min(p, q)
    # (= 1 - TV(p, q)); q is the same at the first position of every draw.
    q = np.zeros_like(p_target)
    q[q_first[0]] = np.array(q_first[1]) / sum(q_first[1])
    expected_rate = np.minimum(p_target, q).sum()
    sigma = np.sqrt(expected_rate * (1 - expected_rate) / DRAWS)
    assert abs(accepted_first / DRAWS - expected_rate) < 4 * sigma, (
        f"first-token acceptance {accepted_first / DRAWS:.3f}, expected {expected_rate:.3f}")
    assert expected_rate > 0.2  # the draft really does part of the work
