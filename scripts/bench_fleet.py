"""First deploy vs an unchanged second deploy, on SSH boards of this host (the fleet lab:
one sshd per network namespace, docs/fleet.md). Root only.

The edge's wheelhouse is assembled first (where the package index is reachable), then a
real controller runs in the lab's hub and ``edge-controller fleet deploy`` runs there
twice on ``--boards`` boards; the second must report every board "unchanged". Printed:
both wall times (the command's, end to end) and their ratio. Draft speeds the boards
report are this host's, not a board's.

    .venv/bin/python scripts/bench_fleet.py [--boards 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_controller.fleet.lab import FleetLab, cleanup_stale
from edge_controller.fleet.probe import parse_probe, probe_script
from edge_controller.fleet.wheelhouse import assemble, project_wheel
from edge_controller.launch import LabKeys, controller_process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boards", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cleanup_stale()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    probe = subprocess.run(["sh", "-c", probe_script("/usr/bin/python3")], capture_output=True,
                           text=True, check=True).stdout
    assemble(work / "cache", parse_probe(probe), False, project_wheel(work / "cache"))
    times, statuses = [], []
    with FleetLab(boards=args.boards) as lab, LabKeys(work / "keys") as keys, \
            controller_process(work / "controller.log", keys, "--policy", "fixed",
                               endpoint=f"tcp://{lab.hub_address}:5555",
                               spawn=lambda argv, **kw: subprocess.Popen(lab.in_hub(argv), **kw)):
        path = lab.inventory(work / "fleet.toml", keys.controller_dir)
        for run in ("first", "second"):
            print(f"{run} deploy...", file=sys.stderr)
            started = time.monotonic()
            code, reports, log = lab.fleet(work / "cache", "deploy", str(path))
            times.append(time.monotonic() - started)
            statuses.append([r["status"] for r in reports])
            if code != 0:
                print(log, file=sys.stderr)
                return 1
    result = {"boards": args.boards, "first_s": round(times[0], 1),
              "second_s": round(times[1], 1), "second_over_first": round(times[1] / times[0], 3),
              "first": statuses[0], "second": statuses[1]}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.boards} boards: first deploy {times[0]:.1f} s ({', '.join(statuses[0])}), "
              f"second {times[1]:.1f} s ({', '.join(statuses[1])}): "
              f"{result['second_over_first']:.1%} of the first")
    return 0 if set(statuses[1]) == {"unchanged"} else 1


if __name__ == "__main__":
    sys.exit(main())
