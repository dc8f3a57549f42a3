"""``edge-controller plan SCENARIO --policy P [--json]``: solve draft control for a scenario."""

from __future__ import annotations

import argparse
import json
import sys
import time

from edge_controller.config import SCHEDULERS
from edge_controller.protocol import MAX_DRAFT_TOKENS

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
    add_scheduler_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def add_scheduler_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="sync",
                        help="the serving the plan is for: synchronous rounds (the default), "
                        "continuous batching or proactive drafting, each with its own model "
                        "(docs/system-model.md); heterogeneous is solved for it, the other "
                        "policies' synchronous plans are scored by it")
    parser.add_argument("--predraft-len", type=_predraft_len, default=16, metavar="N",
                        help="proactive: tokens a device drafts past its upload at most "
                        "(default 16, as server.predraft_len)")


def _predraft_len(text: str) -> int:
    value = int(text)
    if not 2 <= value <= MAX_DRAFT_TOKENS:
        raise argparse.ArgumentTypeError(f"must be in 2..{MAX_DRAFT_TOKENS}, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from edge_controller.control.scenario import ScenarioError, load_scenario
    from edge_controller.control.serving import plan_for

    try:
        scenario = load_scenario(args.scenario)
        start = time.perf_counter()
        plan = plan_for(args.scheduler, args.policy, scenario.system, scenario.users,
                        args.predraft_len)
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
            "scheduler": args.scheduler,
            "goodput_tok_s": plan.goodput_tok_s,
            "round_time_s": plan.round_time_s,
            "solve_s": solve_s,
            "users": users,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"scenario {scenario.name}: policy {plan.policy}, {len(users)} users, "
          f"{args.scheduler}")
    print(f"{'user':<20} {'L':>3} {'share':>7} {'tok/s':>9}")
    for user in users:
        print(
            f"{user['name']:<20} {user['draft_len']:>3} {user['bandwidth_share']:>7.3f} "
            f"{user['goodput_tok_s']:>9.2f}"
        )
    what = "round" if args.scheduler == "sync" else "mean cycle"
    print(
        f"goodput {plan.goodput_tok_s:.2f} tok/s, {what} {plan.round_time_s * 1e3:.1f} ms, "
        f"solved in {solve_s * 1e3:.2f} ms"
    )
    return 0
