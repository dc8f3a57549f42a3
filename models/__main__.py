"""``python -m models``: materialise, list and fingerprint the registry's models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from models.registry import RegistryError, load_registry
from models.store import Materialized, cache_dir, ensure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models",
        description="Model registry of multispin-edge: the target and the draft models, "
        "built and checked in the user cache ($MULTISPIN_CACHE, else "
        "$XDG_CACHE_HOME/multispin-edge, else ~/.cache/multispin-edge).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--registry",
        type=Path,
        help="registry TOML (default: $MULTISPIN_MODELS, else configs/models.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "ensure",
        help="build missing or corrupted models, verify checksums, print paths",
        description="Materialise the target and the default drafts (plus --include ones) "
        "in the cache: requantize, assemble, build ONNX drafts, verify sha256, compute "
        "tokenizer fingerprints.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="DRAFT",
        help="also materialise this optional draft (e.g. gemma3-270m, onnx); repeatable",
    )
    sub.add_parser("list", help="show the registry's models and where they come from")
    p = sub.add_parser("fingerprint", help="print the tokenizer fingerprint of a GGUF file")
    p.add_argument("gguf", type=Path)
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # llama.cpp's own messages on stderr
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    try:
        if args.command == "fingerprint":
            from models.fingerprint import fingerprint_gguf

            print(fingerprint_gguf(args.gguf))
            return 0
        registry = load_registry(args.registry)
        if args.command == "list":
            print(f"registry {registry.path}\ncache    {cache_dir()}")
            print(f"target {registry.target.name}: {registry.target.source}")
            for key, spec in registry.drafts.items():
                note = " (optional)" if spec.optional else ""
                print(f"draft  {key}{note}: {spec.name}: {spec.source}")
            return 0
        started = time.perf_counter()
        materialized = ensure(registry, args.include)
    except (RegistryError, KeyError, FileNotFoundError, ModuleNotFoundError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else exc  # KeyError quotes its str
        print(f"python -m models: {message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(materialized.to_json(), indent=2))
    else:
        print(_summary(materialized, time.perf_counter() - started))
    return 0


def _summary(materialized: Materialized, seconds: float) -> str:
    lines = [f"models ready in {materialized.cache_dir} ({seconds:.1f} s)"]
    rows = [("target", materialized.target)] + list(materialized.draft_models.items())
    for key, artifact in rows:
        files = [artifact.path] if artifact.path.is_file() else artifact.path.rglob("*")
        size = sum(f.stat().st_size for f in files if f.is_file()) / 1e6
        lines.append(f"  {key:12} {artifact.name:32} {size:7.1f} MB  {artifact.fingerprint}")
        lines.append(f"  {'':12} {artifact.path}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
