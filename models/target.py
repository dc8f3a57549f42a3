"""Loading the target model on the edge server (transformers, full precision)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def load_target(gguf_path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a GGUF file into transformers, dequantized to ``dtype``; return (model, tokenizer).

    Needs ``gguf`` and ``accelerate``. Nothing is fetched from a hub: the file is local.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    log.info("loading target %s as %s on %s", gguf_path.name, dtype, device)
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, torch_dtype=getattr(torch, dtype), **kwargs
    ).to(device)
    model.eval()
    return model, tokenizer
