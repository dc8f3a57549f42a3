"""The target alone serving a trial's requests one after another: the baseline a user
without this system would run (transformers ``generate`` on the verifier's CPUs).

    python -m edge_controller.trial.alone REQUESTS.json

REQUESTS.json: ``{"requests": [[prompt_ids, max_new_tokens], ...], "temperature": t}``.
Prints ``{"requests": [{"tokens": n, "seconds": s, "token_times": [...]}, ...]}``: each
request's new tokens (stopping at end of sequence, as the devices' do), its wall time, and
when each new token was ready (seconds since the request started), the model loaded and
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

    # The devices' requests sample from the whole distribution (top_k 0, top_p 1): so here.
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if temperature > 0 else {"do_sample": False})

    class Clock:
        """A streamer that notes when each new token is ready (the prompt comes first)."""

        def __init__(self, started: float):
            self.started, self.times, self.prompt_seen = started, [], False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter() - self.started)
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def generate(prompt_ids: list[int], max_new_tokens: int) -> dict:
        started = time.perf_counter()
        clock = Clock(started)
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, streamer=clock, **sampling)
        return {"tokens": out.shape[1] - len(prompt_ids),
                "seconds": time.perf_counter() - started, "token_times": clock.times}

    generate(job["requests"][0][0], 4)  # warm-up: first-call costs are not serving
    with torch.inference_mode():
        results = [generate(prompt_ids, n) for prompt_ids, n in job["requests"]]
    print(json.dumps({"requests": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
