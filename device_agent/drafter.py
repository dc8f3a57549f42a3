"""The device's default drafter: a small GGUF model in llama.cpp behind ``begin / draft /
accept`` (the :class:`~device_agent.draft_engine.DraftEngine` interface).

The round loop, cache bookkeeping and sampling are
:class:`~device_agent.draft_engine.KVCacheDrafter`'s (the same for every runtime); this
module supplies llama.cpp's cache primitives and its vocabulary, and the no-drafter
device's tokenizer (:class:`TokenizerOnly`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np

from device_agent.draft_engine import ChatFormat, DraftResult, KVCacheDrafter
from edge_controller.protocol import MAX_PROMPT_TOKENS
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
        metadata = llm.metadata
        template = metadata.get("tokenizer.chat_template")

        def special(key: str) -> str:
            if key not in metadata:
                return ""
            return llm.detokenize([int(metadata[key])], special=True).decode("utf-8", "replace")

        self.chat_format = ChatFormat(
            template, special("tokenizer.ggml.bos_token_id"),
            special("tokenizer.ggml.eos_token_id")) if template else None

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


class Drafter(_Vocabulary, KVCacheDrafter):
    """A GGUF draft model in llama.cpp, its context (KV cache) reused across rounds."""

    def __init__(
        self,
        gguf_path: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int = 1,
        pace_s_per_token: float = 0.0,
    ):
        KVCacheDrafter.__init__(self, pace_s_per_token)
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
        log.info(
            "drafter %s: vocab %d, context %d, %d thread(s), fingerprint %s",
            self.model_id,
            self.vocab_size,
            self.n_ctx,
            n_threads,
            self.fingerprint,
        )

    def _cached(self) -> np.ndarray:
        return self.llm.input_ids[: self.llm.n_tokens]

    def _truncate(self, pos: int) -> None:
        """Drop cache positions >= pos (llama-cpp-python 0.3.x)."""
        memory = llama_cpp.llama_get_memory(self.llm.ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, -1, pos, -1):
            raise RuntimeError(f"llama.cpp cannot roll {self.model_id} back to position {pos}")
        self.llm.n_tokens = pos

    def _evaluate(self, tokens: list[int]) -> None:
        self.llm.eval(tokens)

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.vocab_size,)
        )
