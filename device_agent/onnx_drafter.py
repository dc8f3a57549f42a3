"""A drafter on ONNX Runtime: an onnxruntime-genai model directory behind the
:class:`~device_agent.draft_engine.DraftEngine` interface, for boards and phones where
llama.cpp is not the best runtime (QNN, CoreML, CUDA, TensorRT-RTX, ... providers).

onnxruntime-genai's ``Generator`` holds the KV cache: ``append_tokens`` evaluates tokens,
``get_logits`` reads the newest position's logits, ``rewind_to`` rolls the cache back to
any length. Those are exactly :class:`~device_agent.draft_engine.KVCacheDrafter`'s
primitives, so the round loop, sampling (our own sparse q, never the runtime's sampler)
and counters are the llama.cpp drafter's, unchanged. docs/models.md says why genai and
not plain onnxruntime.

The vocabulary needs neither transformers, torch nor llama.cpp: ids <-> bytes and the
fingerprint come from the directory's ``tokenizer.json`` (:mod:`models.fingerprint`,
standard library), tokenizing from genai's own tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from device_agent.draft_engine import ChatFormat, KVCacheDrafter
from models.fingerprint import fingerprint_pieces, tokenizer_json_pieces

log = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"  # what makes a directory an onnxruntime-genai model
# ``--execution-provider`` names -> onnxruntime-genai's (0.18). Only cpu is tested here; the
# others need their hardware and a genai/onnxruntime build with them (the PyPI wheels for
# Linux x86 have none). ONNX Runtime's NNAPI provider is not among genai's: docs/models.md.
PROVIDERS = {"cpu": "", "cuda": "cuda", "tensorrt-rtx": "NvTensorRtRtx", "qnn": "QNN",
             "coreml": "CoreML", "xnnpack": "XNNPACK", "openvino": "OpenVINO",
             "webgpu": "WebGPU", "dml": "DML", "migraphx": "MIGraphX"}


def is_onnx_model(path: str | Path) -> bool:
    """Whether ``path`` is an onnxruntime-genai model directory (what ``--draft`` names)."""
    return (Path(path) / GENAI_CONFIG).is_file()


def _genai():
    try:
        import onnxruntime_genai
    except ImportError:
        raise ImportError(
            "an ONNX draft needs onnxruntime-genai: pip install 'multispin-edge[onnx]'"
        ) from None
    onnxruntime_genai.disable_telemetry_events()  # nothing leaves the device
    return onnxruntime_genai


class OnnxDrafter(KVCacheDrafter):
    """An onnxruntime-genai draft model with its KV cache reused across rounds."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        n_ctx: int = 4096,
        n_threads: int = 1,
        pace_s_per_token: float = 0.0,
        provider: str = "cpu",
    ):
        super().__init__(pace_s_per_token)
        model_dir = Path(model_dir)
        if not is_onnx_model(model_dir):
            raise FileNotFoundError(f"{model_dir} is not an ONNX draft (no {GENAI_CONFIG})")
        if provider not in PROVIDERS:
            raise ValueError(f"execution provider {provider!r}: one of {', '.join(PROVIDERS)} "
                             "(NNAPI is not an onnxruntime-genai provider)")
        genai_config = json.loads((model_dir / GENAI_CONFIG).read_text())["model"]
        context_length = int(genai_config.get("context_length", n_ctx))
        if not 2 <= n_ctx <= context_length:
            raise ValueError(f"n_ctx must be 2..{context_length} (the model's context)")
        og = _genai()
        config = og.Config(str(model_dir))
        config.clear_providers()
        if PROVIDERS[provider]:
            config.append_provider(PROVIDERS[provider])
        threads = {"intra_op_num_threads": n_threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": threads}}}))
        try:
            self.model = og.Model(config)
        except RuntimeError as exc:  # a provider this build or machine lacks, a bad model
            raise ValueError(f"ONNX Runtime cannot load {model_dir.name} with the {provider} "
                             f"execution provider: {exc}") from None
        self.tokenizer = og.Tokenizer(self.model)
        self._adds_bos = self.tokenize("") == [self.tokenizer.bos_token_id]
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=n_ctx, batch_size=1)
        self.generator = og.Generator(self.model, params)
        self.n_ctx = n_ctx
        pieces, self._control = tokenizer_json_pieces(model_dir / "tokenizer.json")
        self._pieces = pieces
        self.fingerprint = fingerprint_pieces(pieces)
        self.vocab_size = int(genai_config["vocab_size"])
        eos = genai_config.get("eos_token_id", [])
        self.eos_token_ids = sorted(eos if isinstance(eos, list) else [eos])
        self.model_id = model_dir.name
        self.chat_format = _chat_format(model_dir)
        self._ids: list[int] = []  # what the generator's cache holds
        log.info("ONNX drafter %s (%s): vocab %d, context %d, %d thread(s), fingerprint %s",
                 self.model_id, provider, self.vocab_size, n_ctx, n_threads, self.fingerprint)

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, as the GGUF drafts tokenize it: special tokens parsed, a BOS
        only where the model adds one (and ``add_bos``), as llama.cpp does."""
        ids = [int(i) for i in self.tokenizer.encode(text)]
        return ids if add_bos or not self._adds_bos else ids[1:]

    def detokenize(self, ids: list[int]) -> bytes:
        """The bytes of ``ids`` (control tokens render to nothing); safe to stream per round."""
        pieces, control = self._pieces, self._control
        return b"".join(
            pieces[i] for i in ids if 0 <= i < len(pieces) and i not in control
        )

    def _cached(self) -> list[int]:
        return self._ids

    def _truncate(self, pos: int) -> None:
        self.generator.rewind_to(pos)
        del self._ids[pos:]

    def _evaluate(self, tokens: list[int]) -> None:
        # The newest token always in a step of its own: int4/int8 kernels with int8
        # activations compute a one-token step differently from a longer chunk (logits up to
        # ~0.5-1 apart here, docs/models.md). Drafted tokens are one-token steps, so rolling
        # back and evaluating the newest committed token again repeats exactly the step the
        # first draft read, and a draft after a rollback to any length is the first draft.
        for chunk in (tokens[:-1], tokens[-1:]):
            if chunk:
                self.generator.append_tokens(np.asarray(chunk, dtype=np.int32))
                self._ids.extend(chunk)

    def _logits(self) -> np.ndarray:
        return self.generator.get_logits().reshape(-1)  # [1, 1, V]: the newest position


def _chat_format(model_dir: Path) -> ChatFormat | None:
    """The directory's chat template and BOS/EOS texts (``chat_template.jinja``,
    ``tokenizer_config.json``, as genai's builder writes them), if it has a template."""
    template = model_dir / "chat_template.jinja"
    if not template.is_file():
        return None
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def text(key: str) -> str:
        token = config.get(key) or ""
        return token.get("content", "") if isinstance(token, dict) else str(token)

    return ChatFormat(template.read_text(), text("bos_token"), text("eos_token"))
