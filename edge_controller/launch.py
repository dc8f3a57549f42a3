"""Launching a controller and device agents as real processes on this host.

Used by the demo, the end-to-end benchmark, the trial lab and the tests: one place that
knows how to make their keys, start ``edge-controller start``, wait until it serves, run
``device-agent generate --json`` processes side by side and collect their results. Every
launch runs CURVE with keys made for it (:class:`LabKeys`) unless told ``insecure``.
"""

from __future__ import annotations

import functools
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edge_controller import keys as K

BIN = Path(sys.executable).parent


class LabKeys:
    """A controller's keys directory and one keys directory per device, made on first use
    and listed on the controller under the device's name (what an operator does by hand
    with ``keys init`` on each side and ``keys add``; docs/security.md).

    ``insecure=True`` makes none: every launch then runs plain TCP on loopback."""

    def __init__(self, root: Path | None = None, insecure: bool = False):
        self.insecure = insecure
        self._tmp = None
        if root is None and not insecure:
            self._tmp = tempfile.TemporaryDirectory(prefix="multispin-keys-")
            root = Path(self._tmp.name)
        self.root = root
        self.controller_key = "" if insecure else K.init_keypair(
            self.controller_dir, K.CONTROLLER).public_text
        self._devices: dict[str, Path] = {}

    @property
    def controller_dir(self) -> Path:
        return self.root / "controller"

    def device_dir(self, name: str) -> Path:
        """``name``'s keys directory; made and listed on the controller on first use."""
        if name not in self._devices:
            directory = self.root / "devices" / name
            keypair = K.init_keypair(directory, K.DEVICE)
            K.list_device(self.controller_dir, name, keypair.public_text)
            self._devices[name] = directory
        return self._devices[name]

    def controller_args(self) -> list[str]:
        return ["--insecure"] if self.insecure else ["--keys", str(self.controller_dir)]

    def config_overrides(self) -> dict[str, str | bool]:
        """``load_config`` overrides for a controller with these keys."""
        if self.insecure:
            return {"security__insecure": True}
        return {"security__keys_dir": str(self.controller_dir)}

    def agent_args(self, name: str) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        return ["--keys", str(self.device_dir(name)), f"--controller-key={self.controller_key}"]

    def client(self, name: str) -> K.CurveClient | None:
        """A ControllerLink's ``curve`` for device ``name`` (None when insecure)."""
        if self.insecure:
            return None
        return K.device_client(self.device_dir(name), self.controller_key)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LabKeys:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class AgentSpec:
    """One ``device-agent generate`` run."""

    device_id: str
    draft: str  # registry name or GGUF path
    prompt: str
    max_new_tokens: int = 48
    extra: Sequence[str] = field(default_factory=tuple)  # e.g. ("--temperature", "0.8")
    requests: int = 1

    def command(self, endpoint: str, keys: LabKeys) -> list[str]:
        return [str(BIN / "device-agent"), "generate", "--controller", endpoint,
                *keys.agent_args(self.device_id), "--device-id", self.device_id,
                "--draft", str(self.draft), "--prompt", self.prompt,
                "--max-new-tokens", str(self.max_new_tokens),
                "--requests", str(self.requests), "--json", *self.extra]


Spawn = Callable[..., subprocess.Popen]  # (argv, **popen_kwargs) -> a started process


class AgentFailed(RuntimeError):
    pass


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start_controller(
    log_path: Path, keys: LabKeys, endpoint: str, *args: str, ready_timeout_s: float = 300.0,
    spawn: Spawn = subprocess.Popen, append: bool = False,
) -> subprocess.Popen:
    """Start ``edge-controller start`` with ``keys`` on ``endpoint``; return it serving.
    ``append`` keeps what ``log_path`` holds (a restart logs after the run before it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = log_path.stat().st_size if append and log_path.exists() else 0
    with open(log_path, "a" if append else "w") as log:
        proc = spawn([str(BIN / "edge-controller"), "start", "--bind", endpoint,
                      *keys.controller_args(), *args], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + ready_timeout_s
    while "serving" not in log_path.read_text()[start:]:
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited ({proc.returncode}); see {log_path}")
        if time.monotonic() > deadline:
            stop_controller(proc)
            raise RuntimeError(f"controller not serving after {ready_timeout_s:.0f} s; "
                               f"see {log_path}")
        time.sleep(0.2)
    return proc


def stop_controller(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    """SIGTERM (it closes down gracefully), then SIGKILL after ``timeout_s``; its code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class ControllerProcess:
    """``edge-controller start`` with ``keys`` on ``endpoint`` (serving once built), which
    ``restart`` stops (as a crash, or gracefully) and starts again where it was."""

    def __init__(self, log_path: Path, keys: LabKeys, endpoint: str, *args: str,
                 ready_timeout_s: float = 300.0, spawn: Spawn = subprocess.Popen):
        self.endpoint = endpoint
        self._start = functools.partial(start_controller, log_path, keys, endpoint, *args,
                                        ready_timeout_s=ready_timeout_s, spawn=spawn)
        self.proc = self._start()

    def restart(self, crash: bool = True) -> None:
        """kill -9 (``crash``) or SIGTERM, then start again, logging after the run before."""
        if crash:
            self.proc.kill()
            self.proc.wait()
        else:
            stop_controller(self.proc)
        self.proc = self._start(append=True)

    def stop(self) -> int:
        return stop_controller(self.proc)


@contextmanager
def controller_process(
    log_path: Path, keys: LabKeys, *args: str, endpoint: str | None = None,
    ready_timeout_s: float = 300.0, spawn: Spawn = subprocess.Popen,
) -> Iterator[ControllerProcess]:
    """Run ``edge-controller start`` with ``keys`` until the block ends (then stop it).

    ``spawn`` starts the process (e.g. inside a network namespace of a trial lab)."""
    controller = ControllerProcess(log_path, keys, endpoint or free_endpoint(), *args,
                                   ready_timeout_s=ready_timeout_s, spawn=spawn)
    try:
        yield controller
    finally:
        controller.stop()


def run_agents(
    endpoint: str | Callable[[AgentSpec], str],
    specs: Sequence[AgentSpec],
    keys: LabKeys,
    timeout_s: float = 900.0,
    spawn: Callable[[AgentSpec], Spawn] = lambda spec: subprocess.Popen,
) -> list[list[dict]]:
    """Run the agents at the same time, each with its keys from ``keys``; return each one's
    JSON results (one per request).

    ``endpoint`` may depend on the agent (in a trial lab each device dials its own link),
    and so may ``spawn`` (the agent's namespace and CPUs)."""
    procs = [
        spawn(spec)(spec.command(endpoint(spec) if callable(endpoint) else endpoint, keys),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for spec in specs
    ]
    results = []
    try:
        # Drain every agent's pipes at once: one waiting on a full stderr pipe while we
        # read another would never finish.
        with ThreadPoolExecutor(len(procs)) as pool:
            outputs = list(pool.map(lambda p: p.communicate(timeout=timeout_s), procs))
        for spec, proc, (out, err) in zip(specs, procs, outputs, strict=True):
            if proc.returncode != 0:
                raise AgentFailed(f"{spec.device_id}: device agent exited {proc.returncode}: "
                                  f"{err.strip()}")
            results.append([json.loads(line) for line in out.splitlines() if line.strip()])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results
