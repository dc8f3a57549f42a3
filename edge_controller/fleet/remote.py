"""One SSH connection to a board (asyncssh): commands, files, host keys checked.

Host keys are checked strictly against the inventory's known_hosts file; with
``accept-new`` a board that file does not know yet is trusted on first use and its key
written there (said loudly), while a board whose key changed is refused either way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from edge_controller.fleet.inventory import Board

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S, KEEPALIVE_MISSES = 15.0, 4  # a board silent for a minute is gone
COPY_TIMEOUT_S = 1800.0  # one file copy (a draft over slow Wi-Fi)
MAX_OUTPUT_BYTES = 1 << 20  # of one command's stdout or stderr: more is a hostile board
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
                   "known_hosts": None if accept_new else str(known_hosts),
                   "keepalive_interval": KEEPALIVE_S, "keepalive_count_max": KEEPALIVE_MISSES}
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
            result = await asyncio.wait_for(self._run(command), timeout_s)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            raise BoardError(f"{what or command[:60]}: {exc or type(exc).__name__}") from None
        if check and result.status != 0:
            said = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise BoardError(f"{what or command[:60]} failed (exit {result.status}): "
                             f"{' | '.join(said)}")
        return result

    async def _run(self, command: str) -> Result:
        """Run ``command``; at most MAX_OUTPUT_BYTES of each stream are taken."""
        async with self.connection.create_process(command, encoding="utf-8",
                                                  errors="replace") as process:
            out, err = await asyncio.gather(_capped(process.stdout), _capped(process.stderr))
            if out is None or err is None:
                process.terminate()
                raise BoardError(f"more than {MAX_OUTPUT_BYTES} bytes of output from "
                                 f"{command[:60]!r}")
            await process.wait()
            status = process.exit_status
        return Result(status if status is not None else -1, out, err)

    async def put(self, files: list[tuple[Path, str]]) -> None:
        """Copy (local, remote path) pairs, over one SFTP session; each file appears whole
        or not at all (copied beside, then renamed), so a broken copy is never taken for
        a good one."""
        async def put(sftp) -> None:
            for local, remote in files:
                await sftp.put(str(local), remote + ".part")
                await sftp.posix_rename(remote + ".part", remote)
        if files:
            await self._sftp(put, "copying files to the board")

    async def get(self, remote: str, local: Path) -> None:
        await self._sftp(lambda sftp: sftp.get(remote, str(local)), f"fetching {remote}")

    async def write(self, remote: str, text: str, mode: int = 0o644) -> None:
        """Write a file whole or not at all (as :meth:`put`), with ``mode``."""
        async def write(sftp) -> None:
            async with sftp.open(remote + ".part", "w") as f:
                await f.write(text)
            await sftp.chmod(remote + ".part", mode)
            await sftp.posix_rename(remote + ".part", remote)
        await self._sftp(write, f"writing {remote} on the board")

    async def _sftp(self, work, what: str) -> None:
        try:
            async with self.connection.start_sftp_client() as sftp:
                await asyncio.wait_for(work(sftp), COPY_TIMEOUT_S)
        except (TimeoutError, asyncssh.Error, OSError) as exc:
            raise BoardError(f"{what}: {exc or type(exc).__name__}") from None

    async def read(self, remote: str) -> str | None:
        """A file's text (its first MAX_OUTPUT_BYTES), or None if it does not exist."""
        result = await self.run(f"head -c {MAX_OUTPUT_BYTES} {shlex.quote(remote)} "
                                "2>/dev/null", check=False)
        return result.stdout if result.status == 0 else None

    def close(self) -> None:
        self.connection.close()


async def _capped(stream) -> str | None:
    """A stream's text up to MAX_OUTPUT_BYTES; None beyond."""
    chunks, size = [], 0
    while chunk := await stream.read(65536):
        size += len(chunk)
        if size > MAX_OUTPUT_BYTES:
            return None
        chunks.append(chunk)
    return "".join(chunks)


def _known(board: Board, known_hosts: Path) -> bool:
    """The known_hosts file has a key for this board (hashed entries included)."""
    if not known_hosts.is_file():
        return False
    try:
        address = str(ipaddress.ip_address(board.host.strip("[]")))
    except ValueError:
        address = ""  # a host name: matched by name
    matched = asyncssh.match_known_hosts(str(known_hosts), board.host, address, board.port)
    return bool(matched[0] or matched[1] or matched[2])  # trusted, CA and revoked keys
