"""Record the solvers' goodputs on the fixed random set that tests/test_control_speed.py
holds every later solver to (within 0.1%).

    .venv/bin/python scripts/record_solver_reference.py [--out tests/data/solver_reference.json]

The shipped file was recorded from the solvers of commit 3a91f04 (before issue 20's
rewrite); re-recording replaces that reference with the current solvers' results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from edge_controller.control import solve
from edge_controller.control.scenario import UPLOAD_BITS, random_problem

REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "data" / "solver_reference.json"
SIZES = (10, 30, 100, 300, 1_000, 3_000, 10_000)
POLICIES = ("homogeneous", "heterogeneous")


def reference_set() -> list[dict]:
    """Every (K, upload law, acceptance model, verifier) once, each with its own seed. The
    second verifier's per-token cost shrinks as 1/K (a GPU sized for the cell): with the
    fixed 0.4 ms, thousands of devices make verification so dear that nearly every plan
    is L = 0, which tests little."""
    cases = []
    for k in SIZES:
        for verify_per_token_s in (0.0004, 0.04 / k):
            for bits in UPLOAD_BITS:
                for curves in (False, True):
                    cases.append({"num_users": k, "seed": len(cases), "bits_per_token": bits,
                                  "curves": curves, "verify_per_token_s": verify_per_token_s})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REFERENCE)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    rows = []
    for case in reference_set():
        system, users = random_problem(**case)
        row = dict(case)
        for policy in POLICIES:
            start = time.perf_counter()
            row[policy] = solve(policy, system, users).goodput_tok_s
            row[f"{policy}_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        rows.append(row)
        print(row)
    args.out.write_text(json.dumps({"commit": commit, "cases": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
