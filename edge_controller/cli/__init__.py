"""``edge-controller`` command line: one module per command (start, plan, ...).

Each command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``; heavy
imports happen inside ``run`` so ``edge-controller --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("start", "keys", "plan", "simulate", "status", "trial", "fleet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="edge-controller",
        description="Edge controller of multispin-edge: verifies many devices' drafts "
        "with the target model and controls their draft lengths and uplink shares.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = {name: importlib.import_module(f"{__name__}.{name}") for name in COMMANDS}
    for module in modules.values():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
