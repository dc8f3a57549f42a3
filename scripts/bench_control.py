"""Solve time of every draft-control policy at 3 .. 10,000 devices, cold and warm.

    .venv/bin/python scripts/bench_control.py [--repeat 5] [--json] [--baseline REV]

Random instances over DESIGN.md's realistic ranges (``random_problem``: greedy uploads,
L_max = 16, T_v = 25 ms + 0.4 ms per token), seed 0 per K. Prints the median wall time per
solve (ms) and each policy's ratio to homogeneous; brute force only at K = 3 (17^3 plans).
``heterogeneous-warm``: a re-solve after every estimate moved by up to +-10%, started from
the plan before the move (the live controller's case), with its goodput next to a cold
solve of the same problem.

``--baseline REV`` times the solvers of git revision REV on the same instances in the same
run (a child process imports them from ``git archive REV``), for before/after tables.
``--json`` prints {"POLICY": {"K": median_ms}}; the baseline's entries are named
"POLICY@REV".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

from edge_controller.control import POLICIES, UserParams, solve
from edge_controller.control.scenario import random_problem

ROOT = Path(__file__).resolve().parents[1]
SIZES = (3, 10, 100, 1_000, 10_000)
BRUTE_FORCE_MAX_USERS = 3
DRIFT = 0.10  # estimates move by up to this fraction between a plan and its warm re-solve

# Run in a child process against another revision's edge_controller.control: the API it
# uses (SystemParams, UserParams, VerifyTime, POLICIES, solve) is the same in every one.
BASELINE_CHILD = """
import json, sys, time
import numpy as np
from edge_controller.control import POLICIES, SystemParams, UserParams, VerifyTime, solve
sizes, repeat, path = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
data = np.load(path)
table = {}
for policy in POLICIES:
    for k in sizes:
        if policy == "brute-force" and k > 3:
            continue
        b, bits, base, per_token, overhead, max_len = data[f"system{k}"]
        system = SystemParams(b, bits, VerifyTime(base, per_token), overhead, int(max_len))
        users = UserParams(*(data[f"{name}{k}"] for name in ("t", "a", "s", "d")))
        times = []
        for _ in range(1 if policy == "brute-force" else repeat):
            start = time.perf_counter()
            solve(policy, system, users)
            times.append(time.perf_counter() - start)
        table.setdefault(policy, {})[str(k)] = float(np.median(times)) * 1e3
print(json.dumps(table))
"""


def median_ms(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def drifted(users: UserParams, rng: np.random.Generator) -> UserParams:
    """The same devices with every estimate moved by up to +-DRIFT."""

    def move(values: np.ndarray) -> np.ndarray:
        return values * rng.uniform(1 - DRIFT, 1 + DRIFT, values.shape)

    return UserParams(
        move(users.draft_s_per_token),
        np.clip(move(users.acceptance.rate), 0.0, 1.0),
        move(users.spectral_efficiency),
        move(users.delay_s),
    )


def ours(repeat: int) -> tuple[dict[str, dict[str, float]], dict[int, float]]:
    table: dict[str, dict[str, float]] = {}
    warm_quality = {}
    for policy in POLICIES:
        for k in SIZES:
            if policy == "brute-force" and k > BRUTE_FORCE_MAX_USERS:
                continue
            system, users = random_problem(k)
            runs = 1 if policy == "brute-force" else repeat
            ms = median_ms(lambda: solve(policy, system, users), runs)  # noqa: B023
            table.setdefault(policy, {})[str(k)] = ms
    for k in SIZES:
        system, users = random_problem(k)
        before = solve("heterogeneous", system, users)
        moved = drifted(users, np.random.default_rng(k))
        run = lambda: solve("heterogeneous", system, moved, warm=before)  # noqa: E731, B023
        table.setdefault("heterogeneous-warm", {})[str(k)] = median_ms(run, repeat)
        cold = solve("heterogeneous", system, moved).goodput_tok_s
        warm_quality[k] = run().goodput_tok_s / cold
    return table, warm_quality


def baseline(revision: str, repeat: int) -> dict[str, dict[str, float]]:
    """Time REV's solvers on the same instances, in a child process importing them."""
    archive = subprocess.run(
        ["git", "archive", revision, "edge_controller"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        arrays = {}
        for k in SIZES:
            system, users = random_problem(k)
            verify = system.verify_time
            arrays.update({
                f"system{k}": [system.bandwidth_hz, system.bits_per_token, verify.base_s,
                               verify.per_token_s, system.overhead_bits, system.max_draft_len],
                f"t{k}": users.draft_s_per_token, f"a{k}": users.acceptance.rate,
                f"s{k}": users.spectral_efficiency, f"d{k}": users.delay_s,
            })
        path = os.path.join(tmp, "instances.npz")
        np.savez(path, **arrays)
        env = {**os.environ, "PYTHONPATH": tmp}
        out = subprocess.run(
            [sys.executable, "-c", BASELINE_CHILD, json.dumps(SIZES), str(repeat), path],
            env=env, cwd=tmp, capture_output=True, text=True, check=True,
        ).stdout
    return {f"{policy}@{revision}": row for policy, row in json.loads(out).items()}


def print_table(title: str, table: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(f"{'':<28}" + "".join(f"{f'K={k:,}':>12}" for k in SIZES))
    for name, row in table.items():
        print(f"{name:<28}" + "".join(f"{row.get(str(k), float('nan')):>12.3f}" for k in SIZES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="solves per median (default 5)")
    parser.add_argument("--json", action="store_true", help="print {POLICY: {K: median_ms}}")
    parser.add_argument("--baseline", metavar="REV", help="also time this git revision's solvers")
    args = parser.parse_args()
    table, warm_quality = ours(args.repeat)
    before = baseline(args.baseline, args.repeat) if args.baseline else {}
    if args.json:
        print(json.dumps({**table, **before}, indent=1))
        return
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    print_table("median solve time (ms)", table)
    print_table("ratio to homogeneous", {
        name: {k: ms / table["homogeneous"][k] for k, ms in row.items()}
        for name, row in table.items()
    })
    print("\nwarm re-solve goodput / cold: " + ", ".join(
        f"K={k:,}: {ratio:.5f}" for k, ratio in warm_quality.items()))
    if before:
        print_table(f"baseline {args.baseline}: median solve time (ms)", before)
        print_table(f"speed-up over {args.baseline} (baseline time / ours)", {
            name: {k: before[f"{name}@{args.baseline}"][k] / ms for k, ms in row.items()}
            for name, row in table.items() if f"{name}@{args.baseline}" in before
        })


if __name__ == "__main__":
    main()
