"""``edge-controller plan SCENARIO --policy P [--json]``: solve draft control for a scenario."""

from __future__ import annotations

import argparse
import json
import sys
import time

POLICY_NAMES = (
    "homogeneous",
    "heterogeneous",
    "threshold",
    "agnostic",
    "equal-best-L",
    "fixed-L",
    "per-user-L",
    "brute-force",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="choose draft lengths and bandwidth shares for a scenario file",
        description="Solve multi-access draft control for a TOML scenario and print the plan.",
    )
    parser.add_argument("scenario", help="scenario TOML file (see configs/scenarios/)")
    parser.add_argument("--policy", choices=POLICY_NAMES, default="heterogeneous")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from edge_controller.control.scenario import ScenarioError, load_scenario
    from edge_controller.control.solvers import solve

    try:
        scenario = load_scenario(args.scenario)
        start = time.perf_counter()
        plan = solve(args.policy, scenario.system, scenario.users)
        solve_s = time.perf_counter() - start
    except (ScenarioError, ValueError) as err:
        print(f"edge-controller plan: {err}", file=sys.stderr)
        return 2
    users = [
        {
            "name": name,
            "draft_len": int(length),
            "bandwidth_share": float(share),
            "goodput_tok_s": float(goodput),
        }
        for name, length, share, goodput in zip(
            scenario.users.names,
            plan.draft_len,
            plan.bandwidth_share,
            plan.user_goodput_tok_s,
            strict=True,
        )
    ]
    if args.json:
        report = {
            "scenario": scenario.name,
            "policy": plan.policy,
            "goodput_tok_s": plan.goodput_tok_s,
            "round_time_s": plan.round_time_s,
            "solve_s": solve_s,
            "users": users,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"scenario {scenario.name}: policy {plan.policy}, {len(users)} users")
    print(f"{'user':<20} {'L':>3} {'share':>7} {'tok/s':>9}")
    for user in users:
        print(
            f"{user['name']:<20} {user['draft_len']:>3} {user['bandwidth_share']:>7.3f} "
            f"{user['goodput_tok_s']:>9.2f}"
        )
    print(
        f"goodput {plan.goodput_tok_s:.2f} tok/s, round {plan.round_time_s * 1e3:.1f} ms, "
        f"solved in {solve_s * 1e3:.2f} ms"
    )
    return 0
