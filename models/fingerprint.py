"""Tokenizer fingerprints: one hash of a vocabulary's id -> bytes mapping.

A draft is only useful to a target that reads its token ids the same way. Each side
renders every id of its *own* tokenizer to the bytes it stands for (special tokens as
their text) and hashes that list with :func:`fingerprint_pieces`:

- device side, llama.cpp: :func:`fingerprint_llama` (a loaded ``Llama``) or
  :func:`fingerprint_gguf` (a GGUF file, vocabulary loaded alone);
- device side, ONNX Runtime drafts: :func:`tokenizer_json_pieces` reads the model
  directory's ``tokenizer.json`` with the standard library alone (no transformers, no
  tokenizers, no llama.cpp);
- edge side, transformers: :func:`fingerprint_hf` (byte-level BPE pieces through the GPT-2
  byte decoder; SentencePiece pieces with ``▁`` as a space and ``<0xNN>`` byte tokens).

llama.cpp is imported only where it is used: a device drafting with ONNX Runtime may have
none. They all agree for the same vocabulary (tested for SmolLM2 and Gemma 3), whatever file
or quantization it came in, which file hashes would not. Padded vocabularies carry extra
ids past the real ones that render to nothing and are never produced; trailing empty
pieces are dropped before hashing, so a padded and an unpadded copy match.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FINGERPRINT_VERSION = "tok1"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def fingerprint_pieces(pieces: Iterable[bytes]) -> str:
    """``tok1-<ids>-<sha256 prefix>`` of the id -> bytes list (trailing empty ids dropped)."""
    pieces = list(pieces)
    while pieces and not pieces[-1]:
        pieces.pop()
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(len(piece).to_bytes(4, "little"))
        digest.update(piece)
    return f"{FINGERPRINT_VERSION}-{len(pieces)}-{digest.hexdigest()[:32]}"


def llama_token_pieces(vocab: Any, ids: Iterable[int], *, special: bool) -> list[bytes]:
    """The bytes of each token id in a llama.cpp vocabulary (``llama_token_to_piece``).

    ``special`` renders control tokens as their text (otherwise they render to nothing).
    """
    import llama_cpp

    buf = ctypes.create_string_buffer(64)
    pieces = []
    for token in ids:
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        if n < 0:  # the piece needs -n bytes
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
        pieces.append(buf.raw[:n])
    return pieces


def _fingerprint_vocab(vocab: Any) -> str:
    import llama_cpp

    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    return fingerprint_pieces(llama_token_pieces(vocab, range(n_vocab), special=True))


def fingerprint_llama(llama: Any) -> str:
    """Device side: the fingerprint of a loaded llama-cpp-python model's vocabulary."""
    import llama_cpp

    return _fingerprint_vocab(llama_cpp.llama_model_get_vocab(llama.model))


@contextmanager
def gguf_vocab(path: str | Path) -> Iterator[Any]:
    """The llama.cpp vocabulary of a GGUF file, loaded without its weights."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ValueError(f"llama.cpp cannot load the vocabulary of {path}")
    try:
        yield llama_cpp.llama_model_get_vocab(model)
    finally:
        llama_cpp.llama_model_free(model)


def fingerprint_gguf(path: str | Path) -> str:
    """The fingerprint of a GGUF file's vocabulary, read with llama.cpp (no weights loaded)."""
    with gguf_vocab(path) as vocab:
        return _fingerprint_vocab(vocab)


def fingerprint_hf(tokenizer: Any) -> str:
    """Edge side: the fingerprint of a (fast) transformers tokenizer."""
    return fingerprint_pieces(hf_token_pieces(tokenizer))


def hf_token_pieces(tokenizer: Any) -> list[bytes]:
    """The bytes of every id of a transformers tokenizer, rendered as llama.cpp renders them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer")
    added = {i: token.content.encode() for i, token in tokenizer.added_tokens_decoder.items()}
    decoder = backend.decoder
    piece_bytes = _piece_decoder(json.loads(decoder.__getstate__()) if decoder else None)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        added[i] if i in added else piece_bytes(token) if token is not None else b""
        for i, token in enumerate(tokens)
    ]


def tokenizer_json_pieces(path: str | Path) -> tuple[list[bytes], set[int]]:
    """The bytes of every id of a ``tokenizer.json`` (special tokens as their text), and
    the ids of its special (control) tokens; read with the standard library alone."""
    config = json.loads(Path(path).read_text(encoding="utf-8"))
    vocab: dict[str, int] = config["model"]["vocab"]
    if isinstance(vocab, list):  # Unigram models list [piece, score] pairs by id
        vocab = {piece: i for i, (piece, _) in enumerate(vocab)}
    added = {token["id"]: token for token in config.get("added_tokens", [])}
    piece_bytes = _piece_decoder(config.get("decoder"))
    pieces = [b""] * (max([*vocab.values(), *added, -1]) + 1)
    for token, i in vocab.items():
        pieces[i] = piece_bytes(token)
    for i, token in added.items():
        pieces[i] = token["content"].encode()
    return pieces, {i for i, token in added.items() if token.get("special")}


def _piece_decoder(decoder: dict[str, Any] | None):
    """How a vocabulary's pieces map to bytes: byte-level BPE or SentencePiece."""
    byte_level = decoder is not None and "ByteLevel" in _component_types(decoder)
    return _byte_level_bytes if byte_level else _sentencepiece_bytes


def _component_types(config: dict[str, Any]) -> set[str]:
    """Types of a tokenizers component and of its parts (a ``Sequence`` nests them)."""
    nested = config.get("decoders") or []
    return {config.get("type", "")}.union(*(_component_types(part) for part in nested))


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable unicode map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    return {char: b for b, char in chars.items()}


_BYTE_DECODER = _gpt2_byte_decoder()


def _byte_level_bytes(token: str) -> bytes:
    return bytes(_BYTE_DECODER[char] for char in token)


def _sentencepiece_bytes(token: str) -> bytes:
    match = _BYTE_TOKEN.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode()
