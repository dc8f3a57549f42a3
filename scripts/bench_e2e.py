"""End-to-end benchmark: the target alone vs the system, on this host's loopback.

In one run: (1) the target alone (transformers ``generate``, greedy, KV cache, same
precision as the controller) generates for each prompt in turn, and its tokens/s is the
baseline; (2) a real controller and K real device agents (different drafts) generate for
the same prompts at once. Printed per device: the system's tokens/s and its ratio to the
target alone; and the aggregate (sum over devices) against the target alone serving the
users one after another. All greedy, so both sides produce the same tokens.

    .venv/bin/python scripts/bench_e2e.py [--devices 3] [--max-new-tokens 64] [--json]
        [--link curve|plain|both [--repeats 2]] [--policy fixed]

``--link both`` runs the system with keys (CURVE) and without (plain TCP), alternating,
and prints what the secure link costs in aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from edge_controller.launch import AgentSpec, LabKeys, controller_process, run_agents

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
    parser.add_argument("--policy", help="draft control policy (default: the config's)")
    parser.add_argument("--link", choices=("curve", "plain", "both"), default="curve",
                        help="CURVE with keys (default), plain TCP, or both in one run to "
                        "measure what the keys cost")
    parser.add_argument("--repeats", type=int, default=2,
                        help="with --link both: runs of each, in alternating order")
    args = parser.parse_args()
    if not 1 <= args.devices <= len(PROMPTS):
        parser.error(f"--devices must be in 1..{len(PROMPTS)}")

    specs = [AgentSpec(f"dev{i}-{DRAFTS[i % len(DRAFTS)]}", DRAFTS[i % len(DRAFTS)], prompt,
                       args.max_new_tokens)
             for i, prompt in enumerate(PROMPTS[: args.devices])]
    links = ["curve", "plain"] if args.link == "both" else [args.link]
    runs: dict[str, list[list[dict]]] = {link: [] for link in links}
    for rep in range(args.repeats if args.link == "both" else 1):
        for link in links[::-1] if rep % 2 else links:  # neither always goes first
            runs[link].append(run_system(args, specs, insecure=link == "plain"))
    results = runs[links[0]][0]
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
        "devices": args.devices, "draft_len": args.draft_len, "link": links[0],
        "max_new_tokens": args.max_new_tokens, "per_device": rows,
        "aggregate_system_tok_s": system_sum, "target_alone_tok_s": alone_mean,
        "aggregate_ratio": system_sum / alone_mean,
    }
    if args.link == "both":
        summary["aggregate_system_tok_s_by_link"] = {
            link: [sum(r["stats"]["tokens_per_s"] for r in run) for run in link_runs]
            for link, link_runs in runs.items()}
        mean = {link: statistics.mean(v)
                for link, v in summary["aggregate_system_tok_s_by_link"].items()}
        summary["curve_over_plain"] = mean["curve"] / mean["plain"]
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'device':<12} {'draft':<5} {'accept':>6} {'tok/round':>9} {'system tok/s':>12} "
          f"{'alone tok/s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['device']:<12} {r['draft']:<5} {r['acceptance_rate']:>6.2f} "
              f"{r['tokens_per_round']:>9.2f} {r['system_tok_s']:>12.2f} "
              f"{r['target_alone_tok_s']:>11.2f} {r['ratio']:>6.2f}x")
    print(f"aggregate ({links[0]}): system {system_sum:.2f} tok/s vs target alone "
          f"{alone_mean:.2f} tok/s serving one user at a time = {summary['aggregate_ratio']:.2f}x")
    if args.link == "both":
        by_link = summary["aggregate_system_tok_s_by_link"]
        print("aggregate system tok/s per run: " + "; ".join(
            f"{link} " + ", ".join(f"{v:.2f}" for v in values) for link, values in by_link.items())
            + f"; CURVE / plain = {summary['curve_over_plain']:.3f}")
    return 0


def run_system(args: argparse.Namespace, specs: list[AgentSpec], insecure: bool) -> list[dict]:
    """A real controller and the agents, at once; each agent's first result."""
    extra = ["--policy", args.policy] if args.policy else []
    with LabKeys(insecure=insecure) as keys, controller_process(
            args.out / "controller.log", keys, "--config",
            str(ROOT / "configs" / "controller.toml"), "--draft-len", str(args.draft_len), *extra
    ) as controller:
        return [runs[0] for runs in run_agents(controller.endpoint, specs, keys)]


if __name__ == "__main__":
    sys.exit(main())
