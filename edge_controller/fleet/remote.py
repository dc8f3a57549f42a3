"""One SSH connection to a board (asyncssh): commands, files, host keys checked.

Host keys are checked strictly against the inventory's known_hosts file; with
``accept-new`` a board that file does not know yet is trusted on first use and its key
written there (said loudly), while a board whose key changed is refused either way.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from edge_controller.fleet.inventory import Board

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")  # a POSIX user name, as useradd takes


class BoardError(RuntimeError):
    """A step on one board failed; str() says which and why (the others go on)."""


@dataclass
class Result:
    status: int
    stdout: str
    stderr: str


def _known_hosts_entry(board: Board) -> str:
    return board.host if board.port == 22 else f"[{board.host}]:{board.port}"


class Remote:
    def __init__(self, board: Board, connection: asyncssh.SSHClientConnection):
        self.board = board
        self.connection = connection
        self.home = ""  # the board user's home directory
        self.user = ""  # the user we log in as

    @classmethod
    async def connect(cls, board: Board) -> Remote:
        known_hosts = Path(board.known_hosts).expanduser()
        if board.known_hosts_policy == "strict" and not known_hosts.is_file():
            raise BoardError(f"known_hosts file {known_hosts} does not exist: add the board's "
                             "key (ssh-keyscan), or deploy once with --accept-new")
        accept_new = board.known_hosts_policy == "accept-new" and not _known(board, known_hosts)
        options = {"port": board.port, "connect_timeout": CONNECT_TIMEOUT_S,
                   "known_hosts": None if accept_new else str(known_hosts)}
        if board.user:
            options["username"] = board.user
        if board.ssh_key:
            options["client_keys"] = [str(Path(board.ssh_key).expanduser())]
        try:
            connection = await asyncssh.connect(board.host, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise BoardError(f"host key of {board.host}:{board.port} not verified against "
                             f"{known_hosts} ({exc}): if the board was reinstalled, remove its "
                             "old line there (ssh-keygen -R); a new board: --accept-new, or "
                             "add its key (ssh-keyscan)") from None
        except asyncssh.PermissionDenied:
            raise BoardError(f"{board.user or 'the user'}@{board.host} refused our SSH key "
                             f"({board.ssh_key or 'default keys'})") from None
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            raise BoardError(f"cannot reach {board.host}:{board.port}: "
                             f"{exc or type(exc).__name__}") from None
        if accept_new:
            key = connection.get_server_host_key()
            line = f"{_known_hosts_entry(board)} {key.export_public_key().decode().strip()}\n"
            known_hosts.parent.mkdir(parents=True, exist_ok=True)
            with open(known_hosts, "a") as f:
                f.write(line)
            log.warning("[%s] TRUSTED ON FIRST USE: host key %s of %s written to %s",
                        board.name, key.get_fingerprint(), board.host, known_hosts)
        remote = cls(board, connection)
        who = (await remote.run('printf "%s\\n%s" "$HOME" "$(id -un)"')).stdout.split("\n")
        if len(who) != 2 or not who[0].startswith("/") or not USER.fullmatch(who[1]):
            remote.close()
            raise BoardError(f"the board answered an odd home or user name: {who!r}")
        remote.home, remote.user = who
        return remote

    async def run(self, command: str, check: bool = True, env: dict | None = None,
                  timeout_s: float = 900.0, what: str = "") -> Result:
        """Run a shell command; with ``check`` a non-zero exit raises BoardError."""
        if env:
            command = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + command
        try:
            done = await asyncio.wait_for(self.connection.run(command, check=False), timeout_s)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            raise BoardError(f"{what or command[:60]}: {exc or type(exc).__name__}") from None
        result = Result(done.exit_status if done.exit_status is not None else -1,
                        str(done.stdout or ""), str(done.stderr or ""))
        if check and result.status != 0:
            said = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise BoardError(f"{what or command[:60]} failed (exit {result.status}): "
                             f"{' | '.join(said)}")
        return result

    async def put(self, files: list[tuple[Path, str]]) -> None:
        """Copy (local, remote path) pairs, over one SFTP session."""
        if not files:
            return
        try:
            async with self.connection.start_sftp_client() as sftp:
                for local, remote in files:
                    await sftp.put(str(local), remote)
        except (asyncssh.Error, OSError) as exc:
            raise BoardError(f"copying files to the board: {exc}") from None

    async def write(self, remote: str, text: str, mode: int = 0o644) -> None:
        try:
            async with self.connection.start_sftp_client() as sftp, \
                    sftp.open(remote, "w") as f:
                await f.write(text)
            await self.run(f"chmod {mode:o} {shlex.quote(remote)}")
        except (asyncssh.Error, OSError) as exc:
            raise BoardError(f"writing {remote} on the board: {exc}") from None

    async def read(self, remote: str) -> str | None:
        """A file's text, or None if it does not exist."""
        result = await self.run(f"cat {shlex.quote(remote)} 2>/dev/null", check=False)
        return result.stdout if result.status == 0 else None

    def close(self) -> None:
        self.connection.close()


def _known(board: Board, known_hosts: Path) -> bool:
    """The known_hosts file has a key for this board (hashed entries included)."""
    if not known_hosts.is_file():
        return False
    matched = asyncssh.match_known_hosts(str(known_hosts), board.host, board.host, board.port)
    return bool(matched[0] or matched[1] or matched[2])  # trusted, CA and revoked keys
