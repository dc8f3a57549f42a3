"""ONNX Runtime drafts vs llama.cpp drafts on this CPU, side by side, in one run.

Pairs: the ``onnx`` draft (int4, block 32) vs ``q4_0``, and ``onnx-int8`` vs ``q8_0``; all
four are the target's weights, quantized locally.

1. Draft speed, alone: each draft greedily drafts ``--tokens`` tokens after each prompt on
   one thread (the cache reused as in a round; the prompt evaluated first and not timed),
   the four drafts interleaved, ``--repeats`` times; median draft tokens/s, ONNX / GGUF.
2. Acceptance, live through the controller: a real controller with a fixed draft length
   (``--draft-len``, policy fixed), one device per draft generating for the same prompt
   at the same time (greedy: every output is the target's, so the drafts are compared on
   the same text), prompt after prompt; accepted / drafted and tokens per round per draft.
3. Agreement, offline: the target's own greedy continuation of each prompt, and at each
   position whether the draft's greedy token equals it (teacher forced: the L = 1
   acceptance rate, free of the live run's round boundaries).

    .venv/bin/python scripts/bench_onnx.py [--tokens 64] [--repeats 5] [--draft-len 4]
        [--max-new-tokens 48] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [("onnx", "q4_0"), ("onnx-int8", "q8_0")]
PROMPTS = [
    "The three most important inventions of the last century are",
    "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Photosynthesis is the process by which",
    "Write a short story about a robot who learns to paint.\n",
    "The causes of the French Revolution were",
    "Tips for a first marathon: 1.",
]


def draft_speed(paths: dict[str, Path], tokens: int, repeats: int) -> dict[str, list[float]]:
    """Draft tokens/s of each draft per (repeat, prompt), the drafts interleaved."""
    from device_agent.cli import open_drafter

    drafters = {key: open_drafter(str(path)) for key, path in paths.items()}
    rates: dict[str, list[float]] = {key: [] for key in drafters}
    for repeat in range(repeats):
        for prompt in PROMPTS:
            for key, drafter in drafters.items():
                drafter.begin(drafter.tokenize(prompt))
                drafter.draft(1)  # evaluates the prompt (not timed)
                started = time.perf_counter()
                result = drafter.draft(tokens)  # re-evaluates the newest token, then drafts
                rates[key].append(len(result.tokens) / (time.perf_counter() - started))
        print(f"  speed: repeat {repeat + 1}/{repeats} done", file=sys.stderr, flush=True)
    return rates


def live_acceptance(paths: dict[str, Path], draft_len: int, max_new_tokens: int,
                    out: Path) -> dict[str, dict[str, float]]:
    """Accepted / drafted and tokens per round per draft, through a real controller."""
    from edge_controller.launch import AgentSpec, LabKeys, controller_process, run_agents

    totals = {key: {"drafted": 0, "accepted": 0, "tokens": 0, "rounds": 0} for key in paths}
    with LabKeys() as keys, controller_process(
            out / "controller.log", keys, "--config", str(ROOT / "configs" / "controller.toml"),
            "--draft-len", str(draft_len), "--policy", "fixed") as controller:
        for i, prompt in enumerate(PROMPTS):
            specs = [AgentSpec(f"dev-{key}", str(path), prompt, max_new_tokens)
                     for key, path in paths.items()]
            for key, runs in zip(paths, run_agents(controller.endpoint, specs, keys),
                                 strict=True):
                stats = runs[0]["stats"]
                for field in ("drafted", "accepted", "rounds"):
                    totals[key][field] += stats[field]
                totals[key]["tokens"] += len(runs[0]["tokens"])
            print(f"  live: prompt {i + 1}/{len(PROMPTS)} done", file=sys.stderr, flush=True)
    return {key: {"acceptance": t["accepted"] / max(t["drafted"], 1),
                  "tokens_per_round": t["tokens"] / max(t["rounds"], 1), **t}
            for key, t in totals.items()}


def agreement(paths: dict[str, Path], max_new_tokens: int) -> dict[str, float]:
    """Per draft: the share of the target's greedy tokens the draft predicts, teacher forced."""
    import torch

    import models
    from device_agent.cli import open_drafter
    from models.target import load_target

    model, tokenizer = load_target(models.ensure().target_gguf)
    drafters = {key: open_drafter(str(path)) for key, path in paths.items()}
    first = next(iter(drafters.values()))
    hits = dict.fromkeys(drafters, 0)
    total = 0
    for prompt in PROMPTS:
        ids = first.tokenize(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        continuation = out[0, len(ids):].tolist()
        total += len(continuation)
        for key, drafter in drafters.items():
            drafter.begin(ids)
            for token in continuation:
                hits[key] += drafter.draft(1).tokens[0] == token
                drafter.accept([token])
    return {key: hit / total for key, hit in hits.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens drafted per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draft-len", type=int, default=4, help="the fixed L, live")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_onnx")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.tokens, args.repeats, args.draft_len, args.max_new_tokens) < 1:
        parser.error("--tokens, --repeats, --draft-len and --max-new-tokens must be >= 1")

    import models

    keys = [key for pair in PAIRS for key in pair]
    print("building the drafts (cached after the first run) ...", file=sys.stderr, flush=True)
    paths = {key: models.ensure(include=keys).drafts[key] for key in keys}
    rates = draft_speed(paths, args.tokens, args.repeats)
    live = live_acceptance(paths, args.draft_len, args.max_new_tokens, args.out)
    agree = agreement(paths, args.max_new_tokens)
    median = {key: statistics.median(values) for key, values in rates.items()}
    pairs = [{"onnx": onnx, "gguf": gguf, "onnx_tok_s": median[onnx], "gguf_tok_s": median[gguf],
              "speed_ratio": median[onnx] / median[gguf],
              "onnx_acceptance": live[onnx]["acceptance"],
              "gguf_acceptance": live[gguf]["acceptance"],
              "onnx_agreement": agree[onnx], "gguf_agreement": agree[gguf]}
             for onnx, gguf in PAIRS]
    summary = {"host": platform.processor() or platform.machine(), "tokens": args.tokens,
               "repeats": args.repeats, "draft_len": args.draft_len, "prompts": len(PROMPTS),
               "draft_tok_s": median, "live": live, "agreement": agree, "pairs": pairs}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{'draft':<10} {'draft tok/s':>11} {'acceptance':>10} {'tok/round':>9} "
          f"{'agreement':>9}")
    for key in keys:
        print(f"{key:<10} {median[key]:>11.1f} {live[key]['acceptance']:>10.3f} "
              f"{live[key]['tokens_per_round']:>9.2f} {agree[key]:>9.3f}")
    for p in pairs:
        print(f"{p['onnx']} / {p['gguf']}: draft speed {p['speed_ratio']:.2f}x, acceptance "
              f"{p['onnx_acceptance']:.3f} vs {p['gguf_acceptance']:.3f}, agreement "
              f"{p['onnx_agreement']:.3f} vs {p['gguf_agreement']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
