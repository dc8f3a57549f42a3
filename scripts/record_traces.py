"""Record the draft traces that synthetic devices replay (device_agent/synthetic.py).

For every prompt and every default draft model: the target's greedy output (transformers,
fp32: the truth) with its top-2 logit margins, and at every position of it the draft
model's greedy continuation (llama.cpp, MAX_DRAFT tokens) with its top-1 probability at
each position, and the draft model's measured speed. About 6-7 minutes on 2 cores (docs/soak.md).

    .venv/bin/python scripts/record_traces.py [--tokens 96] [--out FILE.json.gz]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_agent.drafter import Drafter  # noqa: E402
from edge_controller.controller import TargetInfo  # noqa: E402
from models.traces import MAX_DRAFT, TRACES_DIR, Trace, TraceSet  # noqa: E402

MIN_TOKENS = 16
PROMPTS = [
    "The three laws of thermodynamics are",
    "Explain to a child why the sky is blue.",
    "def add(a, b):\n",
    "A short history of the printing press:",
    "Translate into French: The weather is lovely today, so we will walk to the river.",
    "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "The water cycle works as follows:",
    "Write a haiku about a lighthouse in winter.",
    "List five tips for staying focused while studying:",
    "The main differences between TCP and UDP are",
    "Once upon a time, in a village at the edge of a forest,",
    "Summarize the plot of Romeo and Juliet in three sentences.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=96, help="target output per prompt")
    parser.add_argument("--out", type=Path, default=TRACES_DIR / "smollm2-135m.json.gz")
    args = parser.parse_args(argv)

    import models
    from models.target import load_target, reference_greedy

    materialized = models.ensure()
    target = load_target(materialized.target_gguf)
    drafters = {key: Drafter(path, n_ctx=1024) for key, path in sorted(materialized.drafts.items())
                if materialized.draft_models[key].fingerprint == materialized.target.fingerprint}
    first = next(iter(drafters.values()))
    prompts = [first.tokenize(p) for p in PROMPTS]
    outputs = [reference_greedy(target, p, args.tokens)
               for p in tqdm(prompts, desc="target outputs", unit="prompt")]
    # A prompt the target answers with an end of sequence at once drafts nothing: dropped.
    kept = [i for i, (truth, _) in enumerate(outputs) if len(truth) >= MIN_TOKENS]
    for i in sorted(set(range(len(prompts))) - set(kept)):
        print(f"dropped {PROMPTS[i]!r}: the target writes only {len(outputs[i][0])} tokens")
    prompts, outputs = [prompts[i] for i in kept], [outputs[i] for i in kept]
    truths = [truth for truth, _ in outputs]
    traces = []
    with tqdm(total=len(prompts) * len(drafters), desc="draft traces", unit="trace") as bar:
        for drafter in drafters.values():
            for prompt, (truth, margins) in zip(prompts, outputs, strict=True):
                drafts, confidences, per_token = [], [], []
                for p in range(len(truth)):
                    drafter.begin(prompt + truth[:p])
                    result = drafter.draft(MAX_DRAFT)
                    drafts.append(result.tokens)
                    confidences.append([round(c, 4) for c in result.top1])
                    if p > 0:  # the first also evaluated the prompt
                        per_token.append(result.seconds / MAX_DRAFT)
                traces.append(Trace(drafter.model_id, prompt, truth,
                                    [round(m, 5) for m in margins], drafts,
                                    round(statistics.median(per_token), 6), confidences))
                bar.update()
    recorded = {
        "command": "scripts/record_traces.py " + " ".join(argv or sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "host": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 drafter thread",
        "max_new_tokens": args.tokens,
        "target": {"name": materialized.target.name, "sha256": materialized.target.sha256},
        "drafts": {key: {"name": materialized.draft_models[key].name,
                         "sha256": materialized.draft_models[key].sha256} for key in drafters},
        "prompts": [PROMPTS[i] for i in kept],
    }
    eos = TargetInfo.from_model(materialized.target.name, *target).eos_token_ids
    traces_set = TraceSet(materialized.target.name, first.fingerprint, first.vocab_size,
                          sorted(eos), recorded, traces)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    traces_set.save(args.out)
    print(f"{len(traces)} traces ({len(prompts)} prompts x {len(drafters)} drafts, "
          f"{sum(len(t) for t in truths)} target tokens) -> {args.out} "
          f"({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
