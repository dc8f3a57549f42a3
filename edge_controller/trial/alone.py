"""The target alone serving a trial's requests one after another: the baseline a user
without this system would run (transformers ``generate`` on the verifier's CPUs).

    python -m edge_controller.trial.alone REQUESTS.json

REQUESTS.json: ``{"requests": [[prompt_ids, max_new_tokens], ...], "temperature": t}``.
Prints ``{"requests": [{"tokens": n, "seconds": s}, ...]}``: each request's new tokens
(stopping at end of sequence, as the devices' do) and its wall time, the model loaded and
warmed up beforehand.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    import torch

    from models.target import load_registry_target

    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, tokenizer = load_registry_target()
    temperature = float(job.get("temperature", 0.0))
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id

    def generate(prompt_ids: list[int], max_new_tokens: int) -> int:
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
            "do_sample": False}
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, **sampling)
        return out.shape[1] - len(prompt_ids)

    generate(job["requests"][0][0], 4)  # warm-up: first-call costs are not serving
    results = []
    with torch.inference_mode():
        for prompt_ids, max_new_tokens in job["requests"]:
            started = time.perf_counter()
            tokens = generate(prompt_ids, max_new_tokens)
            results.append({"tokens": tokens, "seconds": time.perf_counter() - started})
    print(json.dumps({"requests": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
