"""The fleet file: ``[defaults]``, ``[controller]`` and one ``[[board]]`` table per board.

See configs/fleet.example.toml. A board's keys are the defaults' unless it sets its own;
the controller's public key and keys directory come from the controller's own config
(``[controller] config``) or its keys directory (``[controller] keys_dir``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_controller.config import ConfigError, checked_table, read_toml
from edge_controller.protocol import DEVICE_NAME

SERVICES = ("user", "system", "supervisor")  # how the agent's unit is run on the board
SAFE_PATH = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._/-]{0,200}")  # no spaces, quotes, %, $
USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
HTTP_BIND = re.compile(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):\d{1,5}")
KNOWN_HOSTS_POLICIES = ("strict", "accept-new")


@dataclass(frozen=True)
class Board:
    name: str
    host: str
    port: int = 22
    user: str = ""
    ssh_key: str = ""  # private key file; "" = the SSH agent's or the user's default keys
    known_hosts: str = "~/.ssh/known_hosts"  # checked strictly unless known_hosts_policy
    known_hosts_policy: str = "strict"  # or "accept-new": trust a board's first key, loudly
    draft: str = "q4_0"  # configs/models.toml name, a GGUF file or ONNX directory on the edge
    controller: str = ""  # the controller's endpoint as the board reaches it
    http: str = "127.0.0.1:8080"  # the board's API bind (serve --http)
    python: str = "python3"  # the board's interpreter for the venv
    install_dir: str = "multispin-agent"  # relative to the board user's home
    service: str = "user"  # user (systemd --user, linger), system (sudo), supervisor
    threads: int = 0  # llama.cpp threads; 0 = the board's CPU count
    llama_cuda: str = "auto"  # auto (CUDA build on a Jetson), off (the CPU wheel)

    def check(self) -> Board:
        problems = [
            (not DEVICE_NAME.fullmatch(self.name), f"board name {self.name!r} is not a valid "
             "device name (letters, digits, . _ -; at most 64)"),
            (not self.host, f"board {self.name}: host is required"),
            (not 0 < self.port < 65536, f"board {self.name}: port must be in 1..65535"),
            (not self.controller.startswith("tcp://"),
             f"board {self.name}: controller must be tcp://HOST:PORT as the board reaches it"),
            (self.service not in SERVICES, f"board {self.name}: service must be one of "
             f"{', '.join(SERVICES)}"),
            (self.known_hosts_policy not in KNOWN_HOSTS_POLICIES,
             f"board {self.name}: known_hosts_policy must be strict or accept-new"),
            (self.llama_cuda not in ("auto", "off"), f"board {self.name}: llama_cuda must be "
             "auto or off"),
            (self.threads < 0, f"board {self.name}: threads must be >= 0"),
            (not SAFE_PATH.fullmatch(self.install_dir) or ".." in Path(self.install_dir).parts,
             f"board {self.name}: install_dir is relative to the user's home: letters, "
             "digits, . _ - and /, no .."),
            (bool(self.user) and not USER.fullmatch(self.user),
             f"board {self.name}: user {self.user!r} is not a user name"),
            (not HTTP_BIND.fullmatch(self.http), f"board {self.name}: http must be HOST:PORT"),
            (not SAFE_PATH.fullmatch(self.python.lstrip("/")),
             f"board {self.name}: python must be a command or path without spaces"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)
        return self


@dataclass(frozen=True)
class Fleet:
    boards: tuple[Board, ...]
    controller_keys_dir: Path  # where the allowlist is (edge-controller keys)
    controller_key: str  # the controller's public key, Z85

    def select(self, names: list[str] | None) -> list[Board]:
        if not names:
            return list(self.boards)
        known = {b.name: b for b in self.boards}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"no board named {', '.join(unknown)} in the fleet file "
                              f"(boards: {', '.join(known)})")
        return [known[n] for n in names]


def load_fleet(path: str | Path) -> Fleet:
    raw = read_toml(path, "fleet file")
    unknown = set(raw) - {"defaults", "controller", "board"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))} (known: "
                          "defaults, controller, board)")
    fields = {f.name: f.default for f in dataclasses.fields(Board)}
    fields["name"] = fields["host"] = dataclasses.MISSING
    defaults = checked_table({k: v for k, v in fields.items()
                              if k not in ("name", "host")}, raw.get("defaults", {}),
                             "defaults")
    tables = raw.get("board", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path}: no [[board]] tables")
    boards = []
    for i, table in enumerate(tables):
        values = {**defaults, **checked_table(fields, table, f"board[{i}]")}
        missing = [k for k in ("name", "host") if k not in values]
        if missing:
            raise ConfigError(f"board[{i}]: {' and '.join(missing)} required")
        boards.append(Board(**values).check())
    names = [b.name for b in boards]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: board names must be unique")
    keys_dir, key = _controller_keys(raw.get("controller", {}), Path(path).parent)
    return Fleet(tuple(boards), keys_dir, key)


def _controller_keys(table: Any, base: Path) -> tuple[Path, str]:
    """The controller's keys directory and public key, from its config or its keys dir."""
    from edge_controller.config import load_config
    from edge_controller.keys import CONTROLLER, KeyFileError, public_key

    table = checked_table({"config": "", "keys_dir": ""}, table, "controller")
    if table.get("config"):
        keys_dir = load_config(base / Path(table["config"]).expanduser()).security.keys_dir
        if not keys_dir:
            raise ConfigError(f"controller.config {table['config']}: it sets no "
                              "security.keys_dir; give [controller] keys_dir instead")
    elif table.get("keys_dir"):
        keys_dir = table["keys_dir"]
    else:
        raise ConfigError("[controller] needs config (the controller's TOML) or keys_dir")
    directory = base / Path(keys_dir).expanduser()
    try:
        return directory, public_key(directory, CONTROLLER)
    except KeyFileError as exc:
        raise ConfigError(f"the controller's keys: {exc}") from None
