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
from collections.abc import Iterator, Sequence
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

    def command(self, endpoint: str) -> list[str]:
        return [str(BIN / "device-agent"), "generate", "--controller", endpoint,
                "--device-id", self.device_id, "--draft", str(self.draft),
                "--prompt", self.prompt, "--max-new-tokens", str(self.max_new_tokens),
                "--json", *self.extra]


class AgentFailed(RuntimeError):
    pass


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@contextmanager
def controller_process(
    log_path: Path, *args: str, endpoint: str | None = None, ready_timeout_s: float = 300.0
) -> Iterator[str]:
    """Run ``edge-controller start`` until the block ends (then Ctrl-C it); yield its endpoint."""
    endpoint = endpoint or free_endpoint()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "edge-controller"), "start", "--bind", endpoint, *args],
            stdout=log, stderr=subprocess.STDOUT,
        )
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
    endpoint: str, specs: Sequence[AgentSpec], timeout_s: float = 900.0
) -> list[dict]:
    """Run the agents at the same time; return their JSON results in order."""
    procs = [subprocess.Popen(spec.command(endpoint), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for spec in specs]
    results = []
    try:
        for spec, proc in zip(specs, procs, strict=True):
            out, err = proc.communicate(timeout=timeout_s)
            if proc.returncode != 0:
                raise AgentFailed(f"{spec.device_id}: device agent exited {proc.returncode}: "
                                  f"{err.strip()}")
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results
