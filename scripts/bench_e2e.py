"""End-to-end benchmark: the target alone vs the system, on this host's loopback.

In one run: (1) the target alone (transformers ``generate``, greedy, KV cache, same
precision as the controller) generates for each prompt in turn, and its tokens/s is the
baseline; (2) a real controller and K real device agents (different drafts) generate for
the same prompts at once. Printed per device: the system's tokens/s and its ratio to the
target alone; and the aggregate (sum over devices) against the target alone serving the
users one after another. All greedy, so both sides produce the same tokens.

    .venv/bin/python scripts/bench_e2e.py [--devices 3] [--max-new-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The three most important inventions of the last century are",
    "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Photosynthesis is the process by which",
    "Write a short story about a robot who learns to paint.\n",
    "The causes of the French Revolution were",
    "import numpy as np\n\ndef moving_average(x, window):\n",
    "Tips for a first marathon: 1.",
    "The difference between a virus and a bacterium is",
]
DRAFTS = ["q8_0", "q5_0", "q4_0"]


def target_alone(prompts: list[list[int]], max_new_tokens: int) -> list[float]:
    """Tokens/s of the target generating each prompt alone (after one warm-up)."""
    import torch

    import models
    from models.target import load_target

    model, tokenizer = load_target(models.ensure().target_gguf)
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    rates = []
    with torch.no_grad():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False,
                       pad_token_id=pad)
        for ids in prompts:
            started = time.perf_counter()
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
            rates.append((out.shape[1] - len(ids)) / (time.perf_counter() - started))
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=3, help=f"1..{len(PROMPTS)}")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_e2e")
    parser.add_argument("--insecure", action="store_true",
                        help="plain TCP instead of CURVE (to measure what the keys cost)")
    args = parser.parse_args()
    if not 1 <= args.devices <= len(PROMPTS):
        parser.error(f"--devices must be in 1..{len(PROMPTS)}")

    from edge_controller.launch import AgentSpec, LabKeys, controller_process, run_agents

    specs = [AgentSpec(f"dev{i}-{DRAFTS[i % len(DRAFTS)]}", DRAFTS[i % len(DRAFTS)], prompt,
                       args.max_new_tokens)
             for i, prompt in enumerate(PROMPTS[: args.devices])]
    with LabKeys(insecure=args.insecure) as keys, controller_process(
            args.out / "controller.log", keys, "--config",
            str(ROOT / "configs" / "controller.toml"), "--draft-len", str(args.draft_len)
    ) as endpoint:
        results = [runs[0] for runs in run_agents(endpoint, specs, keys)]
    baseline = target_alone([r["prompt_tokens"] for r in results], args.max_new_tokens)

    rows = []
    for spec, result, alone in zip(specs, results, baseline, strict=True):
        s = result["stats"]
        rows.append({
            "device": spec.device_id, "draft": spec.draft, "tokens": len(result["tokens"]),
            "acceptance_rate": s["acceptance_rate"], "tokens_per_round": s["tokens_per_round"],
            "system_tok_s": s["tokens_per_s"], "target_alone_tok_s": alone,
            "ratio": s["tokens_per_s"] / alone,
        })
    system_sum = sum(r["system_tok_s"] for r in rows)
    alone_mean = sum(baseline) / len(baseline)
    summary = {
        "host": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "devices": args.devices, "draft_len": args.draft_len,
        "link": "plain TCP" if args.insecure else "CURVE",
        "max_new_tokens": args.max_new_tokens, "per_device": rows,
        "aggregate_system_tok_s": system_sum, "target_alone_tok_s": alone_mean,
        "aggregate_ratio": system_sum / alone_mean,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'device':<12} {'draft':<5} {'accept':>6} {'tok/round':>9} {'system tok/s':>12} "
          f"{'alone tok/s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['device']:<12} {r['draft']:<5} {r['acceptance_rate']:>6.2f} "
              f"{r['tokens_per_round']:>9.2f} {r['system_tok_s']:>12.2f} "
              f"{r['target_alone_tok_s']:>11.2f} {r['ratio']:>6.2f}x")
    print(f"aggregate: system {system_sum:.2f} tok/s vs target alone {alone_mean:.2f} tok/s "
          f"serving one user at a time = {summary['aggregate_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
