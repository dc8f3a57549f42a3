"""Deploy, status, logs and uninstall for a fleet of boards, boards in parallel.

Per board, ``deploy`` runs these steps; each is skipped when the board already has what it
would make (idempotent), and ``dry_run`` only says what would change:

1. connect (host key checked) and probe (docs/fleet.md);
2. the wheelhouse for its platform (edge side, once per platform), pushed where missing;
   a venv made with the board's Python and ``pip install --no-index --find-links``;
3. its keypair made on the board (``device-agent keys init``); only the public key comes
   back and is listed on the controller under the board's name;
4. the draft model (skipped when its sha256 matches; an ONNX draft is a directory, synced
   file by file, and its board's wheelhouse holds ONNX Runtime), the agent config, the
   unit;
5. the service (re)started where anything it runs changed; wait until the board's
   ``/health`` says registered; ``device-agent bench`` on the board.

What a board has is recorded in its ``state.json``; a board whose record matches and
whose service runs and is registered is "unchanged".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_controller.fleet.inventory import Board, Fleet
from edge_controller.fleet.probe import BoardFacts, parse_probe, probe_script
from edge_controller.fleet.remote import BoardError, Remote
from edge_controller.fleet.wheelhouse import (
    PROJECT,
    Wheelhouse,
    assemble,
    check_built,
    keep_built,
    kept_wheels,
    llama_build_env,
    planned,
    platform_of,
    project_wheel,
    wheelhouse_key,
)

log = logging.getLogger(__name__)

UNIT = "device-agent.service"
REGISTER_TIMEOUT_S = 120.0
BOARD_TIMEOUT_S = 7200.0  # one board's whole deploy (a CUDA build on a Jetson included)
BENCH_TOKENS = 32
MIN_DISK_MB = 1024


@dataclass
class BoardReport:
    board: str
    status: str = "failed"  # deployed | unchanged | would change | failed | ...
    why: str = ""
    changes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    draft: str = ""
    draft_tok_s: float | None = None
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)


class Paths:
    """Where things live on a board: all under ``~/install_dir``."""

    def __init__(self, home: str, install_dir: str):
        self.root = f"{home}/{install_dir}"
        self.venv = f"{self.root}/.venv"
        self.bin = f"{self.venv}/bin"
        self.wheels = f"{self.root}/wheels"
        self.keys = f"{self.root}/keys"
        self.models = f"{self.root}/models"
        self.config = f"{self.root}/agent.toml"
        self.unit = f"{self.root}/{UNIT}"
        self.state = f"{self.root}/state.json"


class Deployer:
    def __init__(self, fleet: Fleet, cache: Path, *, dry_run: bool = False, jobs: int = 4,
                 accept_new: bool = False, progress=print,
                 board_timeout_s: float = BOARD_TIMEOUT_S):
        self.fleet = fleet
        self.cache = cache
        self.dry_run = dry_run
        self.accept_new = accept_new
        self.progress = progress
        self.board_timeout_s = board_timeout_s
        self._jobs = asyncio.Semaphore(max(1, jobs))
        self._project: asyncio.Future | None = None  # the project's wheel, built once
        self._wheelhouses: dict[str, asyncio.Future] = {}  # per platform, built once
        self._builds: dict[str, asyncio.Lock] = {}  # one llama build per platform at a time

    def say(self, board: Board, text: str) -> None:
        self.progress(f"[{board.name}] {printable(text)}")

    # ---- deploy ----------------------------------------------------------------------
    async def deploy(self, boards: list[Board]) -> list[BoardReport]:
        return list(await asyncio.gather(*(self._guarded(self._deploy_one, b) for b in boards)))

    async def _guarded(self, step, board: Board) -> BoardReport:
        """One board's work; whatever fails there is its report, never the others'."""
        report = BoardReport(board.name, draft=board.draft)
        async with self._jobs:
            started = time.monotonic()
            try:
                await asyncio.wait_for(step(board, report), self.board_timeout_s)
            except TimeoutError:
                report.status = "failed"
                report.why = f"not done after {self.board_timeout_s:.0f} s (--board-timeout)"
            except BoardError as exc:
                report.status, report.why = "failed", printable(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug on one board must not stop all
                log.exception("[%s]", board.name)
                report.status, report.why = "failed", f"{type(exc).__name__}: {exc}"
        report.seconds = time.monotonic() - started
        self.say(board, f"{report.status}{': ' + report.why if report.why else ''}")
        return report

    async def _connect(self, board: Board) -> Remote:
        if self.accept_new and board.known_hosts_policy == "strict":
            board = _with(board, known_hosts_policy="accept-new")
        if self.dry_run and board.known_hosts_policy == "accept-new":
            self.say(board, "dry run: a first-seen host key would be trusted; checking "
                     "strictly instead")
            board = _with(board, known_hosts_policy="strict")
        self.say(board, f"connecting to {board.user + '@' if board.user else ''}{board.host}")
        return await Remote.connect(board)

    async def _deploy_one(self, board: Board, report: BoardReport) -> None:
        remote = await self._connect(board)
        try:
            await self._deploy_on(remote, board, report)
        finally:
            remote.close()

    async def _deploy_on(self, remote: Remote, board: Board, report: BoardReport) -> None:
        facts = await self._probe(remote, board, report)
        paths = Paths(remote.home, board.install_dir)
        cuda = board.llama_cuda == "auto"
        draft_path, draft_sha = _draft(board.draft)
        wheelhouse = await self._wheelhouse(facts, cuda, onnx=draft_path.is_dir())
        threads = board.threads or facts.cpus
        config = agent_config(board, paths, self.fleet.controller_key, draft_path.name,
                              threads=threads)
        unit = agent_unit(board, paths, remote.user)
        old = _json(await remote.read(paths.state))
        wanted = {"wheelhouse": wheelhouse.digest, "draft": draft_sha,
                  "config": _sha(config), "unit": _sha(unit), "python": facts.python}
        changes = [key for key, value in wanted.items() if old.get(key) != value]
        public = await self._public_key(remote, paths)
        listed = _listed_key(self.fleet.controller_keys_dir, board.name)
        if public is None or listed != public:
            changes.append("keys")
        running = await self._service(remote, board, paths, "status") if not changes else False
        if not changes and running:
            registered = await self._registered(remote, board, paths, timeout_s=10)
            if registered:
                report.status = "unchanged"
                report.versions = _version_map(old.get("versions"))
                report.draft_tok_s = _rate(old.get("draft_tok_s"))
                return
            changes.append("service (not registered)")
        elif not changes:
            changes.append("service (not running)")
        report.changes = changes
        if self.dry_run:
            report.status = "would change"
            report.why = ", ".join(changes)
            if wheelhouse.llama_source:
                env = llama_build_env(facts) if cuda else {}
                report.why += f"; would build llama-cpp-python on the board with {env}"
            return
        await self._install(remote, board, paths, facts, wheelhouse, cuda,
                            new_python="python" in changes)
        public = await self._keys(remote, board, paths, public)
        await self._copy_draft(remote, board, paths, draft_path, draft_sha)
        await remote.run(f"mkdir -p {shlex.quote(paths.root)}")
        await remote.write(paths.config, config, 0o600)
        await remote.write(paths.unit, unit)
        await self._service(remote, board, paths, "restart")
        self.say(board, "waiting for the agent to register with the controller")
        if not await self._registered(remote, board, paths, REGISTER_TIMEOUT_S):
            logs = await self._logs(remote, board, paths, 5)
            raise BoardError(f"the agent did not register within {REGISTER_TIMEOUT_S:.0f} s; "
                             f"its log ends: {' | '.join(logs.strip().splitlines()[-3:])}")
        report.draft_tok_s = await self._bench(remote, board, paths, draft_path.name, threads)
        report.versions = await self._versions(remote, paths)
        state = {**wanted, "versions": report.versions, "draft_tok_s": report.draft_tok_s,
                 "public_key": public, "deployed_at": time.time()}
        await remote.write(paths.state, json.dumps(state, indent=1))
        report.status = "deployed"

    async def _probe(self, remote: Remote, board: Board, report: BoardReport) -> BoardFacts:
        out = await remote.run(probe_script(board.python), what="probe")
        facts = parse_probe(out.stdout)
        report.facts = facts.to_dict()
        jetson = f", {facts.jetpack} (L4T {facts.l4t}, sm_{facts.gpu_arch})" if facts.jetson \
            else ""
        self.say(board, f"{facts.os} {facts.arch}, Python {facts.python or 'missing'}, "
                 f"{facts.cpus} CPUs, {facts.mem_total_mb} MiB, {facts.disk_free_mb} MiB "
                 f"free{jetson}")
        if not facts.python:
            raise BoardError(f"no Python at {board.python!r} on the board (set python = ...)")
        if tuple(map(int, facts.python.split(".")[:2])) < (3, 11):
            raise BoardError(f"the board's Python is {facts.python}; the agent needs >= 3.11 "
                             "(set python = to a newer interpreter)")
        if facts.disk_free_mb < MIN_DISK_MB:
            raise BoardError(f"only {facts.disk_free_mb} MiB free in the home directory")
        return facts

    async def _wheelhouse(self, facts: BoardFacts, cuda: bool, onnx: bool) -> Wheelhouse:
        """Once per platform and run; a dry run assembles nothing and downloads nothing."""
        key = wheelhouse_key(facts, cuda, onnx)
        if key not in self._wheelhouses:
            self._wheelhouses[key] = asyncio.ensure_future(
                self._make_wheelhouse(facts, cuda, onnx))
        return await self._wheelhouses[key]

    async def _make_wheelhouse(self, facts: BoardFacts, cuda: bool, onnx: bool) -> Wheelhouse:
        if self.dry_run:
            return await asyncio.to_thread(planned, self.cache, facts, cuda, onnx)
        if self._project is None:
            self._project = asyncio.ensure_future(asyncio.to_thread(project_wheel, self.cache))
        project = await self._project
        return await asyncio.to_thread(assemble, self.cache, facts, cuda, project, onnx)

    async def _install(self, remote: Remote, board: Board, paths: Paths, facts: BoardFacts,
                       wheelhouse: Wheelhouse, cuda: bool, new_python: bool) -> None:
        """Make the board's wheels directory hold exactly the wheelhouse (by content: a
        rebuilt project wheel has the same name), then install; what changed is
        reinstalled, so a board never keeps an old wheel under a recorded new digest."""
        wheels = shlex.quote(paths.wheels)
        changed = await self._sync_files(remote, board, wheelhouse.directory, paths.wheels,
                                         "the wheelhouse")
        venv_missing = (await remote.run(f"test -x {shlex.quote(paths.bin)}/python",
                                         check=False)).status != 0
        if venv_missing or new_python:
            self.say(board, "making the venv")
            await remote.run(f"{shlex.quote(board.python)} -m venv --clear "
                             f"{shlex.quote(paths.venv)}", what="python -m venv")
        find = f"--no-index --find-links {wheels}"
        pip = (f"{shlex.quote(paths.bin)}/python -m pip -q --disable-pip-version-check "
               "--no-cache-dir")
        if wheelhouse.llama_source:
            async with self._builds.setdefault(platform_of(facts, cuda), asyncio.Lock()):
                await self._build_llama(remote, board, paths, facts, cuda, pip, find)
        self.say(board, "installing offline (pip --no-index)")
        await remote.run(f"{pip} install {find} '{PROJECT}[{wheelhouse.extras}]'",
                         what="pip install", timeout_s=1800)
        again = [f"{wheels}/{shlex.quote(p.name)}" for p in changed if p.suffix == ".whl"]
        if again and not (venv_missing or new_python):
            await remote.run(f"{pip} install {find} --force-reinstall --no-deps "
                             + " ".join(again), what="pip install (changed wheels)",
                             timeout_s=1800)

    async def _build_llama(self, remote: Remote, board: Board, paths: Paths,
                           facts: BoardFacts, cuda: bool, pip: str, find: str) -> None:
        """Build llama-cpp-python on the board (the first of its platform) and keep it;
        a board after it in the same run gets the kept wheel."""
        built = kept_wheels(self.cache, facts, cuda)
        if built:
            self.say(board, "using the llama-cpp-python wheel built on a board like it")
            await remote.put([(built[0], f"{paths.wheels}/{built[0].name}")])
            return
        env = llama_build_env(facts) if cuda else {}
        self.say(board, f"building llama-cpp-python on the board ({env or 'CPU'}): minutes")
        await remote.run(f"{pip} wheel {find} --no-deps -w {shlex.quote(paths.wheels)} "
                         "llama-cpp-python", env=env, what="building llama-cpp-python "
                         "(CUDA: is nvcc on PATH and the JetPack CUDA toolkit installed?)",
                         timeout_s=3600)
        listing = await remote.run(f"ls {shlex.quote(paths.wheels)}")
        built = [n for n in listing.stdout.split() if n.startswith("llama_cpp_python-")]
        if not built:
            raise BoardError("building llama-cpp-python left no wheel on the board")
        check_built(built[0])  # a plain name: nothing of the board's chooses an edge path
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / built[0]
            await remote.get(f"{paths.wheels}/{built[0]}", local)
            keep_built(self.cache, facts, cuda, local)

    async def _public_key(self, remote: Remote, paths: Paths) -> str | None:
        text = await remote.read(f"{paths.keys}/device.key")
        found = re.search(r'public-key = "([0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40})"', text or "")
        return found.group(1) if found else None

    async def _keys(self, remote: Remote, board: Board, paths: Paths,
                    public: str | None) -> str:
        from edge_controller.keys import (
            KeyFileError,
            list_device,
            parse_public_key,
            revoke_device,
        )

        if public is None:
            self.say(board, "making the device's keypair on the board")
            await remote.run(f"{shlex.quote(paths.bin)}/device-agent keys init --dir "
                             f"{shlex.quote(paths.keys)}", what="device-agent keys init")
            public = await self._public_key(remote, paths)
            if public is None:
                raise BoardError("device-agent keys init left no public key on the board")
        listed = _listed_key(self.fleet.controller_keys_dir, board.name)
        if listed != public:
            try:  # the board's word: key text only, never a path, never the controller's
                parse_public_key(public, files=False)
            except KeyFileError as exc:
                raise BoardError(f"the board's public key: {exc}") from None
            if listed is not None:
                log.warning("[%s] its key changed on the board: the old one is revoked",
                            board.name)
                revoke_device(self.fleet.controller_keys_dir, board.name)
            try:
                list_device(self.fleet.controller_keys_dir, board.name, public, files=False)
            except KeyFileError as exc:
                raise BoardError(f"listing the board's key: {exc}") from None
            self.say(board, f"listed on the controller as {board.name} ({public[:8]}...)")
        return public

    async def _sync_files(self, remote: Remote, board: Board, local_dir: Path,
                          remote_dir: str, what: str) -> list[Path]:
        """Make ``remote_dir`` hold exactly ``local_dir``'s files (flat, by content: only
        what differs is copied, what is not here is removed); the files copied."""
        quoted = shlex.quote(remote_dir)
        listing = await remote.run(f"mkdir -p {quoted} && cd {quoted} && "
                                   "find . -maxdepth 1 -type f -exec sha256sum {} +",
                                   what=f"listing the board's copy of {what}")
        have = {line.split()[1][2:]: line.split()[0] for line in listing.stdout.splitlines()
                if len(line.split()) == 2}
        local = {p.name: p for p in sorted(local_dir.iterdir()) if not p.name.startswith(".")}
        changed = [p for name, p in local.items() if have.get(name) != _file_sha(p)]
        stale = [name for name in have if name not in local]
        size = sum(p.stat().st_size for p in changed) >> 20
        self.say(board, f"pushing {len(changed)} of {what}'s {len(local)} files ({size} MiB)")
        await remote.put([(p, f"{remote_dir}/{p.name}") for p in changed])
        if stale:
            await remote.run(f"cd {quoted} && rm -f " + " ".join(map(shlex.quote, stale)))
        return changed

    async def _copy_draft(self, remote: Remote, board: Board, paths: Paths, draft: Path,
                          sha: str) -> None:
        target = f"{paths.models}/{draft.name}"
        if draft.is_dir():  # an ONNX model directory
            await self._sync_files(remote, board, draft, target, f"the draft {draft.name}")
            return
        out = await remote.run(f"sha256sum {shlex.quote(target)} 2>/dev/null", check=False)
        if out.stdout.split()[:1] == [sha]:
            return
        self.say(board, f"copying the draft {draft.name} ({draft.stat().st_size >> 20} MiB)")
        await remote.run(f"mkdir -p {shlex.quote(paths.models)}")
        await remote.put([(draft, target)])

    async def _service(self, remote: Remote, board: Board, paths: Paths,
                       action: str) -> bool:
        """start/restart/stop/status the agent's service; status: is it running."""
        command = service_command(board, paths, action)
        result = await remote.run(command, check=action != "status", what=f"service {action}")
        return result.status == 0

    async def _registered(self, remote: Remote, board: Board, paths: Paths,
                          timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            health = await self._health(remote, board, paths)
            if health.get("registered"):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(1.0)

    async def _health(self, remote: Remote, board: Board, paths: Paths) -> dict:
        url = f"http://{board.http}/health"
        code = ("import json, urllib.request, urllib.error\n"
                f"try: r = urllib.request.urlopen({url!r}, timeout=3)\n"
                "except urllib.error.HTTPError as e: r = e\n"
                "except OSError as e: print('{}'); raise SystemExit\n"
                "print(r.read().decode())")
        out = await remote.run(f"{shlex.quote(paths.bin)}/python -c {shlex.quote(code)}",
                               check=False)
        try:
            return json.loads(out.stdout or "{}")
        except ValueError:
            return {}

    async def _bench(self, remote: Remote, board: Board, paths: Paths, draft: str,
                     threads: int) -> float | None:
        out = await remote.run(
            f"{shlex.quote(paths.bin)}/device-agent bench --draft "
            f"{shlex.quote(paths.models + '/' + draft)} --tokens {BENCH_TOKENS} --threads "
            f"{threads} --json", check=False)
        rate = _rate(_json(out.stdout).get("draft_tokens_per_s"))
        if rate is None:
            self.say(board, f"bench failed: {out.stderr.strip()[-200:]}")
        return rate

    async def _versions(self, remote: Remote, paths: Paths) -> dict[str, str]:
        code = ("import importlib.metadata as m, json, sys\n"
                "def version(name):\n"
                "    try: return m.version(name)\n"
                "    except m.PackageNotFoundError: return None\n"
                "names = ['multispin-edge', 'llama-cpp-python', 'pyzmq', 'numpy', "
                "'onnxruntime', 'onnxruntime-genai']\n"
                "print(json.dumps({'python': sys.version.split()[0], "
                "**{n: version(n) for n in names if version(n)}}))")
        out = await remote.run(f"{shlex.quote(paths.bin)}/python -c {shlex.quote(code)}",
                               check=False)
        return _version_map(_json(out.stdout))

    async def _logs(self, remote: Remote, board: Board, paths: Paths, lines: int) -> str:
        return (await remote.run(logs_command(board, paths, lines), check=False)).stdout

    # ---- status, logs, uninstall -----------------------------------------------------
    async def status(self, boards: list[Board]) -> list[BoardReport]:
        async def one(board: Board, report: BoardReport) -> None:
            remote = await self._connect(board)
            try:
                paths = Paths(remote.home, board.install_dir)
                state = _json(await remote.read(paths.state))
                running = await self._service(remote, board, paths, "status")
                health = await self._health(remote, board, paths) if running else {}
                report.versions = _version_map(state.get("versions"))
                report.draft_tok_s = _rate(state.get("draft_tok_s"))
                report.status = ("registered" if health.get("registered") else
                                 "running, not registered" if running else
                                 "not installed" if not state else "stopped")
                report.why = printable(str(health.get("problem") or ""))
            finally:
                remote.close()
        return list(await asyncio.gather(*(self._guarded(one, b) for b in boards)))

    async def logs(self, board: Board, lines: int) -> str:
        remote = await self._connect(board)
        try:
            return printable(await self._logs(remote, board,
                                              Paths(remote.home, board.install_dir), lines))
        finally:
            remote.close()

    async def uninstall(self, boards: list[Board]) -> list[BoardReport]:
        from edge_controller.keys import KeyFileError, revoke_device

        async def one(board: Board, report: BoardReport) -> None:
            try:
                remote = await self._connect(board)
            finally:  # an unreachable board is taken off the allowlist all the same
                if not self.dry_run:
                    with contextlib.suppress(KeyFileError):
                        revoke_device(self.fleet.controller_keys_dir, board.name)
            try:
                paths = Paths(remote.home, board.install_dir)
                if self.dry_run:
                    report.status, report.why = "would remove", paths.root
                    return
                await remote.run(service_command(board, paths, "remove"), check=False)
                await remote.run(f"rm -rf {shlex.quote(paths.root)}")
            finally:
                remote.close()
            report.status = "removed"
        return list(await asyncio.gather(*(self._guarded(one, b) for b in boards)))


# ---- what goes on a board ----------------------------------------------------------------
def agent_config(board: Board, paths: Paths, controller_key: str, draft: str,
                 threads: int) -> str:
    return "\n".join([
        "# written by edge-controller fleet deploy (configs/agent.example.toml)",
        "[controller]",
        f"endpoint = {json.dumps(board.controller)}",
        f"key = {json.dumps(controller_key)}",
        f"keys_dir = {json.dumps(paths.keys)}",
        f"device_id = {json.dumps(board.name)}",
        "[draft]",
        f"model = {json.dumps(paths.models + '/' + draft)}",
        f"threads = {threads}",
        "[http]",
        f"bind = {json.dumps(board.http)}",
        "",
    ])


def agent_unit(board: Board, paths: Paths, user: str) -> str:
    """The unit the board runs (configs/device-agent*.service, with this install's paths;
    ``%`` is systemd's specifier character, doubled; the inventory allows no spaces)."""
    paths = Paths(paths.root.rsplit("/", 1)[0].replace("%", "%%"),
                  paths.root.rsplit("/", 1)[1].replace("%", "%%"))
    lines = [
        "# written by edge-controller fleet deploy",
        "[Unit]",
        "Description=multispin-edge device agent",
        *(["After=network-online.target", "Wants=network-online.target"]
          if board.service == "system" else []),
        "",
        "[Service]",
        "Type=simple",
        *([f"User={user}"] if board.service == "system" else []),
        f"WorkingDirectory={paths.root}",
        f"ExecStart={paths.bin}/device-agent serve --config {paths.config}",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=15",
        "Restart=on-failure",
        "RestartSec=2",
        f"Environment=MULTISPIN_CACHE={paths.root}/cache",
        "NoNewPrivileges=true",
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if board.service == 'system' else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def service_command(board: Board, paths: Paths, action: str) -> str:
    """The shell command that does ``action`` (start/restart/stop/status/remove) to the
    agent's service in the board's mode."""
    unit = shlex.quote(paths.unit)
    if board.service == "supervisor":
        python = f"{shlex.quote(paths.bin)}/python -m device_agent.supervise"
        verb = {"remove": "stop"}.get(action, action)
        return f"{python} {verb} {unit}" + (" >/dev/null" if action == "status" else "")
    sudo, ctl, target = ("sudo -n ", "systemctl", "/etc/systemd/system") \
        if board.service == "system" else (
            "", "XDG_RUNTIME_DIR=/run/user/$(id -u) systemctl --user",
            "$HOME/.config/systemd/user")
    name = UNIT
    if action == "status":
        return f"{sudo}{ctl} is-active --quiet {name}"
    if action == "stop":
        return f"{sudo}{ctl} stop {name}"
    if action == "remove":
        return (f"{sudo}{ctl} disable --now {name}; {sudo}rm -f {target}/{name}; "
                f"{sudo}{ctl} daemon-reload")
    # A user manager needs linger (it then runs without a login) and, over SSH, its bus.
    linger = ("loginctl enable-linger \"$(id -un)\" && "
              "export XDG_RUNTIME_DIR=/run/user/$(id -u) && ") if board.service == "user" else ""
    return (f"{linger}{sudo}mkdir -p {target} && {sudo}cp {unit} {target}/{name} && "
            f"{sudo}{ctl} daemon-reload && {sudo}{ctl} enable {name} && "
            f"{sudo}{ctl} restart {name}")


def logs_command(board: Board, paths: Paths, lines: int) -> str:
    if board.service == "supervisor":
        return (f"{shlex.quote(paths.bin)}/python -m device_agent.supervise logs "
                f"{shlex.quote(paths.unit)} --lines {lines}")
    ctl = "sudo -n journalctl" if board.service == "system" else "journalctl --user"
    return f"{ctl} -u {UNIT} -n {lines} --no-pager"


def _draft(name: str) -> tuple[Path, str]:
    """The draft's file (GGUF) or directory (ONNX, flat), and a sha256 of what it holds."""
    from device_agent.cli import resolve_draft

    try:
        path = resolve_draft(name)
    except (FileNotFoundError, KeyError, ValueError, ImportError) as exc:
        raise BoardError(f"draft {name!r}: {exc}") from None
    if path.is_file():
        return path, _file_sha(path)
    files = sorted(path.iterdir())
    if any(not p.is_file() for p in files):
        raise BoardError(f"draft {name!r}: {path} holds directories; a draft directory is flat")
    listing = "".join(f"{p.name}\0{_file_sha(p)}\n" for p in files)
    return path, hashlib.sha256(listing.encode()).hexdigest()


@functools.lru_cache(maxsize=256)  # the wheelhouse and drafts, hashed once per run
def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def printable(text: str) -> str:
    """A board's words, safe for a terminal: control characters shown as escapes."""
    return "".join(c if c.isprintable() or c == "\n" else repr(c)[1:-1] for c in text)


def _version_map(value: object) -> dict[str, str]:
    """A board's version map, with only short printable strings kept."""
    if not isinstance(value, dict):
        return {}
    return {printable(str(k))[:40]: printable(v)[:40] for k, v in value.items()
            if isinstance(v, str)}


def _rate(value: object) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    return round(float(value), 1) if ok and value < 1e9 else None


def _json(text: str | None) -> dict:
    """A board's JSON answer or file; {} for anything else (half-written, hostile)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _listed_key(keys_dir: Path, name: str) -> str | None:
    from edge_controller.keys import ALLOWLIST, KeyFileError, public_key

    try:
        return public_key(keys_dir / ALLOWLIST, name)
    except KeyFileError:
        return None


def _with(board: Board, **changes) -> Board:
    import dataclasses

    return dataclasses.replace(board, **changes)
