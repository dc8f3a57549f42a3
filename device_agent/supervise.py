"""Run a systemd unit's service without systemd: for boards (and test hosts) where systemd
is not PID 1. ``edge-controller fleet deploy`` uses it when an inventory says
``service = "supervisor"``.

It reads the unit's ``ExecStart``, ``WorkingDirectory`` and ``Environment`` (``%h`` is the
home directory), starts the command detached in its own session with its output appended
to a log file, and keeps its pid in a file beside the unit::

    python -m device_agent.supervise start|stop|restart|status|logs UNIT_FILE

``stop`` sends the unit's ``KillSignal`` (SIGTERM) and waits ``TimeoutStopSec`` before
SIGKILL, as systemd would. What it does not do: restart on failure, resource limits,
sandboxing; systemd does those on a real board.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_TIMEOUT_S = 15.0


def read_unit(path: Path) -> dict[str, list[str]]:
    """The [Service] section's keys (a key may repeat), ``%h`` expanded."""
    home = str(Path.home())
    values: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            value = value.strip().replace("%%", "\0").replace("%h", home).replace("\0", "%")
            values.setdefault(key.strip(), []).append(value)
    if "ExecStart" not in values:
        raise SystemExit(f"{path}: no ExecStart in [Service]")
    return values


def _files(unit: Path) -> tuple[Path, Path]:
    return unit.with_suffix(".pid"), unit.with_suffix(".log")


def _started(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), None if it is gone or a zombie: with
    the pid, it names one process (a pid alone may since belong to another)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def running_pid(unit: Path) -> int | None:
    """The service's pid, if the process the pid file names still runs."""
    try:
        pid_text, started = _files(unit)[0].read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if pid > 1 and _started(pid) == started else None


def start(unit: Path) -> int:
    if (pid := running_pid(unit)) is not None:
        print(f"running (pid {pid})")
        return 0
    values = read_unit(unit)
    env = dict(os.environ)
    for line in values.get("Environment", []):
        for pair in shlex.split(line):
            key, _, value = pair.partition("=")
            env[key] = value
    pid_file, log_file = _files(unit)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(shlex.split(values["ExecStart"][-1]), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=values.get("WorkingDirectory", [None])[-1], env=env,
                                start_new_session=True)
    pid_file.write_text(f"{proc.pid} {_started(proc.pid)}")
    print(f"started (pid {proc.pid}), log {log_file}")
    return 0


def stop(unit: Path) -> int:
    pid = running_pid(unit)
    if pid is None:
        print("stopped")
        return 0
    values = read_unit(unit)
    signum = getattr(signal, values.get("KillSignal", ["SIGTERM"])[-1], signal.SIGTERM)
    timeout = _seconds(values.get("TimeoutStopSec", [str(STOP_TIMEOUT_S)])[-1])
    # The service leads its own session (start_new_session): signal its whole group.
    _signal_group(pid, signum)
    for sig in (None, signal.SIGKILL):
        if sig is not None:
            _signal_group(pid, sig)
        deadline = time.monotonic() + (timeout if sig is None else 5.0)
        while running_pid(unit) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if running_pid(unit) is None:
            break
    _files(unit)[0].unlink(missing_ok=True)
    print("stopped")
    return 0


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone meanwhile
        os.killpg(pid, signum)


def _seconds(value: str) -> float:
    """A systemd time span of seconds: "15", "15s", "1.5"."""
    try:
        return float(value.rstrip("s"))
    except ValueError:
        return STOP_TIMEOUT_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_agent.supervise",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "restart", "status", "logs"))
    parser.add_argument("unit", type=Path)
    parser.add_argument("--lines", type=int, default=100, help="logs: this many last lines")
    args = parser.parse_args(argv)
    unit = args.unit.expanduser()
    if args.action == "start":
        return start(unit)
    if args.action == "stop":
        return stop(unit)
    if args.action == "restart":
        stop(unit)
        return start(unit)
    if args.action == "logs":
        log_file = _files(unit)[1]
        lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
        print("\n".join(lines[-args.lines:]))
        return 0
    pid = running_pid(unit)
    print(f"running (pid {pid})" if pid else "stopped")
    return 0 if pid else 3  # systemctl is-active's codes


if __name__ == "__main__":
    sys.exit(main())
