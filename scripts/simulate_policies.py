"""Every policy against the oracle on the draft-length-under-delay scenarios, in the simulator.

    .venv/bin/python scripts/simulate_policies.py [--seconds 90] [--seeds 3] [--warmup 30]
        [--replay-drafts] [--policies a,b] [--write]

For each scenario (steady-6, drift-6, edge-cloud-6: configs/scenarios/) and policy, the
mean over seeds of `edge-controller simulate ... --json`'s ratio_to_oracle, whole run and
per phase (between drift times, and from --warmup on). --replay-drafts: devices replay the
recorded real drafts with their confidences (what `confidence` needs), a table of its own.
--write puts the table between its markers in docs/results.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_controller.config import ACCEPTANCE_MODELS  # noqa: E402
from edge_controller.control.scenario import load_scenario  # noqa: E402
from edge_controller.simulator import SIMULATED_POLICIES, simulate_scenario  # noqa: E402
from models.traces import default_traces  # noqa: E402

SCENARIOS = ("steady-6", "drift-6", "edge-cloud-6")
RESULTS = ROOT / "docs" / "results.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--acceptance", choices=ACCEPTANCE_MODELS, default="geometric")
    parser.add_argument("--warmup", type=float, default=0.0, metavar="S",
                        help="also score every run from S simulated seconds on")
    parser.add_argument("--replay-drafts", action="store_true",
                        help="replay recorded real drafts (with confidences)")
    parser.add_argument("--policies", help="comma-separated (default: every policy)")
    parser.add_argument("--write", action="store_true", help="update docs/results.md")
    args = parser.parse_args(argv)
    logging.getLogger("edge_controller.draft_control").setLevel(logging.WARNING)
    policies = (args.policies.split(",") if args.policies else
                [p for p in SIMULATED_POLICIES  # brute force: 17^6 plans, refused
                 if p != "brute-force" and (args.replay_drafts or p != "confidence")])
    traces = default_traces() if args.replay_drafts else None
    tag = "simulate-replay" if args.replay_drafts else "simulate"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    lines = []
    for name in SCENARIOS:
        scenario = load_scenario(ROOT / "configs" / "scenarios" / f"{name}.toml")
        rows = {}
        for policy in tqdm(policies, desc=name, unit="policy"):
            reports = [simulate_scenario(scenario, policy, args.seconds, seed, args.acceptance,
                                         traces=traces, warmup_s=args.warmup)
                       for seed in range(args.seeds)]
            rows[policy] = reports
        phases = [f"{p['start_s']:g}-{p['end_s']:g} s" for p in rows[policies[0]][0]["phases"]]
        lines += [f"**{name}** ({scenario.description.split('. ')[0].strip()}; oracle "
                  f"{np.mean([r['oracle_goodput_tok_s'] for r in rows[policies[0]]]):.1f}"
                  " tok/s)", "",
                  "| policy | ratio to oracle | " + " | ".join(phases)
                  + " | tokens / round | wasted drafts / round | mean L per device |",
                  "|---|---:|" + "---:|" * (len(phases) + 2) + "---|"]
        for policy, reports in sorted(rows.items(), key=lambda kv: -np.mean(
                [r["ratio_to_oracle"] for r in kv[1]])):
            ratio = [r["ratio_to_oracle"] for r in reports]
            per_phase = [np.mean([r["phases"][i]["ratio_to_oracle"] or np.nan for r in reports])
                         for i in range(len(phases))]  # nan: the oracle delivered nothing
            lengths = np.mean([[u["mean_draft_len"] for u in r["users"]] for r in reports], 0)
            label = policy + (f" (L = {reports[0]['fixed_draft_len']})"
                              if "fixed_draft_len" in reports[0] else "")
            per_round = np.mean([r["tokens_per_round"] for r in reports])
            wasted = np.mean([r["wasted_draft_tokens"] / max(r["rounds"], 1) for r in reports])
            lines.append(f"| {label} | {np.mean(ratio):.3f} +- {np.std(ratio):.3f} | "
                         + " | ".join(f"{x:.3f}" for x in per_phase)
                         + f" | {per_round:.2f} | {wasted:.2f} | "
                         + " ".join(f"{x:.1f}" for x in lengths) + " |")
        lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.write:
        text = RESULTS.read_text()
        command = " ".join(["scripts/simulate_policies.py", *(argv or sys.argv[1:])])
        block = f"{begin}\n<!-- .venv/bin/python {command} -->\n\n{table}\n{end}"
        new = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text,
                     flags=re.S)
        if new == text and begin not in text:
            raise SystemExit(f"markers {begin} ... {end} not found in {RESULTS}")
        RESULTS.write_text(new)
        print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
