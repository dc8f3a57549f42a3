"""The device's drafter: a small GGUF model in llama.cpp behind ``begin / draft / accept``
(the :class:`~device_agent.draft_engine.DraftEngine` interface).

KV cache reuse. The llama.cpp context lives across rounds. Two sequences matter: the
*committed* one (prompt + every round's committed tokens, ``self.sequence``) and the
*evaluated* one (what the KV cache holds: ``llm.input_ids[:llm.n_tokens]``, which also
holds last round's draft tokens). ``draft`` truncates the cache to their longest common
prefix, capped at ``len(sequence) - 1`` so the newest committed token is evaluated again
and its logits are fresh, evaluates the rest of the committed sequence, then n times:
read the newest logits, pick a draft token, evaluate it (all but the last one, which the
next round evaluates only if it was accepted). Worked example, 5-token prompt P, L = 3::

    round 1  evaluate P (5) + d1 d2 (2)                           7 evaluations
             verdict: d1 accepted, correction c -> sequence P d1 c
    round 2  keep P d1 (6), evaluate c (1) + e1 e2 (2)            3 = L
             verdict: all accepted, bonus b -> sequence P d1 c e1 e2 e3 b
    round 3  keep up to e2 (9), evaluate e3 b (2) + 2 drafts      4 = L + 1

After the first round a round evaluates at most L + 1 tokens (DESIGN.md allows L + 2),
plus one for each L = 0 round just before it: a round with L = 0 evaluates nothing, so an
idle device uploads at once, and its committed token joins the next round's batch.

Sampling (temperature > 0) is lossless only if the uploaded q is exactly what the token
was drawn from (DESIGN.md, "Lossless sampling with a compact upload"): :func:`sparse_q`
quantises the top-k of ``softmax(logits / temperature)`` to the wire's integer counts,
and :func:`sample_sparse` draws from exactly ``counts / sum(counts)`` with a numpy
generator keyed by (seed, absolute position), never through llama.cpp's sampler chain.
A position's random numbers only ever decide draft tokens at that position, and a draft
token that is not committed is discarded, so reusing them when a position is drafted
again after a rejection keeps drafts independent of the verifier's coins.

Pre-drafting (proactive drafting, docs/scheduling.md). While a draft is verified, the
agent drafts on past it: ``draft(n, after=uploaded)`` drafts after the committed sequence
*followed by* ``after``, as if it were committed: first the guess for the bonus token,
then the tokens after it. If the verdict commits exactly ``after`` + the guess, the
tokens past the guess are what the next round would draft: the same context, the same
positions, so the same random numbers (sampling) and the same greedy choices. Otherwise
they are dropped, and the next ``draft`` rolls the cache back to the committed sequence
like any rejected draft: the pre-draft leaves no trace. ``stop`` is asked after each
token, so that a verdict arriving while the device pre-drafts ends the pre-draft after
the token in hand (a paced token still takes its whole time, as on a slower board).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from device_agent.draft_engine import DraftResult, position_rng, sample_sparse, sparse_q
from edge_controller.protocol import MAX_PROMPT_TOKENS, MAX_TOP_K
from models.fingerprint import fingerprint_llama, llama_token_pieces

log = logging.getLogger(__name__)


@functools.cache
def cpu_has_amx() -> bool:
    """The CPU has Intel AMX (INT8 tiles): Sapphire Rapids and later Xeons."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        return any(line.startswith("flags") and " amx_int8" in line for line in cpuinfo)
    return False


@contextlib.contextmanager
def _plain_weight_buffers() -> Iterator[None]:
    """Models loaded in this block keep their weights in plain CPU buffers.

    llama-cpp-python 0.3.36 (llama.cpp built with -march=native) crashes in its first
    decode of a Q4_0 or Q8_0 model on CPUs with AMX, whose kernels its "extra buffer
    types" select for those formats; Q5_0, which AMX does not take, runs. The bindings
    expose the switch (``use_extra_bufts``) only through the default model parameters,
    so they are wrapped while a model loads."""
    if not cpu_has_amx():
        yield
        return
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def plain():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = plain
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults


def load_llama(gguf_path: str | Path, **kwargs) -> llama_cpp.Llama:
    """``llama_cpp.Llama(model_path=gguf_path, **kwargs)``, safe on AMX CPUs."""
    with _plain_weight_buffers():
        return llama_cpp.Llama(model_path=str(gguf_path), **kwargs)


