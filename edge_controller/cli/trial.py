"""``edge-controller trial``: run a field trial in network namespaces on this host."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "trial", help="run a field trial: devices in network namespaces, each policy in turn",
        description="Create one network namespace per device with the trial file's link "
        "(delay, jitter, loss, rate cap), run the controller and real device agents, run "
        "each listed policy on the same workload, and write report.json, report.md and "
        "plots. Needs root. Every namespace and process is removed at the end, also on "
        "Ctrl-C or failure.",
    )
    p.add_argument("trial", help="trial file, e.g. configs/trials/ci-small.toml")
    p.add_argument("--out", required=True, type=Path, help="folder for the report and logs")
    p.add_argument("--policies", help="comma-separated policies (overrides the trial file)")
    p.add_argument("--schedulers", help="comma-separated schedulers, each running every "
                   "policy: sync, continuous, proactive (overrides the trial file; report entries "
                   "POLICY@SCHEDULER for all but sync)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                   help="also run server-decode and target-alone on the same workload "
                   "(default: the trial file's baselines, true unless it says otherwise)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm import tqdm

    from edge_controller.launch import AgentFailed
    from edge_controller.trial.netns import LabError
    from edge_controller.trial.report import gains, write_report
    from edge_controller.trial.runner import run_trial
    from edge_controller.trial.spec import TrialError, load_trial, validate

    try:
        spec = load_trial(args.trial)
        changes = {key: value for key, value in (
            ("policies", args.policies and tuple(args.policies.split(","))),
            ("schedulers", args.schedulers and tuple(args.schedulers.split(","))),
            ("baselines", args.baselines)) if value is not None}
        if changes:
            spec = dataclasses.replace(spec, **changes)
            validate(spec)
    except TrialError as exc:
        print(f"edge-controller: {exc}", file=sys.stderr)
        return 2
    entries = len(spec.policies) * len(spec.schedulers) + (2 if spec.baselines else 0)
    with tqdm(total=entries, desc=f"trial {spec.name}", unit="entry") as bar:
        try:
            report = run_trial(spec, args.out, on_policy=lambda _: bar.update())
        except (LabError, AgentFailed, RuntimeError) as exc:  # the lab is cleaned up by then
            print(f"edge-controller: trial failed: {exc} (logs in {args.out})", file=sys.stderr)
            return 1
    write_report(report, args.out)
    for name, p in report["policies"].items():
        predicted = p["predicted_goodput_tok_s"]
        print(f"{name:<26} measured {p['goodput_tok_s']:7.2f} tok/s"
              + (f"   predicted {predicted:7.2f} tok/s" if predicted else ""))
    g = gains(report)
    if g:
        print(f"heterogeneous vs agnostic: measured {g['measured']:+.1%}"
              + (f", predicted {g['predicted']:+.1%}" if "predicted" in g else ""))
    print(f"report: {args.out / 'report.md'}")
    differs = [f"{name}/{u['name']}: {u['lossless_problem']}"
               for name, p in report["policies"].items() for u in p["users"]
               if not u.get("lossless", True)]
    if differs:
        print(f"edge-controller: output differs from the target's: {'; '.join(differs)}",
              file=sys.stderr)
        return 1
    return 0
