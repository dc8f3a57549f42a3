"""Confidence stopping end to end on the default models: with and without, in one run.

A real controller (configs/controller.toml, synchronous rounds) and three devices drafting
with the three default drafts (q8_0, q5_0, q4_0; each paced to ``--draft-pace`` s per token
at least, as slower boards), all generating for the same prompt at once (greedy: every
output is the target's, so the arms produce the same text). Arms, each with a controller
of its own, run one after another and the whole cycle ``--cycles`` times (ABCABC: drift
of this machine's speed spreads over all arms):

* ``heterogeneous``: draft lengths and shares planned, every draft the planned length;
* ``confidence``: the same plan as caps, with per-device stopping thresholds planned
  (control/confidence.py);
* ``confidence-h0.5``: one fixed threshold h = 0.5 for every device, caps planned.

Per arm: tokens per round, draft tokens uploaded, wasted (rejected) draft tokens per
round, drafts that stopped early, and goodput (generated tokens over the time from the
first draft to the last verdict, summed over devices), with each arm's ratio to
``heterogeneous``.

    .venv/bin/python scripts/bench_confidence.py [--cycles 2] [--max-new-tokens 64]
        [--draft-pace 0.02] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRAFTS = ("q8_0", "q5_0", "q4_0")
PROMPTS = [
    "The three most important inventions of the last century are",
    "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Photosynthesis is the process by which",
    "Tips for a first marathon: 1.",
]
ARMS = {
    "heterogeneous": ("--policy", "heterogeneous"),
    "confidence": ("--policy", "confidence"),
    "confidence-h0.5": ("--policy", "confidence", "--config", "{h05}"),
}
FIELDS = ("tokens", "rounds", "drafted", "accepted", "stopped_early", "seconds")


def run_arm(args: tuple[str, ...], paths: dict[str, Path], keys, out: Path, pace: float,
            max_new_tokens: int) -> dict[str, float]:
    """Totals over every prompt and device of one arm, through one controller."""
    from edge_controller.launch import AgentSpec, controller_process, run_agents

    totals = dict.fromkeys(FIELDS, 0.0)
    with controller_process(out / "controller.log", keys, *args) as controller:
        for prompt in PROMPTS:
            specs = [AgentSpec(f"dev-{key}", str(path), prompt, max_new_tokens,
                               ("--draft-pace", str(pace)))
                     for key, path in paths.items()]
            for runs in run_agents(controller.endpoint, specs, keys):
                stats = runs[0]["stats"]
                for name in ("rounds", "drafted", "accepted", "stopped_early"):
                    totals[name] += stats[name]
                totals["tokens"] += len(runs[0]["tokens"])
                totals["seconds"] += len(runs[0]["tokens"]) / stats["goodput_tok_s"]
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft-pace", type=float, default=0.02, metavar="S",
                        help="each device drafts at most one token per S seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench_confidence")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if min(args.cycles, args.max_new_tokens) < 1 or args.draft_pace < 0:
        parser.error("--cycles and --max-new-tokens must be >= 1, --draft-pace >= 0")

    import models
    from edge_controller.launch import LabKeys

    paths = {key: models.ensure().drafts[key] for key in DRAFTS}
    args.out.mkdir(parents=True, exist_ok=True)
    base = (ROOT / "configs" / "controller.toml").read_text()
    h05 = args.out / "controller-h05.toml"
    if "stop_confidence = 0.0" not in base:
        raise SystemExit("configs/controller.toml no longer says stop_confidence = 0.0")
    h05.write_text(base.replace("stop_confidence = 0.0", "stop_confidence = 0.5", 1))
    totals = {arm: dict.fromkeys(FIELDS, 0.0) for arm in ARMS}
    with LabKeys() as keys:
        for cycle in range(args.cycles):
            for arm, arm_args in ARMS.items():
                argv = ("--config", str(ROOT / "configs" / "controller.toml"),
                        *(a.format(h05=h05) for a in arm_args))
                got = run_arm(argv, paths, keys, args.out / arm, args.draft_pace,
                              args.max_new_tokens)
                for name in FIELDS:
                    totals[arm][name] += got[name]
                print(f"  cycle {cycle + 1}/{args.cycles}: {arm} done", file=sys.stderr,
                      flush=True)
    rows = {}
    for arm, t in totals.items():
        rows[arm] = {
            "tokens_per_round": t["tokens"] / t["rounds"],
            "draft_tokens_per_round": t["drafted"] / t["rounds"],
            "wasted_per_round": (t["drafted"] - t["accepted"]) / t["rounds"],
            "acceptance": t["accepted"] / max(t["drafted"], 1),
            "stopped_per_round": t["stopped_early"] / t["rounds"],
            "goodput_tok_s": t["tokens"] / t["seconds"] * len(DRAFTS),
            **t,
        }
    base_goodput = rows["heterogeneous"]["goodput_tok_s"]
    for row in rows.values():
        row["goodput_ratio"] = row["goodput_tok_s"] / base_goodput
    if args.json:
        print(json.dumps({"cycles": args.cycles, "draft_pace_s": args.draft_pace,
                          "max_new_tokens": args.max_new_tokens, "prompts": len(PROMPTS),
                          "arms": rows}, indent=2))
        return 0
    print(f"{'arm':<16} {'tok/round':>9} {'drafted/round':>13} {'wasted/round':>12} "
          f"{'accept':>6} {'stopped':>7} {'goodput tok/s':>13} {'ratio':>6}")
    for arm, r in rows.items():
        print(f"{arm:<16} {r['tokens_per_round']:>9.2f} {r['draft_tokens_per_round']:>13.2f} "
              f"{r['wasted_per_round']:>12.2f} {r['acceptance']:>6.3f} "
              f"{r['stopped_per_round']:>7.2f} {r['goodput_tok_s']:>13.2f} "
              f"{r['goodput_ratio']:>6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