class _Vocabulary:
    """A loaded GGUF's tokenizer: ids <-> bytes, its fingerprint, its end-of-generation ids."""

    def _load_vocabulary(self, llm: llama_cpp.Llama, gguf_path: Path) -> None:
        self.llm = llm
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.model_id = gguf_path.stem
        self.vocab_size = llm.n_vocab()
        self.fingerprint = fingerprint_llama(llm)
        self.eos_token_ids = [
            i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self.vocab, i)
        ]

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) are parsed."""
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def detokenize(self, ids: list[int]) -> bytes:
        """The bytes of ``ids`` (control tokens render to nothing); safe to stream per round."""
        return b"".join(llama_token_pieces(self.vocab, ids, special=False))


class TokenizerOnly(_Vocabulary):
    """A device without a drafter (``--draft none``): the draft GGUF's vocabulary only, no
    weights. It tokenizes and fingerprints exactly as the drafter would, and the controller
    decodes its requests (protocol version 5, ``server_decode``)."""

    drafts = False

    def __init__(self, gguf_path: str | Path):
        gguf_path = Path(gguf_path)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"tokenizer model {gguf_path} does not exist")
        self._load_vocabulary(
            llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, n_ctx=16, verbose=False),
            gguf_path,
        )
        self.model_id = f"none ({gguf_path.stem} tokenizer)"
        self.n_ctx = MAX_PROMPT_TOKENS + 1  # no context of its own: the wire's limit
        log.info("no drafter: %s's tokenizer (vocab %d, fingerprint %s); the controller "
                 "decodes", gguf_path.stem, self.vocab_size, self.fingerprint)

    def begin(self, prompt_ids: list[int]) -> None:
        """Nothing to evaluate: the controller holds the sequence."""

    def draft(self, n: int, **options) -> DraftResult:
        raise RuntimeError("no drafter here (--draft none): the controller decodes")

    def accept(self, committed: list[int]) -> None:
        """Nothing to keep in step with."""


class Drafter(_Vocabulary):
    """A GGUF draft model with a KV cache reused across rounds.

    Counters (read by telemetry): ``evaluated_tokens`` (total evaluated by llama.cpp),
    ``last_round_evaluated``, ``rounds`` (draft calls), ``drafted_tokens``.
    """

    drafts = True

    def __init__(
        self,
        gguf_path: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int = 1,
        pace_s_per_token: float = 0.0,
    ):
        gguf_path = Path(gguf_path)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"draft model {gguf_path} does not exist")
        llm = load_llama(
            gguf_path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=False,
            verbose=False,
        )
        model = llm.model
        if llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model):
            raise ValueError(
                f"{gguf_path.name} is a recurrent/hybrid model: its cache cannot be rolled "
                "back to an accepted prefix; drafts must be pure-attention models"
            )
        self._load_vocabulary(llm, gguf_path)
        self.n_ctx = self.llm.n_ctx()
        self.pace_s_per_token = pace_s_per_token
        self.sequence: list[int] = []  # prompt + committed tokens
        self.evaluated_tokens = 0
        self.last_round_evaluated = 0
        self.rounds = 0
        self.drafted_tokens = 0
        log.info(
            "drafter %s: vocab %d, context %d, %d thread(s), fingerprint %s",
            self.model_id,
            self.vocab_size,
            self.n_ctx,
            n_threads,
            self.fingerprint,
        )

    def begin(self, prompt_ids: list[int]) -> None:
        """Start a request. Nothing is evaluated yet: the first draft evaluates the prompt,
        reusing whatever prefix the cache shares with it."""
        if not 0 < len(prompt_ids) < self.n_ctx:
            raise ValueError(f"prompt must hold 1..{self.n_ctx - 1} tokens")
        self.sequence = list(prompt_ids)

    def draft(
        self, n: int, *, temperature: float = 0.0, top_k: int = 32, seed: int = 0,
        after: Sequence[int] = (), stop: Callable[[], bool] | None = None,
    ) -> DraftResult:
        """Draft ``n`` tokens after the committed sequence and ``after`` (greedy if
        temperature == 0). ``stop()``, asked after each token, ends the draft early by
        returning True."""
        started = time.perf_counter()
        if not self.sequence:
            raise RuntimeError("draft() before begin()")
        context = self.sequence + list(after)
        if len(context) + n > self.n_ctx:
            raise ValueError(
                f"{len(context)} + {n} tokens exceed the context of {self.n_ctx}"
            )
        if temperature < 0 or not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"need temperature >= 0 and 1 <= top_k <= {MAX_TOP_K}")
        evaluated_before = self.evaluated_tokens
        result = DraftResult(tokens=[])
        for i in range(n):
            token_started = time.perf_counter()
            if i == 0:
                self._sync(context)
            else:
                self._eval(result.tokens[-1:])
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab_size,)
            )
            if temperature == 0:
                token = int(np.argmax(logits))
            else:
                ids, counts = sparse_q(logits, temperature, top_k)
                position = len(context) + i
                token = sample_sparse(ids, counts, position_rng(seed, position))
                result.q_ids.append(ids.tolist())
                result.q_counts.append(counts.tolist())
            result.tokens.append(token)
            spare = self.pace_s_per_token - (time.perf_counter() - token_started)
            if spare > 0:  # a paced token takes its time, whatever arrives meanwhile
                time.sleep(spare)
            if stop is not None and i + 1 < n and stop():
                result.stopped = True
                break
        self.rounds += 1
        self.drafted_tokens += len(result.tokens)
        self.last_round_evaluated = self.evaluated_tokens - evaluated_before
        result.seconds = time.perf_counter() - started
        return result

    def accept(self, committed: list[int]) -> None:
        """Append the round's committed tokens (accepted drafts + correction or bonus)."""
        self.sequence.extend(committed)

    def _sync(self, context: list[int]) -> None:
        """Make the cache hold ``context``, its newest token freshly evaluated."""
        evaluated = self.llm.input_ids[: self.llm.n_tokens]
        shared = np.asarray(context[: len(evaluated)])
        mismatch = np.flatnonzero(evaluated[: len(shared)] != shared)
        keep = min(int(mismatch[0]) if mismatch.size else len(shared), len(context) - 1)
        if keep < self.llm.n_tokens:
            self._truncate(keep)
        self._eval(context[keep:])

    def _truncate(self, pos: int) -> None:
        """Drop cache positions >= pos (llama-cpp-python 0.3.x)."""
        memory = llama_cpp.llama_get_memory(self.llm.ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, -1, pos, -1):
            raise RuntimeError(f"llama.cpp cannot roll {self.model_id} back to position {pos}")
        self.llm.n_tokens = pos

    def _eval(self, tokens: list[int]) -> None:
        self.llm.eval(tokens)
        self.evaluated_tokens += len(tokens)
