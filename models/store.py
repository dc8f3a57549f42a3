"""Materialising the registry's models in the user cache: build, checksum, fingerprint.

Cache directory: ``$MULTISPIN_CACHE``, else ``$XDG_CACHE_HOME/multispin-edge``, else
``~/.cache/multispin-edge``. It holds the files we build (``<name>.gguf``: requantized or
assembled models; ``<name>/``: ONNX drafts, one directory checksummed as one artifact;
``<stem>.hf/``: the target converted for transformers) and ``manifest.json``::

    {"version": 1,
     "files": {"<name>.gguf": {"sha256": ..., "recipe": {...how it was built...}}},
     "fingerprints": {"tok1:<sha256 of a GGUF>": "tok1-..."}}

Files that already exist (a local path, a file shipped in a package) are used in place.
A built file is rebuilt, with a log line saying why, when it is missing, its sha256 no
longer matches the manifest, or its recipe changed (e.g. the source file was replaced).
Several processes (a controller and device agents started together, tests) may call
:func:`ensure` at once: one exclusive ``fcntl`` lock on the cache directory serialises
them, and every write is atomic (temporary file + rename).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.fingerprint import (
    FINGERPRINT_VERSION,
    fingerprint_gguf,
    fingerprint_hf,
    fingerprint_pieces,
    tokenizer_json_pieces,
)
from models.registry import (
    QTYPES,
    AssembleSource,
    ModelSpec,
    OnnxSource,
    PackageSource,
    PathSource,
    Registry,
    RequantizeSource,
    load_registry,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def cache_dir() -> Path:
    """``$MULTISPIN_CACHE``, else ``$XDG_CACHE_HOME/multispin-edge``, else ~/.cache/..."""
    if os.environ.get("MULTISPIN_CACHE"):
        return Path(os.environ["MULTISPIN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "multispin-edge"


@dataclass(frozen=True)
class Artifact:
    """One materialised model."""

    name: str  # model id from the registry
    path: Path  # a GGUF file, an HF model directory, or an ONNX (genai) model directory
    format: str  # "gguf", "hf" or "onnx"
    sha256: str | None  # of the file, or of an ONNX directory's files; None for an HF dir
    fingerprint: str  # tokenizer fingerprint (models.fingerprint)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "format": self.format,
            "path": str(self.path),
            "sha256": self.sha256,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True)
class Materialized:
    cache_dir: Path
    target: Artifact
    draft_models: dict[str, Artifact]  # draft key -> artifact

    @property
    def drafts(self) -> dict[str, Path]:
        """Draft key -> GGUF file or ONNX model directory."""
        return {key: artifact.path for key, artifact in self.draft_models.items()}

    @property
    def target_gguf(self) -> Path:
        if self.target.format != "gguf":
            raise ValueError(f"target {self.target.name} is an HF directory, not a GGUF file")
        return self.target.path

    def to_json(self) -> dict[str, Any]:
        target = self.target.to_json()
        if self.target.format == "gguf":
            target["gguf"] = target["path"]
        return {
            "cache_dir": str(self.cache_dir),
            "target": target,
            "drafts": {key: str(path) for key, path in self.drafts.items()},
            "draft_models": {key: a.to_json() for key, a in self.draft_models.items()},
        }


def ensure(
    registry: Registry | None = None,
    include: Iterable[str] = (),
    *,
    drafts: bool = True,
    cache: Path | None = None,
) -> Materialized:
    """Materialise the target and the drafts (default ones plus ``include``) in the cache.

    ``drafts=False`` materialises the target alone. Returns paths, checksums and tokenizer
    fingerprints. Safe to call from several processes at once; a warm call only re-hashes
    files.
    """
    registry = registry or load_registry()
    include = list(include)
    unknown = [key for key in include if key not in registry.drafts]
    if unknown:
        raise KeyError(f"no drafts {unknown} in the registry; it has {sorted(registry.drafts)}")
    keys = registry.default_drafts() + [k for k in include if registry.drafts[k].optional]
    keys = list(dict.fromkeys(keys)) if drafts else []
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        store = _Store(cache)
        # Drafts first: a board asking for a draft it cannot build (no target package, no
        # ONNX builder) hears why from the draft, not that the target is missing.
        drafts = {key: store.artifact(registry.drafts[key]) for key in keys}
        target = store.artifact(registry.target)
    return Materialized(cache, target, drafts)


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with (cache / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process materialising models in %s", cache)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Store:
    """The cache directory while this process holds its lock."""

    def __init__(self, cache: Path):
        self.cache = cache
        for stale in cache.glob(".*.tmp"):  # left by a process killed mid-write
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        self.manifest = self._read_manifest()
        self.hashes: dict[Path, str] = {}  # sha256 per file, once per ensure

    def _read_manifest(self) -> dict[str, Any]:
        empty = {"version": MANIFEST_VERSION, "files": {}, "fingerprints": {}}
        path = self.cache / "manifest.json"
        if not path.exists():
            return empty
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON: starting a new manifest", path)
            return empty
        if manifest.get("version") != MANIFEST_VERSION:
            log.warning("%s has version %s: starting a new one", path, manifest.get("version"))
            return empty
        return manifest

    def _write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=2, sort_keys=True) + "\n"
        with self._temporary("manifest.json") as tmp:
            tmp.write_text(text)

    @contextmanager
    def _temporary(self, final_name: str, directory: bool = False) -> Iterator[Path]:
        """A temporary file (or directory) in the cache, renamed to ``final_name`` if the
        block succeeds (an old directory of that name is replaced)."""
        if directory:
            tmp = Path(tempfile.mkdtemp(dir=self.cache, prefix=f".{final_name}.", suffix=".tmp"))
        else:
            fd, name = tempfile.mkstemp(dir=self.cache, prefix=f".{final_name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
        try:
            yield tmp
            final = self.cache / final_name
            if directory and final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)

    def sha256(self, path: Path) -> str:
        """Of a file; of a directory, over its files' names and hashes."""
        if path not in self.hashes:
            digest = hashlib.sha256()
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    digest.update(f"{file.relative_to(path)}\0{self.sha256(file)}\n".encode())
            else:
                with path.open("rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
            self.hashes[path] = digest.hexdigest()
        return self.hashes[path]

    def artifact(self, spec: ModelSpec) -> Artifact:
        path = self.path(spec)
        if (path / ONNX_CONFIG).is_file():
            pieces, _ = tokenizer_json_pieces(path / "tokenizer.json")
            fingerprint = _check(spec, fingerprint_pieces(pieces))
            return Artifact(spec.name, path, "onnx", self.sha256(path), fingerprint)
        if path.is_dir():
            return Artifact(spec.name, path, "hf", None, _check(spec, _fingerprint_hf_dir(path)))
        sha = self.sha256(path)
        key = f"{FINGERPRINT_VERSION}:{sha}"
        fingerprint = self.manifest["fingerprints"].get(key)
        if fingerprint is None:
            fingerprint = fingerprint_gguf(path)
            self.manifest["fingerprints"][key] = fingerprint
            self._write_manifest()
        return Artifact(spec.name, path, "gguf", sha, _check(spec, fingerprint))

    def path(self, spec: ModelSpec) -> Path:
        """The model's file (or directory), built first if needed."""
        match spec.source:
            case PathSource(path):
                if not path.exists():
                    raise FileNotFoundError(f"model {spec.name}: {path} does not exist")
                return path
            case PackageSource(package, file):
                path = _package_dir(package) / file
                if not path.is_file():
                    raise FileNotFoundError(f"model {spec.name}: package {package} has no {file}")
                return path
            case AssembleSource(package):
                _package_dir(package)  # a clear error if it is not installed
                recipe = {"assemble": package, "version": _version(package)}
                return self.built(f"{spec.name}.gguf", recipe, lambda out: _assemble(package, out))
            case RequantizeSource(base_spec, qtype):
                base = self.path(base_spec)
                if base.is_dir():
                    raise ValueError(f"model {spec.name}: can only requantize a GGUF, not {base}")
                recipe = {"requantize": self.sha256(base), "qtype": qtype}
                return self.built(f"{spec.name}.gguf", recipe,
                                  lambda out: _quantize(base, out, qtype))
            case OnnxSource(base_spec, precision, algo):
                if not (self.cache / spec.name).exists():
                    _check_onnx_builder(spec.name)  # before the base: a board has no target
                base = self.path(base_spec)
                if base.is_dir() or base.suffix != ".gguf":
                    raise ValueError(f"model {spec.name}: onnx_from needs a GGUF, not {base}")
                recipe = {"onnx_from": self.sha256(base), "precision": precision, "algo": algo,
                          "builder": _version("onnxruntime-genai")}

                def build(out: Path) -> None:
                    _check_onnx_builder(spec.name)
                    _build_onnx(self.converted(base), out, precision, algo)

                return self.built(spec.name, recipe, build, directory=True)
        raise TypeError(f"model {spec.name}: unknown source {spec.source!r}")

    def built(self, file_name: str, recipe: dict[str, Any], build: Callable[[Path], None],
              directory: bool = False) -> Path:
        """``file_name`` in the cache, (re)built by ``build(path)`` unless it is intact."""
        path = self.cache / file_name
        entry = self.manifest["files"].get(file_name)
        if not path.exists():
            reason = "not built yet" if entry is None else "missing"
        elif entry is None:
            reason = "not in the manifest"
        elif entry["recipe"] != recipe:
            reason = "its recipe changed"
        elif self.sha256(path) != entry["sha256"]:
            reason = f"checksum mismatch (expected sha256 {entry['sha256'][:12]}...)"
        else:
            return path
        log.log(
            logging.INFO if entry is None else logging.WARNING, "%s: %s, building it", path, reason
        )
        start = time.perf_counter()
        with self._temporary(file_name, directory) as tmp:
            build(tmp)
            sha = self.sha256(tmp)
        self.hashes[path] = sha
        self.manifest["files"][file_name] = {"sha256": sha, "recipe": recipe}
        self._write_manifest()
        log.info("built %s in %.1f s (sha256 %s)", path, time.perf_counter() - start, sha[:12])
        return path

    def converted(self, gguf: Path) -> Path:
        """:func:`converted_target`, for a process already holding the lock."""
        recipe = {"convert": self.sha256(gguf), "transformers": _version("transformers")}
        return self.built(f"{gguf.stem}.hf", recipe, lambda out: _convert(gguf, out),
                          directory=True)


def converted_target(gguf: Path, cache: Path | None = None) -> Path:
    """A GGUF target dequantized once into an HF model directory in the cache
    (``<stem>.hf/``: fp32 safetensors, config, tokenizer), checksummed and rebuilt like the
    built drafts: converting the GGUF again takes most of a controller's start-up."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        return _Store(cache).converted(gguf)


def _convert(gguf: Path, out: Path) -> None:
    """Edge side only: load the GGUF in transformers (dequantized to fp32) and save it."""
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to an fp32 model directory (once; cached)", gguf.name)
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # transformers will not save_pretrained() a model loaded from GGUF (it counts as
    # quantized), though its weights are plain fp32 now: save them as a checkpoint is.
    del model.config.quantization_config
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    safetensors.torch.save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})


ONNX_CONFIG = "genai_config.json"  # what makes a directory an onnxruntime-genai model
_ONNX_BUILDER = ("onnxruntime_genai", "onnx", "onnx_ir", "torch", "transformers")
ONNX_BUILD_TIMEOUT_S = 3600.0  # a 135M model takes 15-40 s here; a 1B one minutes


def _check_onnx_builder(name: str) -> None:
    """A clear error, before any work, on a machine that cannot build ONNX drafts (a board:
    it gets the built directory from the edge, ``edge-controller fleet deploy``)."""
    missing = [m for m in _ONNX_BUILDER if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"model {name}: building the ONNX draft needs {', '.join(missing)}: build it on "
            "the edge (pip install 'multispin-edge[edge,onnx-build]'; python -m models "
            f"ensure --include {name}) and pass its directory to --draft on the device"
        )


def _build_onnx(hf: Path, out: Path, precision: str, algo: str) -> None:
    """Rebuild an HF model directory as an onnxruntime-genai model (CPU provider) with
    onnxruntime-genai's model builder, offline, in a child process (it loads the weights
    in torch and prints a progress line per tensor)."""
    log.info("building the ONNX draft (%s, %s) from %s", precision, algo, hf.name)
    with tempfile.TemporaryDirectory(prefix=".onnx-build.", suffix=".tmp", dir=out.parent) as work:
        staged = Path(work) / "input"
        staged.mkdir()
        for file in hf.iterdir():
            (staged / file.name).symlink_to(file.resolve())
        # The converted target's config names no architecture (transformers loaded it
        # from GGUF); the builder picks its graph by architecture.
        config = json.loads((hf / "config.json").read_text())
        if not config.get("architectures"):
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
        (staged / "config.json").unlink()
        (staged / "config.json").write_text(json.dumps(config, indent=2))
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(staged),
                   "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(Path(work) / "cache"),
                   "--extra_options", "hf_token=false", f"algo_config={algo}"]
        offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=offline,
                                  check=False, timeout=ONNX_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"onnxruntime-genai's model builder ran past "
                               f"{ONNX_BUILD_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0 or not (out / ONNX_CONFIG).is_file():
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"onnxruntime-genai's model builder failed ({done.returncode}):\n{tail}")


def _check(spec: ModelSpec, fingerprint: str) -> str:
    if spec.fingerprint is not None and spec.fingerprint != fingerprint:
        raise ValueError(
            f"model {spec.name}: tokenizer fingerprint {fingerprint} differs from the one "
            f"pinned in the registry ({spec.fingerprint})"
        )
    return fingerprint


def _package_dir(package: str) -> Path:
    """An installed package's directory, found without importing (running) the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModuleNotFoundError(f"package {package} is not installed (pip install {dist})")
    return Path(spec.submodule_search_locations[0])


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _assemble(package: str, out: Path) -> None:
    log.info("assembling %s from %s", out.name, package)
    importlib.import_module(package).assemble(output_path=out, overwrite=True)


def _quantize(src: Path, out: Path, qtype: str) -> None:
    import llama_cpp  # here alone: a device drafting with ONNX Runtime may have no llama.cpp

    log.info("quantizing %s to %s", src.name, qtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QTYPES[qtype]
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {qtype}) failed with code {rc}")


def _fingerprint_hf_dir(path: Path) -> str:
    """Edge side only: the fingerprint of an HF model directory's tokenizer."""
    from transformers import AutoTokenizer

    return fingerprint_hf(AutoTokenizer.from_pretrained(path, local_files_only=True))
