"""Loading the target model on the edge server (transformers, full precision).

Edge side only: torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from models.registry import Registry
from models.store import ensure

log = logging.getLogger(__name__)


def load_target(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load a target into transformers; return (model, tokenizer).

    ``path`` is a GGUF file (dequantized to ``dtype``; needs ``gguf`` and ``accelerate``)
    or an HF model directory. Nothing is fetched from a hub: the files are local.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    log.info("loading target %s as %s on %s", path.name, dtype, device)
    if path.is_dir():
        directory, kwargs = path, {"local_files_only": True}
    else:
        directory, kwargs = path.parent, {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype), **kwargs
    ).to(device)
    model.eval()
    return model, tokenizer


def load_registry_target(
    registry: Registry | None = None, dtype: str = "float32", device: str = "cpu"
) -> tuple[Any, Any]:
    """Materialise the registry's target (default registry if None) and load it."""
    return load_target(ensure(registry, drafts=False).target.path, dtype, device)
