"""Proactive drafting (docs/scheduling.md): a device drafts on while its draft is verified,
and uses what it drafted only when the verdict confirms its guess. Real drafter, real
verifier, real controller and sockets."""

from __future__ import annotations

import json
import time

import pytest
import torch

from device_agent.agent import DeviceAgent, SamplingOptions, confirmed_predraft
from device_agent.draft_engine import DraftResult
from device_agent.drafter import Drafter
from edge_controller import protocol as P
from edge_controller.launch import AgentSpec, run_agents
from edge_controller.verifier.engine import Verifier
from edge_controller.verifier.sampling import process_logits
from edge_controller.verifier.slots import SamplingParams, VerifyItem
from models.target import greedy_mismatch
from tests.test_sampling_e2e import assert_follows

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


def test_every_pre_drafted_token_is_settled_however_the_request_ends():
    """predrafted = paid + used + wasted: after a rejection, a partly used confirmed
    pre-draft, and a request that ends (a cancel, a broken verdict, a lost link) with a
    pre-draft in flight or a confirmed one not yet uploaded."""
    from device_agent.agent import GenerationStats, _Predrafts

    def balanced(s: GenerationStats) -> bool:
        return s.predrafted == s.predraft_paid + s.predraft_used + s.predraft_wasted

    stats = GenerationStats()
    book = _Predrafts(stats)
    book.drafted(DraftResult([7, 8, 9]))
    book.answered([1, 2], _verdict([1, 5], 1))  # rejected
    assert book.ahead is None and stats.predraft_wasted == 3 and balanced(stats)
    book.drafted(DraftResult([7, 8, 9]))
    book.answered([1, 2], _verdict([1, 2, 7], 2))  # confirmed: 8, 9 ahead
    assert book.ahead.tokens == [8, 9] and stats.predraft_paid == 1
    book.uploaded(1)  # the next draft took 8
    assert (stats.predraft_used, stats.predraft_wasted) == (1, 4) and balanced(stats)
    for end in ("in flight", "ahead"):
        book.drafted(DraftResult([7, 8, 9]))
        if end == "ahead":
            book.answered([1, 2], _verdict([1, 2, 7], 2))
        book.drop()
        assert book.pre is None and book.ahead is None and balanced(stats), end
    assert stats.predraft_rounds == 4 and stats.predrafted == 12


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
    """The sparse-q rule on the proactive path, as the agent runs it. Round 1 uploads a
    one-token draft d (sampled at position 1); meanwhile the device guesses the token at 2
    and pre-drafts one at 3 (1 + L tokens). When the verdict accepts d with the guess as
    its bonus, round 2's draft is the pre-drafted token with its q (the agent's
    ``_draft``); the token the verifier then commits at position 3 must follow the
    target's processed distribution given the confirmed prefix (chi-square, for the most
    frequent confirmed prefix: a fixed context)."""
    model, _ = target
    params = dict(temperature=0.6, top_p=1.0, top_k=6)
    sampling = SamplingOptions(temperature=0.6, draft_top_k=4)
    drafter = Drafter(default_models.drafts["q8_0"], n_threads=1)
    agent = DeviceAgent(drafter, link=None)  # only its drafting, no link
    # After " We" the q8_0 draft's first two tokens mostly agree with the target's (the
    # path is confirmed ~40% of the time) and the third is spread out.
    prompt = drafter.tokenize(" We", add_bos=False)[:1]
    verifier = Verifier(model, max_sessions=32, max_len=16)
    by_prefix: dict[tuple[int, int], list[int]] = {}
    for start in range(0, 480, 32):
        first, second = [], []
        for seed in range(start, start + 32):
            sampling.seed = seed
            drafter.begin(prompt)
            uploaded, _ = agent._draft(1, sampling, None)
            pre = drafter.draft(2, temperature=0.6, top_k=4, seed=seed, after=uploaded.tokens)
            first.append((VerifyItem(verifier.open(prompt), uploaded.tokens,
                                     SamplingParams(**params, seed=seed), uploaded.q_ids,
                                     uploaded.q_counts), pre, seed))
        for (item, pre, seed), outcome in zip(first, verifier.verify([f[0] for f in first]),
                                              strict=True):
            committed = item.draft_tokens[: outcome.accepted] + [outcome.next_token]
            ahead = confirmed_predraft(pre, item.draft_tokens,
                                       _verdict(committed, outcome.accepted))
            if ahead is None:
                verifier.close(item.slot)
                continue
            sampling.seed = seed
            drafter.begin(prompt)
            drafter.accept(committed)
            draft, predrafted = agent._draft(1, sampling, ahead)
            assert predrafted == 1 and draft.tokens == ahead.tokens[:1]
            second.append((VerifyItem(item.slot, draft.tokens, item.sampling, draft.q_ids,
                                      draft.q_counts), tuple(committed)))
        for (item, prefix), outcome in zip(second, verifier.verify([s[0] for s in second]),
                                           strict=True):
            token = item.draft_tokens[0] if outcome.accepted else outcome.next_token
            by_prefix.setdefault(prefix, []).append(token)
            verifier.close(item.slot)

    prefix, tokens = max(by_prefix.items(), key=lambda kv: len(kv[1]))
    assert len(tokens) >= 120, {p: len(t) for p, t in by_prefix.items()}
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1:].float()
    assert_follows(tokens, process_logits(logits, [SamplingParams(**params)])[0].double().numpy())


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
        assert s["predrafted"] == (s["predraft_used"] + s["predraft_wasted"]
                                   + s["predraft_paid"])
    assert results[0]["stats"]["predraft_used"] > 0  # the fast device's pre-drafts went up
    # The paced one's verdicts came while it pre-drafted (often after its guess alone).
    assert results[1]["stats"]["predraft_cut"] > 0
    rounds = [json.loads(line) for line in timeline.read_text().splitlines()
              if '"verify_s"' in line]
    for device in ("fast", "paced"):
        mine = [d for r in rounds for d in r["devices"] if d["device"] == device]
        used = [i for i, d in enumerate(mine) if d["predrafted"]]
        assert used or device == "paced", device
        assert all(mine[i - 1]["accepted"] == mine[i - 1]["draft_len"] for i in used)
        assert sum(d["predrafted"] for d in mine) == results[
            [s.device_id for s in specs].index(device)]["stats"]["predraft_used"]


