"""Every policy against the oracle on the draft-length-under-delay scenarios, in the simulator.

    .venv/bin/python scripts/simulate_policies.py [--seconds 90] [--seeds 3] [--write]

For each scenario (steady-6, drift-6, edge-cloud-6: configs/scenarios/) and policy, the
mean over seeds of `edge-controller simulate ... --json`'s ratio_to_oracle, whole run and
per phase (between drift times). --write puts the table between the markers in
docs/results.md.
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

SCENARIOS = ("steady-6", "drift-6", "edge-cloud-6")
RESULTS = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- simulate:begin -->", "<!-- simulate:end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--acceptance", choices=ACCEPTANCE_MODELS, default="geometric")
    parser.add_argument("--write", action="store_true", help="update docs/results.md")
    args = parser.parse_args(argv)
    logging.getLogger("edge_controller.draft_control").setLevel(logging.WARNING)
    policies = [p for p in SIMULATED_POLICIES if p != "brute-force"]  # 17^6 plans: refused
    lines = []
    for name in SCENARIOS:
        scenario = load_scenario(ROOT / "configs" / "scenarios" / f"{name}.toml")
        rows = {}
        for policy in tqdm(policies, desc=name, unit="policy"):
            reports = [simulate_scenario(scenario, policy, args.seconds, seed, args.acceptance)
                       for seed in range(args.seeds)]
            rows[policy] = reports
        phases = [f"{p['start_s']:g}-{p['end_s']:g} s" for p in rows[policies[0]][0]["phases"]]
        lines += [f"**{name}** ({scenario.description.split('. ')[0].strip()}; oracle "
                  f"{np.mean([r['oracle_goodput_tok_s'] for r in rows[policies[0]]]):.1f}"
                  " tok/s)", "",
                  "| policy | ratio to oracle | " + " | ".join(phases) + " | mean L per device |",
                  "|---|---:|" + "---:|" * len(phases) + "---|"]
        for policy, reports in sorted(rows.items(), key=lambda kv: -np.mean(
                [r["ratio_to_oracle"] for r in kv[1]])):
            ratio = [r["ratio_to_oracle"] for r in reports]
            per_phase = [np.mean([r["phases"][i]["ratio_to_oracle"] or np.nan for r in reports])
                         for i in range(len(phases))]  # nan: the oracle delivered nothing
            lengths = np.mean([[u["mean_draft_len"] for u in r["users"]] for r in reports], 0)
            label = policy + (f" (L = {reports[0]['fixed_draft_len']})"
                              if "fixed_draft_len" in reports[0] else "")
            lines.append(f"| {label} | {np.mean(ratio):.3f} +- {np.std(ratio):.3f} | "
                         + " | ".join(f"{x:.3f}" for x in per_phase) + " | "
                         + " ".join(f"{x:.1f}" for x in lengths) + " |")
        lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.write:
        text = RESULTS.read_text()
        block = (f"{BEGIN}\n<!-- .venv/bin/python scripts/simulate_policies.py --seconds "
                 f"{args.seconds:g} --seeds {args.seeds} --write -->\n\n{table}\n{END}")
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text,
                     flags=re.S)
        if new == text and BEGIN not in text:
            raise SystemExit(f"markers {BEGIN} ... {END} not found in {RESULTS}")
        RESULTS.write_text(new)
        print(f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
