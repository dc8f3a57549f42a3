"""Solve time of every draft-control policy at 10 .. 10,000 users, with ratios.

    .venv/bin/python scripts/bench_control.py [--repeat 5]

Random instances over DESIGN.md's realistic ranges, greedy uploads, L_max = 16. Prints the
median wall time per solve and each policy's ratio to homogeneous.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from edge_controller.control import POLICIES, SystemParams, UserParams, VerifyTime, solve

SIZES = (10, 100, 1_000, 10_000)
BRUTE_FORCE_MAX_USERS = 3  # 17^K plans


def instance(num_users: int, seed: int = 0) -> tuple[SystemParams, UserParams]:
    rng = np.random.default_rng(seed)
    system = SystemParams(20e6, 17, VerifyTime(0.025, 0.0004), 800, 16)
    users = UserParams(
        rng.uniform(0.010, 0.080, num_users),
        rng.uniform(0.40, 0.95, num_users),
        rng.uniform(0.5, 7.0, num_users),
        rng.uniform(0.005, 0.050, num_users),
    )
    return system, users


def median_solve_s(policy: str, system: SystemParams, users: UserParams, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        solve(policy, system, users)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    sizes = (BRUTE_FORCE_MAX_USERS, *SIZES)
    print(f"{'policy':<15}" + "".join(f"{f'K={k}':>12}" for k in sizes) + "   (ms, median)")
    table = {}
    for policy in POLICIES:
        row = []
        for k in sizes:
            if policy == "brute-force" and k > BRUTE_FORCE_MAX_USERS:
                row.append(float("nan"))
                continue
            system, users = instance(k)
            repeat = 1 if policy == "brute-force" else args.repeat
            row.append(median_solve_s(policy, system, users, repeat) * 1e3)
        table[policy] = row
        print(f"{policy:<15}" + "".join(f"{ms:>12.3f}" for ms in row))
    print("\nratio to homogeneous")
    for policy, row in table.items():
        ratios = np.array(row) / np.array(table["homogeneous"])
        print(f"{policy:<15}" + "".join(f"{r:>12.2f}" for r in ratios))


if __name__ == "__main__":
    main()
