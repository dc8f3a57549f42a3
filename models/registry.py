"""The model registry: the target the edge verifies with and the drafts devices may run.

One TOML file (``configs/models.toml``; ``$MULTISPIN_MODELS`` or an explicit path
override it), parsed once into typed dataclasses; a bad entry raises
:class:`RegistryError` naming the entry and the field. Each model has exactly one source:

=================================  =========================================================
``path = "..."``                   a local GGUF file, or (target only) an HF model directory;
                                   relative paths are relative to the registry file
``package = "m"``, ``file = "f"``  file ``f`` shipped inside the installed Python package
                                   ``m`` (located without importing the package)
``assemble = "m"``                 a package exposing ``assemble(output_path, overwrite)``
                                   that writes a GGUF (chunked wheels, e.g. Gemma 3 270M)
``requantize = ...``,              built locally with llama.cpp: ``requantize`` names another
``qtype = "q4_0"``                 entry (``"target"`` or a draft key) or is an inline table
                                   holding a ``path`` or ``package``/``file`` source
``onnx_from = "target"``,          drafts only: an onnxruntime-genai model directory built
``precision = "int4"``,            locally from that GGUF entry's weights (dequantized by
``algo = "k_quant"`` (optional)    transformers, rebuilt by onnxruntime-genai's model
                                   builder: the edge's extras, ``[edge,onnx-build]``);
                                   ``algo`` is the builder's quantizer (default: RTN)
=================================  =========================================================

Other fields: ``name`` (the model id: built files are ``<name>.gguf`` in the cache and
devices report it; required for the target, defaults to the key for drafts),
``fingerprint`` (optional: the expected tokenizer fingerprint, checked by ``ensure``) and,
for drafts, ``optional = true`` (built only when asked for: ``ensure --include KEY``).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_REGISTRY = Path(__file__).resolve().parents[1] / "configs" / "models.toml"
TARGET = "target"  # the key under which requantize references the target

# llama_ftype values of llama.h that llama_model_quantize can produce from a GGUF.
# K-quants need rows that are a multiple of 256 (SmolLM2's hidden size 576 is not).
# Precisions of onnxruntime-genai's model builder that its CPU provider runs.
ONNX_PRECISIONS = ("int4", "int8", "fp32")
# Its weight quantizers (algo_config): round-to-nearest, k-quant, and their mixed variants
# (``_last``: the LM head in int8; ``_mixed``: it and some layers in int8).
ONNX_ALGOS = ("default", "rtn", "k_quant", "rtn_last", "k_quant_last", "k_quant_mixed")

QTYPES: dict[str, int] = {
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SOURCE_KEYS = ("path", "package", "assemble", "requantize", "onnx_from")
_MODEL_KEYS = {"name", "file", "qtype", "precision", "algo", "fingerprint", *_SOURCE_KEYS}


class RegistryError(ValueError):
    """A registry file that cannot be used; the message names the entry and field."""


@dataclass(frozen=True)
class PathSource:
    path: Path  # a GGUF file, or an HF model directory (targets only)

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class PackageSource:
    package: str  # an installed Python package
    file: str  # a file inside the package directory

    def __str__(self) -> str:
        return f"{self.file} from package {self.package}"


@dataclass(frozen=True)
class AssembleSource:
    package: str  # exposes assemble(output_path, overwrite) -> Path

    def __str__(self) -> str:
        return f"assembled by package {self.package}"


@dataclass(frozen=True)
class RequantizeSource:
    base: ModelSpec  # a GGUF model (any source) to requantize
    qtype: str  # a key of QTYPES

    def __str__(self) -> str:
        return f"{self.base.name} requantized to {self.qtype}"


@dataclass(frozen=True)
class OnnxSource:
    base: ModelSpec  # a GGUF model whose weights are rebuilt as ONNX
    precision: str  # one of ONNX_PRECISIONS
    algo: str = "default"  # one of ONNX_ALGOS

    def __str__(self) -> str:
        return f"{self.base.name} rebuilt for ONNX Runtime ({self.precision}, {self.algo})"


Source = PathSource | PackageSource | AssembleSource | RequantizeSource | OnnxSource


@dataclass(frozen=True)
class ModelSpec:
    name: str  # model id; built files are <name>.gguf (<name>/ for an ONNX directory)
    source: Source
    fingerprint: str | None = None  # expected tokenizer fingerprint, checked by ensure
    optional: bool = False  # drafts: built only when asked for


@dataclass(frozen=True)
class Registry:
    target: ModelSpec
    drafts: dict[str, ModelSpec]  # draft key -> spec
    path: Path | None = None  # the file it was read from

    def default_drafts(self) -> list[str]:
        """The draft keys ``ensure`` materialises unless asked for more."""
        return [key for key, spec in self.drafts.items() if not spec.optional]


def load_registry(path: str | Path | None = None) -> Registry:
    """Read and validate a registry file (default: ``$MULTISPIN_MODELS`` or configs/models.toml)."""
    path = Path(path or os.environ.get("MULTISPIN_MODELS") or DEFAULT_REGISTRY).expanduser()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RegistryError(f"model registry {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"model registry {path}: invalid TOML: {exc}") from None
    return parse_registry(data, base_dir=path.parent, path=path)


def parse_registry(data: dict[str, Any], base_dir: Path, path: Path | None = None) -> Registry:
    """Build a :class:`Registry` from parsed TOML (``base_dir`` anchors relative paths)."""
    where = f"model registry {path}" if path else "model registry"
    unknown = set(data) - {TARGET, "drafts"}
    if unknown:
        raise RegistryError(f"{where}: unknown top-level keys {sorted(unknown)}")
    if not isinstance(data.get(TARGET), dict):
        raise RegistryError(f"{where}: needs a [target] table")
    drafts = data.get("drafts", {})
    if not isinstance(drafts, dict) or not all(isinstance(v, dict) for v in drafts.values()):
        raise RegistryError(f"{where}: drafts must be tables: [drafts.NAME]")
    if TARGET in drafts:
        raise RegistryError(f"{where}: a draft cannot be called {TARGET!r}")
    parser = _Parser(where, {TARGET: data[TARGET], **drafts}, base_dir)
    registry = Registry(
        target=parser.spec(TARGET), drafts={key: parser.spec(key) for key in drafts}, path=path
    )
    names = [registry.target.name, *(spec.name for spec in registry.drafts.values())]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RegistryError(f"{where}: model names must be unique, repeated: {duplicates}")
    return registry


class _Parser:
    """Turns raw TOML tables into specs, resolving requantize references by key."""

    def __init__(self, where: str, tables: dict[str, dict[str, Any]], base_dir: Path):
        self.where = where
        self.tables = tables
        self.base_dir = base_dir
        self.specs: dict[str, ModelSpec] = {}
        self.resolving: list[str] = []

    def error(self, key: str, text: str) -> RegistryError:
        entry = "[target]" if key == TARGET else f"[drafts.{key}]"
        return RegistryError(f"{self.where}: {entry}: {text}")

    def spec(self, key: str) -> ModelSpec:
        if key in self.specs:
            return self.specs[key]
        if key in self.resolving:
            cycle = " -> ".join([*self.resolving, key])
            raise self.error(key, f"references (requantize, onnx_from) form a cycle: {cycle}")
        self.resolving.append(key)
        table = self.tables[key]
        allowed = _MODEL_KEYS if key == TARGET else _MODEL_KEYS | {"optional"}
        unknown = set(table) - allowed
        if unknown:
            raise self.error(key, f"unknown fields {sorted(unknown)} (allowed: {sorted(allowed)})")
        name = self.string(key, table, "name", default=None if key == TARGET else key)
        if not _NAME.fullmatch(name):
            raise self.error(key, f"name {name!r} must match {_NAME.pattern} (it names files)")
        fingerprint = table.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise self.error(key, "fingerprint must be a string")
        optional = table.get("optional", False)
        if not isinstance(optional, bool):
            raise self.error(key, "optional must be true or false")
        spec = ModelSpec(name, self.source(key, table), fingerprint, optional)
        self.resolving.pop()
        self.specs[key] = spec
        return spec

    def string(self, key: str, table: dict[str, Any], field: str, default: str | None) -> str:
        value = table.get(field, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"{field} must be a non-empty string")
        return value

    def source(self, key: str, table: dict[str, Any], inline: bool = False) -> Source:
        kinds = [k for k in _SOURCE_KEYS if k in table]
        if len(kinds) != 1:
            raise self.error(key, f"needs exactly one source of {list(_SOURCE_KEYS)}, got {kinds}")
        kind = kinds[0]
        companion = {"package": {"file"}, "requantize": {"qtype"},
                     "onnx_from": {"precision", "algo"}}.get(kind, set())
        extra = ({"file", "qtype", "precision", "algo"} - companion) & set(table)
        if extra:
            raise self.error(key, f"{sorted(extra)} does not go with {kind}")
        if kind == "path":
            path = Path(self.string(key, table, "path", None)).expanduser()
            return PathSource(path if path.is_absolute() else self.base_dir / path)
        if kind == "package":
            return PackageSource(
                self.string(key, table, "package", None), self.string(key, table, "file", None)
            )
        if inline:
            raise self.error(key, "an inline requantize base must be a path or package/file")
        if kind == "assemble":
            return AssembleSource(self.string(key, table, "assemble", None))
        if kind == "onnx_from":
            if key == TARGET:
                raise self.error(key, "the target is verified by transformers, not ONNX Runtime")
            precision = self.string(key, table, "precision", None).lower()
            if precision not in ONNX_PRECISIONS:
                raise self.error(key, f"precision {precision!r} unknown; one of "
                                 f"{list(ONNX_PRECISIONS)}")
            algo = self.string(key, table, "algo", "default")
            if algo not in ONNX_ALGOS:
                raise self.error(key, f"algo {algo!r} unknown; one of {list(ONNX_ALGOS)}")
            return OnnxSource(self.reference(key, table["onnx_from"], "onnx_from"), precision,
                              algo)
        qtype = self.string(key, table, "qtype", None).lower()
        if qtype not in QTYPES:
            raise self.error(key, f"qtype {qtype!r} unknown; one of {sorted(QTYPES)}")
        return RequantizeSource(self.requantize_base(key, table["requantize"]), qtype)

    def requantize_base(self, key: str, base: Any) -> ModelSpec:
        if isinstance(base, dict):
            unknown = set(base) - {"path", "package", "file"}
            if unknown:
                raise self.error(key, f"inline requantize base: unknown fields {sorted(unknown)}")
            return ModelSpec(f"{key}-base", self.source(key, base, inline=True))
        return self.reference(key, base, "requantize")

    def reference(self, key: str, base: Any, field: str) -> ModelSpec:
        """The entry another one is built from, by key."""
        if not isinstance(base, str) or base not in self.tables:
            raise self.error(key, f"{field} = {base!r} names no entry ({TARGET!r} or a draft key)")
        return self.spec(base)
