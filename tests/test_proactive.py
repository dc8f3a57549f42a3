"""Proactive drafting (docs/scheduling.md): a device drafts on while its draft is verified,
and uses what it drafted only when the verdict confirms its guess. Real drafter, real
verifier, real controller and sockets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import stats

from device_agent.agent import confirmed_predraft
from device_agent.drafter import Drafter, DraftResult
from edge_controller import protocol as P
from edge_controller.launch import AgentSpec, run_agents
from edge_controller.verifier.engine import Verifier
from edge_controller.verifier.sampling import process_logits
from edge_controller.verifier.slots import SamplingParams, VerifyItem
from models.target import greedy_mismatch

PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def drafter(default_models):
    return Drafter(default_models.drafts["q4_0"], n_ctx=512)


def _verdict(tokens: list[int], accepted: int, done: bool = False) -> P.Verdict:
    return P.Verdict("r", 0, accepted, tokens, done, 4)


def test_a_pre_draft_counts_only_when_the_verdict_confirms_the_guess():
    pre = DraftResult([7, 8, 9], [[7], [8], [9]], [[1], [1], [1]])
    uploaded = [1, 2, 3]

    confirmed = confirmed_predraft(pre, uploaded, _verdict([1, 2, 3, 7], 3))
    assert confirmed.tokens == [8, 9] and confirmed.q_ids == [[8], [9]]
    # A rejection (even one whose correction is the guess), another bonus, a done request.
    assert confirmed_predraft(pre, uploaded, _verdict([1, 2, 7], 2)) is None
    assert confirmed_predraft(pre, uploaded, _verdict([1, 2, 3, 6], 3)) is None
    assert confirmed_predraft(pre, uploaded, _verdict([1, 2, 3, 7], 3, done=True)) is None
    assert confirmed_predraft(pre, [], _verdict([7], 0)).tokens == [8, 9]  # L = 0 rounds too


def test_a_confirmed_pre_draft_is_the_draft_the_next_round_would_draft(drafter, default_models):
    prompt = drafter.tokenize(PROMPT)
    drafter.begin(prompt)
    uploaded = drafter.draft(4).tokens
    pre = drafter.draft(6, after=uploaded)
    # The verdict confirms the guess: all four accepted, the bonus the guess.
    drafter.accept(uploaded + pre.tokens[:1])
    ahead = confirmed_predraft(pre, uploaded, _verdict(uploaded + pre.tokens[:1], 4))

    fresh = Drafter(default_models.drafts["q4_0"], n_ctx=512)
    fresh.begin(prompt + uploaded + pre.tokens[:1])
    assert ahead.tokens == fresh.draft(5).tokens
    # Drafting on from the pre-draft evaluates only its last token, then the new ones.
    more = drafter.draft(3, after=ahead.tokens)
    assert drafter.last_round_evaluated == 3
    fresh.accept(ahead.tokens)
    assert more.tokens == fresh.draft(3).tokens


@pytest.mark.parametrize("accepted", [0, 2, 4])
def test_rollback_leaves_the_cache_as_if_there_had_been_no_pre_draft(drafter, default_models,
                                                                     accepted):
    """A verdict that rejects part of the draft (or accepts it with another bonus than the
    guess): the next draft and the cache's tokens equal a drafter's that never pre-drafted."""
    prompt = drafter.tokenize(PROMPT)
    plain = Drafter(default_models.drafts["q4_0"], n_ctx=512)
    for d in (drafter, plain):
        d.begin(prompt)
    uploaded = drafter.draft(4).tokens
    assert plain.draft(4).tokens == uploaded
    pre = drafter.draft(8, after=uploaded)
    other = (pre.tokens[0] + 1) % drafter.vocab_size  # never the guess
    committed = uploaded[:accepted] + [other]
    assert confirmed_predraft(pre, uploaded, _verdict(committed, accepted)) is None

    for d in (drafter, plain):
        d.accept(committed)
    after_pre, after_plain = drafter.draft(5), plain.draft(5)

    assert after_pre.tokens == after_plain.tokens
    # All accepted: the pre-draft had already evaluated the last uploaded token, one
    # evaluation the plain drafter makes now; otherwise the same work.
    saved = 1 if accepted == len(uploaded) else 0
    assert drafter.last_round_evaluated == plain.last_round_evaluated - saved
    held = drafter.llm.input_ids[: drafter.llm.n_tokens].tolist()
    assert held == plain.llm.input_ids[: plain.llm.n_tokens].tolist()
    assert held == prompt + committed + after_pre.tokens[:-1]


def test_a_pre_draft_stops_after_the_token_in_hand(drafter):
    drafter.begin(drafter.tokenize(PROMPT))
    uploaded = drafter.draft(2).tokens
    asked = []

    def verdict_in() -> bool:
        asked.append(True)
        return len(asked) == 3  # the verdict arrives while the third token is drafted

    pre = drafter.draft(10, after=uploaded, stop=verdict_in)
    assert len(pre.tokens) == 3 and drafter.drafted_tokens == 5


def test_sampling_after_a_confirmed_guess_follows_the_target(target, default_models):
    """The sparse-q rule on the proactive path. Round 1 uploads an empty draft (the verdict
    is the target's sample at position 1); meanwhile the device guesses the token at 1
    and pre-drafts one at 2. When the guess is confirmed, round 2 uploads the pre-drafted
    token with its q; the token the verifier then commits at position 2 must follow the
    target's processed distribution given the confirmed prefix (chi-square, for the most
    frequent confirmed guess: a fixed context)."""
    model, _ = target
    params = dict(temperature=0.6, top_p=1.0, top_k=6)
    drafter = Drafter(default_models.drafts["q8_0"], n_threads=1)
    # After " The" the target's first token is nearly sure (and the q8_0 draft's top-4
    # guess mostly confirmed), its second spread out.
    prompt = drafter.tokenize(" The", add_bos=False)[:1]
    verifier = Verifier(model, max_sessions=32, max_len=16)
    by_guess: dict[int, list[int]] = {}
    for start in range(0, 480, 32):
        rounds = []
        for seed in range(start, start + 32):
            drafter.begin(prompt)
            uploaded = drafter.draft(0, temperature=0.6, top_k=4, seed=seed)
            pre = drafter.draft(2, temperature=0.6, top_k=4, seed=seed, after=uploaded.tokens)
            sampling = SamplingParams(**params, seed=seed)
            rounds.append((VerifyItem(verifier.open(prompt), [], sampling), pre))
        outcomes = verifier.verify([item for item, _ in rounds])
        second = []
        for (item, pre), outcome in zip(rounds, outcomes, strict=True):
            verdict = _verdict([outcome.next_token], 0)
            ahead = confirmed_predraft(pre, [], verdict)
            if ahead is None:
                verifier.close(item.slot)
                continue
            second.append((VerifyItem(item.slot, ahead.tokens[:1], item.sampling, ahead.q_ids[:1],
                                      ahead.q_counts[:1]), pre.tokens[0]))
        for (item, guess), outcome in zip(second, verifier.verify([i for i, _ in second]),
                                          strict=True):
            token = item.draft_tokens[0] if outcome.accepted else outcome.next_token
            by_guess.setdefault(guess, []).append(token)
            verifier.close(item.slot)

    guess, tokens = max(by_guess.items(), key=lambda kv: len(kv[1]))
    assert len(tokens) >= 250, {g: len(t) for g, t in by_guess.items()}
    with torch.no_grad():
        logits = model(torch.tensor([prompt + [guess]])).logits[0, -1:].float()
    p = process_logits(logits, [SamplingParams(**params)])[0].double().numpy()
    support = np.flatnonzero(p > 0)
    assert set(tokens) <= set(support.tolist()), "a token the target can never emit"
    observed = np.array([tokens.count(t) for t in support])
    expected = p[support] / p[support].sum() * len(tokens)
    keep = expected >= 5
    observed = np.append(observed[keep], observed[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    result = stats.chisquare(observed, expected)
    assert result.pvalue > 1e-3, f"chi-square p={result.pvalue:.2e}: {observed} vs {expected}"


@pytest.mark.slow
def test_proactive_devices_get_the_targets_output_and_use_only_confirmed_pre_drafts(
    run_controller, target, default_models, lab_keys, tmp_path
):
    """Two devices under --scheduler proactive, one paced so slowly (0.1 s a token) that
    verdicts arrive while it pre-drafts: both target-identical (greedy), every token
    there; drafts carried pre-drafted tokens only after verdicts that accepted the whole
    draft before them (the controller refuses any other), and the paced device's
    pre-drafts were cut short by its verdicts."""
    timeline = tmp_path / "timeline.jsonl"
    specs = [
        AgentSpec("fast", default_models.drafts["q8_0"],
                  "The three most important inventions of the last century are", 40),
        AgentSpec("paced", default_models.drafts["q4_0"],
                  "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n", 24,
                  extra=("--draft-pace", "0.1")),
    ]
    with run_controller(server__scheduler="proactive", server__timeline=str(timeline),
                        control__policy="fixed", control__draft_len=4) as controller:
        results = [runs[0] for runs in run_agents(controller.endpoint, specs, lab_keys)]
    for spec, result in zip(specs, results, strict=True):
        assert len(result["tokens"]) == spec.max_new_tokens
        problem, _ = greedy_mismatch(target, result["prompt_tokens"], result["tokens"],
                                     spec.max_new_tokens)
        assert problem is None, (spec.device_id, problem)
        s = result["stats"]
        assert s["predraft_rounds"] > 0 and s["predraft_paid"] > 0, (spec.device_id, s)
        assert s["predraft_used"] > 0
        assert s["predrafted"] == (s["predraft_used"] + s["predraft_wasted"]
                                   + s["predraft_paid"])
    paced = results[1]["stats"]
    assert paced["predrafted"] < 5 * paced["predraft_rounds"]  # cut short: 1 + L = 5 at most
    rounds = [json.loads(line) for line in timeline.read_text().splitlines()
              if '"verify_s"' in line]
    for device in ("fast", "paced"):
        mine = [d for r in rounds for d in r["devices"] if d["device"] == device]
        used = [i for i, d in enumerate(mine) if d["predrafted"]]
        assert used, device
        assert all(mine[i - 1]["accepted"] == mine[i - 1]["draft_len"] for i in used)
        assert sum(d["predrafted"] for d in mine) == results[
            [s.device_id for s in specs].index(device)]["stats"]["predraft_used"]
