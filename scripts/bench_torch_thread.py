"""Where the verifier's forwards run: the loading thread vs a worker thread, in one run.

The same batched forward (--users sessions, --draft-len tokens each, after a --context
token prompt) on the real default target, timed --reps times in each of three fresh
processes (docs/scheduling.md, "One thread for torch"):

- ``loop``: in the thread that loaded the model (synchronous rounds before the rule);
- ``worker``: in a VerifierWorker thread, the loading thread having kept torch's default
  thread count (continuous serving before the rule);
- ``worker-one``: in a VerifierWorker thread given torch's default count, the loading thread
  set to one intra-op thread before loading (the rule: every scheduler now).

Printed: the median forward of each and the ratios to ``worker-one``.

    .venv/bin/python scripts/bench_torch_thread.py [--reps 25] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("loop", "worker", "worker-one")


def measure(mode: str, users: int, draft_len: int, context: int, reps: int) -> list[float]:
    """Forward seconds in a fresh process (torch's threads are set once per process)."""
    import numpy as np
    import torch

    from edge_controller.verifier.engine import Verifier
    from edge_controller.verifier.slots import SamplingParams, VerifyItem
    from edge_controller.verifier.worker import Forward, VerifierWorker, torch_to_the_verifier
    from models import ensure
    from models.target import load_target

    threads = torch_to_the_verifier() if mode == "worker-one" else None
    model, _ = load_target(ensure().target_gguf, dtype="float32", device="cpu")
    verifier = Verifier(model, max_sessions=users, max_len=context + draft_len + 8,
                        device=torch.device("cpu"), dtype=torch.float32)
    rng, vocab = np.random.default_rng(0), verifier.vocab_size
    slots = [verifier.open(rng.integers(0, vocab, context).tolist()) for _ in range(users)]
    worker = VerifierWorker(verifier, threads)
    seconds = []
    try:
        for _ in range(reps + 2):  # two warm-up forwards
            forward = Forward([VerifyItem(s, rng.integers(0, vocab, draft_len).tolist(),
                                          SamplingParams()) for s in slots])
            forward = forward.run(verifier) if mode == "loop" else worker.run(forward)
            seconds.append(forward.seconds)
            for slot in slots:
                verifier.truncate(slot, context)
    finally:
        worker.close()
    return seconds[2:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--draft-len", type=int, default=5)
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one child
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    shape = (args.users, args.draft_len, args.context, args.reps)
    if args.mode:
        print(json.dumps(measure(args.mode, *shape)))
        return 0
    medians = {}
    for mode in MODES:
        print(f"{mode} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--users", str(args.users),
             "--draft-len", str(args.draft_len), "--context", str(args.context),
             "--reps", str(args.reps)],
            capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            sys.exit(f"{mode} failed:\n{out.stderr[-2000:]}")
        medians[mode] = statistics.median(json.loads(out.stdout.splitlines()[-1]))
    result = {f"{m}_ms": round(v * 1e3, 1) for m, v in medians.items()}
    result |= {f"{m}_over_worker_one": round(v / medians["worker-one"], 2)
               for m, v in medians.items() if m != "worker-one"}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
