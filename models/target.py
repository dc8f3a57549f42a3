"""Loading the target model on the edge server (transformers, full precision).

Edge side only: torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edge_controller.verifier.slots import NEAR_TIE_MARGIN
from models.registry import Registry
from models.store import converted_target, ensure

log = logging.getLogger(__name__)


class TargetLoadError(RuntimeError):
    """The target cannot be loaded as configured; the message says what to change."""


def load_target(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """Load a target into transformers; return (model, tokenizer).

    ``path`` is an HF model directory, or a GGUF file: dequantized to fp32 once into the
    model cache (:func:`models.store.converted_target`; needs ``gguf`` and ``accelerate``
    the first time) and loaded from there as ``dtype``. Nothing is fetched from a hub.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise TargetLoadError(f"target {path} does not exist")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TargetLoadError(
            f"target.device is {device!r}, but this torch ({torch.__version__}) sees no CUDA "
            "GPU: set target.device = \"cpu\", or install a CUDA build of torch")
    directory = path if path.is_dir() else converted_target(path)
    log.info("loading target %s as %s on %s", path.name, dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=getattr(torch, dtype), local_files_only=True
    ).to(device)
    model.eval()
    return model, tokenizer


def load_registry_target(
    registry: Registry | None = None, dtype: str = "float32", device: str = "cpu"
) -> tuple[Any, Any]:
    """Materialise the registry's target (default registry if None) and load it."""
    return load_target(ensure(registry, drafts=False).target.path, dtype, device)


def reference_greedy(target: tuple[Any, Any], prompt_ids: list[int],
                     max_new_tokens: int) -> tuple[list[int], list[float]]:
    """The target alone, what every greedy output must equal: transformers ``generate``,
    greedy, in the target's precision. ``target`` is ``load_target``'s (model, tokenizer).
    Returns (ids, margins); ``margins[i]`` is the top-2 logit margin where the reference
    chose its i-th token (near ties, DESIGN.md section 3).
    """
    import torch

    model, tokenizer = target
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    ids = out.sequences[0, len(prompt_ids):].tolist()
    margins = []
    for logits in out.logits:
        top2 = torch.topk(logits[0].float(), 2).values
        margins.append(float(top2[0] - top2[1]))
    return ids, margins


def greedy_mismatch(target: tuple[Any, Any], prompt_ids: list[int], tokens: list[int],
                    max_new_tokens: int) -> tuple[str | None, str | None]:
    """Compare ``tokens`` with the target alone's greedy output for ``prompt_ids`` (up to
    ``max_new_tokens``, or its end of sequence): (problem, note). ``problem`` says where
    they differ (None: lossless); ``note`` names a tolerated difference at a near tie
    (top-2 margin below NEAR_TIE_MARGIN), after which the rest may differ as well."""
    ref, margins = reference_greedy(target, prompt_ids, max_new_tokens)
    for i, (got, want) in enumerate(zip(tokens, ref, strict=False)):
        if got != want:
            if margins[i] < NEAR_TIE_MARGIN:
                return None, f"near-tie mismatch at token {i} (margin {margins[i]:.2e})"
            return (f"token {i}: system {got} != target {want} with top-2 margin "
                    f"{margins[i]:.3g}"), None
    if tokens != ref:
        return f"{len(tokens)} tokens where the target gives {len(ref)}", None
    return None, None