def test_a_verdict_arriving_while_pre_drafting_ends_it_and_is_held_in_order(default_models):
    """Real ZeroMQ: a controller-side ROUTER sends a control, a pong, the verdict and an
    error while the device pre-drafts (paced 50 ms a token, up to 4 tokens). The pre-draft
    ends after the token in hand; the control is applied, the pong dropped, and the
    verdict and the error wait in order for the agent's usual wait: nothing is lost. With
    the verdict already in, no pre-draft starts at all."""
    import threading

    import zmq

    from device_agent.agent import ControllerError, _Request
    from device_agent.link import ControllerLink

    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link = ControllerLink(f"tcp://127.0.0.1:{port}", timeout_s=5.0)
    drafter = Drafter(default_models.drafts["q4_0"], n_ctx=512, pace_s_per_token=0.05)
    agent = DeviceAgent(drafter, link)
    agent.welcome = P.Welcome("dev", "target", 64, 8, [2], predraft_len=8)
    agent._request_id = "r"
    try:
        link.send(P.Ping(0.0))
        route, _ = router.recv_multipart()
        request = _Request("r", drafter.tokenize(PROMPT), 32, SamplingOptions())
        drafter.begin(request.prompt_ids)
        uploaded = drafter.draft(3).tokens
        verdict = P.Verdict("r", 0, 3, uploaded + [7], False, 3)
        answers = (P.Control(5, 0.5, 0.0), P.Pong(0.0), verdict,
                   P.Error("invalid", "later", request_id="r"))

        def answer(after_s: float) -> None:
            time.sleep(after_s)
            for msg in answers:
                router.send_multipart([route, P.encode(msg)])

        sender = threading.Thread(target=answer, args=(0.08,))  # while token 2 is drafted
        sender.start()
        pre = agent._predraft(request, uploaded, 3)
        sender.join()

        assert pre is not None and pre.stopped and 1 < len(pre.tokens) < 4, pre
        assert agent.control == P.Control(5, 0.5, 0.0)
        assert agent._expect(P.Verdict) == verdict
        with pytest.raises(ControllerError, match="later"):
            agent._expect(P.Verdict)

        answer(0.0)  # the next verdict already waits: nothing is pre-drafted
        deadline = time.monotonic() + 5
        while not link.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent._predraft(request, uploaded, 3) is None
        assert agent._expect(P.Verdict) == verdict
    finally:
        link.close()
        router.close(0)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["continuous", "proactive"])
def test_the_controller_refuses_pre_drafts_it_did_not_allow(run_controller, target_info,
                                                           lab_keys, scheduler):
    """A raw device: told it may not pre-draft (continuous), any pre-drafted token is
    refused; allowed (proactive), a pre-draft after a verdict that rejected part of the
    draft before it, and more tokens than its cap less the guess, are refused too. The
    request goes on: the honest draft of the same round is verified."""
    from device_agent.link import ControllerLink

    def expect(link: ControllerLink, kind: type[P.Message]) -> P.Message:
        while not isinstance(msg := link.receive(timeout_s=60), kind):
            assert not isinstance(msg, P.Error), msg
        return msg

    with run_controller(server__scheduler=scheduler, server__predraft_len=3,
                        control__policy="fixed", control__draft_len=2) as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("raw"),
                           timeout_s=60) as link:
        link.send(P.Hello("raw", "handmade", target_info.fingerprint, target_info.vocab_size,
                          {"predraft": True}))
        welcome = expect(link, P.Welcome)
        assert welcome.predraft_len == (3 if scheduler == "proactive" else 0)
        prompt = [1, 9690, 198]
        link.send(P.Start("r", prompt, 16))
        expect(link, P.Control)
        link.send(P.Draft("r", 0, len(prompt), [0, 0]))  # token 0: surely rejected
        verdict = expect(link, P.Verdict)
        assert verdict.accepted < 2
        position = len(prompt) + len(verdict.tokens)
        refusals = [P.Draft("r", 1, position, [5, 6], predrafted=1)]
        if scheduler == "proactive":
            refusals.append(P.Draft("r", 1, position, [5, 6, 7], predrafted=3))
        for bad in refusals:
            link.send(bad)
            error = link.receive(timeout_s=60)
            assert isinstance(error, P.Error) and error.code == "invalid", error
            assert "pre-draft" in error.message
        link.send(P.Draft("r", 1, position, [5, 6]))
        assert expect(link, P.Verdict).round == 1
