"""``edge-controller keys``: the controller's CURVE keypair and its allowlist of devices.

    edge-controller keys init --dir DIR           controller keypair; prints its public key
    edge-controller keys add NAME PUBKEY --dir DIR
    edge-controller keys revoke NAME --dir DIR
    edge-controller keys list --dir DIR

A running controller re-reads the allowlist when it changes: a revoked device's session ends
within 2 s (docs/security.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="CURVE keys: the controller's keypair, the device allowlist",
                       description=__doc__.split("\n\n")[0])
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="make the controller's keypair; print its public key")
    init.add_argument("--force", action="store_true",
                      help="replace an existing keypair (rotation; the old one is kept as .old)")
    add = actions.add_parser("add", help="list a device's public key under NAME")
    add.add_argument("name", metavar="NAME", help="the device's name on this controller")
    add.add_argument("public_key", metavar="PUBKEY",
                     help="its public key as `device-agent keys init` printed it (Z85), or the "
                     "path of its device.key file")
    revoke = actions.add_parser("revoke", help="take NAME off the allowlist")
    revoke.add_argument("name", metavar="NAME")
    show = actions.add_parser("list", help="the controller's public key and every listed device")
    show.add_argument("--json", action="store_true")
    for action in (init, add, revoke, show):
        action.add_argument("--dir", required=True, type=Path, metavar="DIR",
                            help="the controller's keys directory")


def run(args: argparse.Namespace) -> int:
    from edge_controller import keys as K

    try:
        if args.action == "init":
            keypair = K.init_keypair(args.dir, K.CONTROLLER, force=args.force)
            print(keypair.public_text)
            print(f"controller keypair in {args.dir}; give devices the public key above "
                  "(device-agent generate --controller-key KEY)", file=sys.stderr)
        elif args.action == "add":
            path = K.list_device(args.dir, args.name, args.public_key)
            print(f"listed {args.name} ({path})", file=sys.stderr)
        elif args.action == "revoke":
            K.revoke_device(args.dir, args.name)
            print(f"revoked {args.name}: a running controller ends its session within 2 s",
                  file=sys.stderr)
        else:
            return _list(K, args.dir, args.json)
    except K.KeyFileError as exc:
        print(f"edge-controller: {exc}", file=sys.stderr)
        return 1
    return 0


def _list(K, directory: Path, as_json: bool) -> int:
    controller = K.load_own_keypair(directory, K.CONTROLLER).public_text
    allowlist = K.Allowlist(directory)
    allowlist.reload()
    devices = sorted((name, key.decode("ascii")) for key, name in allowlist.names.items())
    if as_json:
        print(json.dumps({"controller": controller, "devices": dict(devices)}))
        return 0
    print(f"controller  {controller}")
    for name, key in devices:
        print(f"{name:<11} {key}")
    if not devices:
        print("(no devices listed: `edge-controller keys add NAME PUBKEY --dir DIR`)")
    return 0
