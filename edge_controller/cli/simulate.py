"""``edge-controller simulate SCENARIO --policy P --seconds T [--seed S] [--json]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from edge_controller.cli.plan import POLICY_NAMES, add_scheduler_arguments
from edge_controller.config import ACCEPTANCE_MODELS, CONFIDENCE_POLICY

BEST_FIXED = "best-fixed-L"  # edge_controller.simulator.runs (not imported: --help stays fast)
ONLINE_POLICY_NAMES = ("online", "online-naive", "online-discounted", "online-contextual")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="run a policy on a scenario in the discrete-event simulator, against the oracle",
        description="Simulate T seconds of synchronous rounds of a scenario (drift included) "
        "with the live controller's draft control running POLICY on what it measures, and "
        "the oracle (who knows the true parameters at every moment and re-solves) on the "
        f"same scenario. {BEST_FIXED}: fixed-L with the L best on the scenario's first "
        "phase. --scheduler continuous|proactive: each device cycles on its own and the "
        "verifier batches what is in; POLICY's plan for that serving is solved once on the "
        "first phase's truth and held, the oracle re-solves at every change. "
        f"--replay-drafts: devices replay the recorded real drafts (models/traces) nearest "
        f"their acceptance, with the drafts' confidences ({CONFIDENCE_POLICY} needs them). "
        "docs/simulator.md.",
    )
    parser.add_argument("scenario", help="scenario TOML file (see configs/scenarios/)")
    parser.add_argument("--policy", choices=(*POLICY_NAMES, *ONLINE_POLICY_NAMES,
                                             CONFIDENCE_POLICY, BEST_FIXED),
                        default="heterogeneous")
    parser.add_argument("--seconds", type=float, default=60.0, metavar="T",
                        help="simulated seconds (default 60)")
    parser.add_argument("--seed", type=_seed, default=0, help="acceptance draws (default 0)")
    parser.add_argument("--acceptance", choices=ACCEPTANCE_MODELS, default="geometric",
                        help="the acceptance model the controller plans with (the truth is "
                        "the scenario's)")
    parser.add_argument("--warmup", type=float, default=0.0, metavar="S",
                        help="also score the run from S simulated seconds on")
    parser.add_argument("--replay-drafts", action="store_true",
                        help="acceptance from the recorded real drafts, not the scenario's")
    add_scheduler_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edge_controller.control.scenario import ScenarioError, load_scenario
    from edge_controller.simulator import simulate_scenario
    from models.traces import default_traces

    if not args.verbose:  # a re-solve a simulated second is not news here
        logging.getLogger("edge_controller.draft_control").setLevel(logging.WARNING)
    # Progress on stderr when it is a terminal: the policy's run, then the oracle's.
    bar = tqdm(total=2 * args.seconds, unit="sim s", disable=None, leave=False,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} simulated s")

    def progress(run: str, now: float) -> None:
        done = now + (args.seconds if run == "oracle" else 0.0)
        if done - bar.n >= 1.0:
            bar.update(done - bar.n)

    try:
        scenario = load_scenario(args.scenario)
        traces = default_traces() if args.replay_drafts else None
        report = simulate_scenario(scenario, args.policy, args.seconds, args.seed,
                                   args.acceptance, progress, args.scheduler,
                                   args.predraft_len, traces, args.warmup)
    except (ScenarioError, ValueError) as err:
        print(f"edge-controller simulate: {err}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ratio = report["ratio_to_oracle"]
    rounds = "rounds" if args.scheduler == "sync" else "forwards"
    print(f"scenario {report['scenario']}: policy {args.policy}, {args.scheduler}, "
          f"{args.seconds:g} simulated s, {report['rounds']} {rounds}, verifier busy "
          f"{report['verifier_busy']:.0%}")
    print(f"{'user':<24} {'tok/s':>8} {'oracle':>8} {'mean L':>7}")
    for user in report["users"]:
        print(f"{user['name']:<24} {user['goodput_tok_s']:>8.2f} "
              f"{user['oracle_goodput_tok_s']:>8.2f} {user['mean_draft_len']:>7.2f}")
    print(f"goodput {report['goodput_tok_s']:.2f} tok/s, oracle "
          f"{report['oracle_goodput_tok_s']:.2f} tok/s, ratio "
          f"{'n/a' if ratio is None else f'{ratio:.3f}'}")
    if args.warmup > 0:
        after = report["ratio_after_warmup"]
        print(f"after the {args.warmup:g} s warm-up: ratio "
              f"{'n/a' if after is None else f'{after:.3f}'}")
    print(f"tokens per {rounds[:-1]} {report['tokens_per_round']:.2f}; draft tokens "
          f"{report['draft_tokens']:.0f}, wasted (rejected) {report['wasted_draft_tokens']:.0f}")
    if "replayed_drafts" in report:
        print("replayed drafts: " + ", ".join(f"{user} {draft}" for user, draft
                                              in report["replayed_drafts"].items()))
    if len(report["phases"]) > 1:
        for phase in report["phases"]:
            r = phase["ratio_to_oracle"]
            print(f"  {phase['start_s']:>7.1f}-{phase['end_s']:<7.1f} s: "
                  f"{phase['goodput_tok_s']:.2f} tok/s, ratio "
                  f"{'n/a' if r is None else f'{r:.3f}'}")
    return 0
