"""``edge-controller fleet``: put agents onto boards over SSH (docs/fleet.md).

    edge-controller fleet deploy FLEET.toml [--boards a,b] [--dry-run] [--jobs N]
                                            [--accept-new] [--json]
    edge-controller fleet status FLEET.toml [--boards a,b] [--json]
    edge-controller fleet logs FLEET.toml BOARD [--lines N]
    edge-controller fleet uninstall FLEET.toml [--boards a,b] [--dry-run]

Boards are worked on in parallel; one failing board never stops the others. Exit 0 when
every selected board ended well, 1 when one failed, 2 for a bad fleet file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="deploy agents onto boards over SSH, offline",
                       description=__doc__.split("\n\n")[0],
                       epilog="exit codes: 0 every board fine; 1 a board failed; 2 bad usage")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    parsers = {
        "deploy": actions.add_parser("deploy", help="install or update the agent on boards "
                                     "(idempotent: unchanged boards are left as they are)"),
        "status": actions.add_parser("status", help="registered or not, versions, service"),
        "logs": actions.add_parser("logs", help="the agent's recent log on one board"),
        "uninstall": actions.add_parser("uninstall", help="remove service, venv and keys "
                                        "from boards, and their allowlist entries"),
    }
    for name, parser in parsers.items():
        parser.add_argument("fleet", type=Path, metavar="FLEET.toml",
                            help="the inventory (configs/fleet.example.toml)")
        parser.add_argument("--cache", type=Path, help="where the edge keeps wheelhouses "
                            "(default: the models' user cache directory)")
        if name == "logs":
            parser.add_argument("board", metavar="BOARD")
            parser.add_argument("--lines", type=int, default=100)
            continue
        parser.add_argument("--boards", help="only these boards (comma-separated names)")
        parser.add_argument("--jobs", type=int, default=4, help="boards at once (default 4)")
        parser.add_argument("--board-timeout", type=float, default=7200.0, metavar="S",
                            help="give up on a board after S seconds (default 7200: a CUDA "
                            "build on a Jetson takes a while)")
        parser.add_argument("--accept-new", action="store_true",
                            help="trust a board's host key the first time it is seen (and "
                            "write it to known_hosts); a changed key is refused regardless")
        parser.add_argument("--json", action="store_true", help="one JSON object per board")
        if name in ("deploy", "uninstall"):
            parser.add_argument("--dry-run", action="store_true",
                                help="change nothing on boards or the allowlist; say what "
                                "would change")


def run(args: argparse.Namespace) -> int:
    from edge_controller.config import ConfigError
    from edge_controller.fleet.deploy import Deployer
    from edge_controller.fleet.inventory import load_fleet
    from models.store import cache_dir

    logging.getLogger("asyncssh").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        fleet = load_fleet(args.fleet)
        names = getattr(args, "boards", None)
        boards = fleet.select([args.board] if args.action == "logs" else
                              names.split(",") if names else None)
    except ConfigError as exc:
        print(f"edge-controller fleet: {exc}", file=sys.stderr)
        return 2
    quiet = getattr(args, "json", False)
    deployer = Deployer(fleet, args.cache or cache_dir(), dry_run=getattr(args, "dry_run", False),
                        jobs=getattr(args, "jobs", 4), accept_new=getattr(args, "accept_new",
                                                                          False),
                        progress=(lambda text: print(text, file=sys.stderr)) if quiet else
                        (lambda text: print(text, flush=True)),
                        board_timeout_s=getattr(args, "board_timeout", 7200.0))
    if args.action == "logs":
        from edge_controller.fleet.remote import BoardError

        try:
            print(asyncio.run(deployer.logs(boards[0], args.lines)))
        except BoardError as exc:
            print(f"edge-controller fleet: {args.board}: {exc}", file=sys.stderr)
            return 1
        return 0
    reports = asyncio.run(getattr(deployer, args.action)(boards))
    if quiet:
        for report in reports:
            print(json.dumps(report.__dict__))
    else:
        print_table(reports)
    return 1 if any(r.status == "failed" for r in reports) else 0


def print_table(reports) -> None:
    rows = [("board", "status", "agent", "llama.cpp", "python", "draft", "draft tok/s", "s")]
    for r in reports:
        v = r.versions
        rows.append((r.board, r.status + (f": {r.why}" if r.why else ""),
                     v.get("multispin-edge", "-"), v.get("llama-cpp-python", "-"),
                     v.get("python", "-"), r.draft,
                     f"{r.draft_tok_s:.1f}" if r.draft_tok_s else "-", f"{r.seconds:.1f}"))
    widths = [min(max(len(row[i]) for row in rows), 60) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell[:60].ljust(width) for cell, width in zip(row, widths, strict=True)))
