"""Launching a controller and device agents as real processes on this host.

Used by the demo, the end-to-end benchmark and the tests: one place that knows how to
start ``edge-controller start``, wait until it serves, run ``device-agent generate
--json`` processes side by side and collect their results.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass
class AgentSpec:
    """One ``device-agent generate`` run."""

    device_id: str
    draft: str  # registry name or GGUF path
    prompt: str
    max_new_tokens: int = 48
    extra: Sequence[str] = field(default_factory=tuple)  # e.g. ("--temperature", "0.8")
    requests: int = 1

    def command(self, endpoint: str) -> list[str]:
        return [str(BIN / "device-agent"), "generate", "--controller", endpoint,
                "--device-id", self.device_id, "--draft", str(self.draft),
                "--prompt", self.prompt, "--max-new-tokens", str(self.max_new_tokens),
                "--requests", str(self.requests), "--json", *self.extra]


Spawn = Callable[..., subprocess.Popen]  # (argv, **popen_kwargs) -> a started process


class AgentFailed(RuntimeError):
    pass


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@contextmanager
def controller_process(
    log_path: Path, *args: str, endpoint: str | None = None, ready_timeout_s: float = 300.0,
    spawn: Spawn = subprocess.Popen,
) -> Iterator[str]:
    """Run ``edge-controller start`` until the block ends (then Ctrl-C it); yield its endpoint.

    ``spawn`` starts the process (e.g. inside a network namespace of a trial lab)."""
    endpoint = endpoint or free_endpoint()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = spawn([str(BIN / "edge-controller"), "start", "--bind", endpoint, *args],
                     stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + ready_timeout_s
        while "serving" not in log_path.read_text():
            if proc.poll() is not None:
                raise RuntimeError(f"controller exited ({proc.returncode}); see {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"controller not serving after {ready_timeout_s:.0f} s; "
                                   f"see {log_path}")
            time.sleep(0.2)
        yield endpoint
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_agents(
    endpoint: str | Callable[[AgentSpec], str],
    specs: Sequence[AgentSpec],
    timeout_s: float = 900.0,
    spawn: Callable[[AgentSpec], Spawn] = lambda spec: subprocess.Popen,
) -> list[list[dict]]:
    """Run the agents at the same time; return each one's JSON results (one per request).

    ``endpoint`` may depend on the agent (in a trial lab each device dials its own link),
    and so may ``spawn`` (the agent's namespace and CPUs)."""
    procs = [
        spawn(spec)(spec.command(endpoint(spec) if callable(endpoint) else endpoint),
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
