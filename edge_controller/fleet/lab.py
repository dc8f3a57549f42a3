"""SSH boards on this host, for fleet tests and benchmarks: real ``sshd`` servers, one per
network namespace, each with its own user and home. Root only.

Layout::

    msf-<pid>-hub   bridge 10.233.0.1/24   (the controller and `fleet deploy` run here)
    msf-<pid>-b<i>  eth0   10.233.0.<10+i>/24, sshd on :22, user msf<pid>b<i>

Boards have no route beyond the bridge (no package index: an install there is offline by
construction). A board may be given a *Jetson identity fixture*: an
``etc/nv_tegra_release`` under a fixture root its sshd announces as
``MULTISPIN_PROBE_ROOT`` (the probe reads it there), and a fake ``nvcc`` first on its
PATH. These are fixtures written from the documented formats, not a board.

Teardown kills every process the lab and its boards' users started (by pid), removes the
namespaces, the users and their homes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

log = logging.getLogger(__name__)

PREFIX = "msf-"
SUBNET = "10.233.0"
SSHD = "/usr/sbin/sshd"
# A Jetson identity fixture (AGX Orin, L4T R36.3; nvcc of JetPack 6's CUDA 12.2).
FIXTURE_TEGRA_RELEASE = ("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, "
                         "EABI: aarch64, DATE: Mon Mar 25 22:41:50 UTC 2024\n")
FIXTURE_NVCC = ("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                "echo 'Cuda compilation tools, release 12.2, V12.2.140'\n")


class LabError(RuntimeError):
    pass


@dataclass
class LabBoard:
    name: str
    namespace: str
    address: str
    user: str
    home: Path
    jetson: bool = False


def require() -> None:
    """Raise LabError unless this host can run the lab (root, ip, sshd)."""
    if os.geteuid() != 0:
        raise LabError("the fleet lab needs root (network namespaces, users)")
    for tool in ("ip", "useradd", SSHD):
        if shutil.which(tool) is None and not Path(tool).exists():
            raise LabError(f"{tool} is missing (apt-get install openssh-server iproute2)")


class FleetLab:
    def __init__(self, boards: int, jetson: tuple[int, ...] = ()):
        require()
        self.tag = str(os.getpid())  # names say whose they are: cleanup_stale
        self.hub = f"{PREFIX}{self.tag}-hub"
        self.hub_address = f"{SUBNET}.1"
        self.dir = Path(tempfile.mkdtemp(prefix="multispin-fleet-"))
        self.dir.chmod(0o755)  # board users reach their homes below it
        self.client_key = self.dir / "id_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.boards = [LabBoard(f"b{i}", f"{PREFIX}{self.tag}-b{i}", f"{SUBNET}.{10 + i}",
                                f"msf{self.tag}b{i}", self.dir / f"home-b{i}", i in jetson)
                       for i in range(boards)]
        self._procs: list[subprocess.Popen] = []
        self._namespaces: list[str] = []
        self._users: list[str] = []

    def __enter__(self) -> FleetLab:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        key = asyncssh.generate_private_key("ssh-ed25519")
        key.write_private_key(str(self.client_key))
        self.client_key.chmod(0o600)
        client_public = key.export_public_key().decode()
        self._netns(self.hub)
        _ip(self.hub, "link", "add", "br0", "type", "bridge")
        _ip(self.hub, "addr", "add", f"{self.hub_address}/24", "dev", "br0")
        _ip(self.hub, "link", "set", "br0", "up")
        lines = []
        for i, board in enumerate(self.boards):
            self._netns(board.namespace)
            outer = f"mf{self.tag}h{i}"[:15]
            _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0",
                  "netns", board.namespace])
            _run(["ip", "link", "set", outer, "netns", self.hub])
            _ip(self.hub, "link", "set", outer, "master", "br0")
            _ip(self.hub, "link", "set", outer, "up")
            _ip(board.namespace, "addr", "add", f"{board.address}/24", "dev", "eth0")
            _ip(board.namespace, "link", "set", "eth0", "up")
            self._user(board, client_public)
            lines.append(self._sshd(board))
        self.known_hosts.write_text("".join(lines))
        for board in self.boards:
            self._wait_listening(board)

    def _netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        _ip(name, "link", "set", "lo", "up")

    def _user(self, board: LabBoard, client_public: str) -> None:
        _run(["useradd", "-M", "-d", str(board.home), "-s", "/bin/sh", "-p", "*", board.user])
        self._users.append(board.user)
        ssh = board.home / ".ssh"
        ssh.mkdir(parents=True)
        (ssh / "authorized_keys").write_text(client_public)
        if board.jetson:
            bin_dir = board.home / "fixture-bin"
            bin_dir.mkdir()
            (bin_dir / "nvcc").write_text(FIXTURE_NVCC)
            (bin_dir / "nvcc").chmod(0o755)
            etc = board.home / "fixture-root" / "etc"
            etc.mkdir(parents=True)
            (etc / "nv_tegra_release").write_text(FIXTURE_TEGRA_RELEASE)
        _run(["chown", "-R", f"{board.user}:{board.user}", str(board.home)])
        (ssh / "authorized_keys").chmod(0o600)

    def _sshd(self, board: LabBoard) -> str:
        """Start the board's sshd; its known_hosts line."""
        config_dir = self.dir / f"sshd-{board.name}"
        config_dir.mkdir()
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        host_key_path = config_dir / "ssh_host_ed25519_key"
        host_key.write_private_key(str(host_key_path))
        host_key_path.chmod(0o600)
        path = "/usr/local/bin:/usr/bin:/bin"
        env = ""
        if board.jetson:
            path = f"{board.home}/fixture-bin:{path}"
            env = f" MULTISPIN_PROBE_ROOT={board.home}/fixture-root"
        config = config_dir / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {board.address}", "Port 22", f"HostKey {host_key_path}",
            f"PidFile {config_dir}/sshd.pid", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
            "AuthorizedKeysFile .ssh/authorized_keys", f"AllowUsers {board.user}",
            "StrictModes no", f"SetEnv PATH={path}{env}", "PermitRootLogin no",
            "Subsystem sftp internal-sftp", "",
        ]))
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        proc = subprocess.Popen(["ip", "netns", "exec", board.namespace, SSHD, "-D", "-e",
                                 "-f", str(config)], stdout=subprocess.DEVNULL,
                                stderr=open(config_dir / "sshd.log", "wb"))  # noqa: SIM115
        self._procs.append(proc)
        return f"{board.address} {host_key.export_public_key().decode().strip()}\n"

    def _wait_listening(self, board: LabBoard, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = _ip_out(board.namespace, ["ss", "-ltnH"])
            if f"{board.address}:22" in out:
                return
            time.sleep(0.05)
        raise LabError(f"sshd of {board.name} is not listening after {timeout_s:g} s: "
                       f"{(self.dir / f'sshd-{board.name}' / 'sshd.log').read_text()[-500:]}")

    def in_hub(self, argv: list[str]) -> list[str]:
        """``argv`` run in the hub namespace (the controller, fleet deploy)."""
        return ["ip", "netns", "exec", self.hub, *argv]

    def in_board(self, board: LabBoard, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", board.namespace, *argv]

    def inventory(self, path: Path, controller_keys: Path, boards: list[int] | None = None,
                  overrides: dict[int, dict] | None = None) -> Path:
        """A fleet file for the lab's boards (``boards``: indices; ``overrides``: a board's
        own keys): supervisor service, the lab's SSH key and known_hosts, CPU wheel."""
        lines = ["[defaults]", f'ssh_key = "{self.client_key}"',
                 f'known_hosts = "{self.known_hosts}"', 'draft = "q4_0"',
                 f'controller = "tcp://{self.hub_address}:5555"', 'python = "/usr/bin/python3"',
                 'service = "supervisor"', "threads = 1", 'llama_cuda = "off"', "",
                 "[controller]", f'keys_dir = "{controller_keys}"', ""]
        for i in boards if boards is not None else range(len(self.boards)):
            board = self.boards[i]
            lines += ["[[board]]", f'name = "{board.name}"', f'host = "{board.address}"',
                      f'user = "{board.user}"']
            lines += [f"{k} = {json.dumps(v)}" for k, v in (overrides or {}).get(i, {}).items()]
            lines.append("")
        path.write_text("\n".join(lines))
        return path

    def fleet(self, cache: Path, *args: str,
              timeout_s: float = 600) -> tuple[int, list[dict], str]:
        """``edge-controller fleet ARGS --cache CACHE [--json]`` run in the hub: (exit code,
        one report per board, the output)."""
        argv = [str(Path(sys.executable).parent / "edge-controller"), "fleet", *args,
                "--cache", str(cache)]
        if args[0] != "logs":
            argv.append("--json")
        proc = subprocess.run(self.in_hub(argv), capture_output=True, text=True,
                              timeout=timeout_s)
        reports = [json.loads(line) for line in proc.stdout.splitlines()
                   if line.startswith("{")]
        return proc.returncode, reports, proc.stdout + proc.stderr

    def close(self) -> None:
        for user in self._users:  # what deploys started as the boards' users
            _kill_user_processes(user)
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for name in self._namespaces:
            _run(["ip", "netns", "del", name], check=False)
        for user in self._users:
            _run(["userdel", user], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self._namespaces, self._users, self._procs = [], [], []


def cleanup_stale() -> list[str]:
    """What a crashed lab left (its owner's pid is gone): the processes in its namespaces
    (sshd, agents), the namespaces, its boards' users and their processes; the namespaces'
    names."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]
    stale = [n for n in names if not _alive(int(n[len(PREFIX):].split("-")[0]))]
    for name in stale:
        for pid in _run(["ip", "netns", "pids", name], check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        _run(["ip", "netns", "del", name], check=False)
    owners = {n[len(PREFIX):].split("-")[0] for n in stale}
    for line in Path("/etc/passwd").read_text().splitlines():
        user = line.split(":", 1)[0]
        match = re.fullmatch(r"msf(\d+)b\d+", user)
        if match and match.group(1) in owners:
            _kill_user_processes(user)
            _run(["userdel", user], check=False)
    return stale


def _kill_user_processes(user: str) -> None:
    _run(["pkill", "-9", "-u", user], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip(namespace: str, *args: str) -> None:
    _run(["ip", "-n", namespace, *args])


def _ip_out(namespace: str, argv: list[str]) -> str:
    return _run(["ip", "netns", "exec", namespace, *argv], check=False).stdout


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {proc.stderr.strip()}")
    return proc
