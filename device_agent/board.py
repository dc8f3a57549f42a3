"""Jetson board telemetry: ``tegrastats`` lines and the ``nvpmodel`` power mode.

``tegrastats --interval MS`` prints one line per interval; the fields this parser knows
(NVIDIA's documented format, L4T 35/36 on Orin Nano, Orin NX and AGX Orin)::

    [MM-DD-YYYY HH:MM:SS] RAM 2448/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB)
    CPU [2%@1510,1%@1510,off,...] EMC_FREQ 0%[@2133] GR3D_FREQ 0%[@[0,0] or @1300]
    NAME@47.75C ...  RAIL 4813mW/4813mW ...

Loads are percentages (a core that is ``off`` is left out of the mean), temperatures in
degrees Celsius (``-256C`` is a sensor that is powered down: dropped), rails as
"current/average" milliwatts. Fields a board does not print are absent, never an error;
a line that is not tegrastats output parses to None.

``nvpmodel -q`` prints ``NV Power Mode: NAME`` and the mode's number on the next line.

:class:`BoardMonitor` runs ``tegrastats`` (where it exists) in a thread and keeps the
latest line parsed: :meth:`BoardMonitor.state` is what the agent reports in
``Telemetry.board`` (protocol version 4) and serves on ``/metrics``.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_ENTRIES = 32  # Telemetry's map and list limit (protocol.UNPACK_LIMITS)
SENSOR_OFF_C = -256.0  # what tegrastats prints for a powered-down thermal zone
NVPMODEL_TIMEOUT_S = 5.0
POWER_MODE_EVERY_S = 60.0

_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_GPU = re.compile(r"\bGR3D_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW\b")
_POWER_MODE = re.compile(r"NV Power Mode:\s*(\S.*?)\s*$", re.MULTILINE)
BOARD_FIGURES = ("cpu_percent", "gpu_percent", "emc_percent", "ram_used_mb", "power_total_mw")
TOTAL_RAILS = ("VDD_IN", "VIN_SYS_5V0", "POM_5V_IN")  # the board's input rail, by family


@dataclass
class BoardState:
    ram_used_mb: int
    ram_total_mb: int
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    cpu_percent: float | None = None  # mean over the cores that are on
    cpu_percent_per_core: list[float] = field(default_factory=list)
    cores_online: int | None = None
    emc_percent: float | None = None  # memory controller load
    gpu_percent: float | None = None  # GR3D: the integrated GPU's load
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, int] = field(default_factory=dict)  # rail -> current draw
    power_total_mw: int | None = None  # the input rail, or the sum of rails without one
    power_mode: str | None = None  # nvpmodel's mode name
    power_mode_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``Telemetry.board`` map (within the wire's limits)."""
        return asdict(self)


def board_figures(board: dict[str, Any]) -> dict[str, float]:
    """The figures of a ``Telemetry.board`` map worth a time series. The map is the
    device's word: anything that is not a finite number is left out."""
    figures = {name: board.get(name) for name in BOARD_FIGURES}
    temperatures = board.get("temperatures_c")
    if isinstance(temperatures, dict):
        figures["temperature_max_c"] = max(filter(_finite, temperatures.values()), default=None)
    return {name: float(value) for name, value in figures.items() if _finite(value)}


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_tegrastats(line: str) -> BoardState | None:
    """One tegrastats line, or None if ``line`` is not one (no RAM field)."""
    ram = _RAM.search(line)
    if ram is None:
        return None
    state = BoardState(int(ram.group(1)), int(ram.group(2)))
    if swap := _SWAP.search(line):
        state.swap_used_mb, state.swap_total_mb = int(swap.group(1)), int(swap.group(2))
    if cpu := _CPU.search(line):
        cores = cpu.group(1).split(",")
        loads = [float(core.split("%")[0]) for core in cores if "%" in core]
        state.cpu_percent_per_core = loads[:MAX_ENTRIES]
        state.cores_online = len(loads)
        state.cpu_percent = sum(loads) / len(loads) if loads else None
    if emc := _EMC.search(line):
        state.emc_percent = float(emc.group(1))
    if gpu := _GPU.search(line):
        state.gpu_percent = float(gpu.group(1))
    cpu_field = cpu.group(0) if cpu else ""
    for name, celsius in _TEMP.findall(line.replace(cpu_field, "")):
        if float(celsius) > SENSOR_OFF_C and len(state.temperatures_c) < MAX_ENTRIES:
            state.temperatures_c[name.lower()] = float(celsius)
    for name, now, _average in _RAIL.findall(line):
        if len(state.power_mw) < MAX_ENTRIES:
            state.power_mw[name] = int(now)
    total = next((state.power_mw[rail] for rail in TOTAL_RAILS if rail in state.power_mw), None)
    state.power_total_mw = total if total is not None else (sum(state.power_mw.values()) or None)
    return state


def parse_nvpmodel(text: str) -> tuple[str | None, int | None]:
    """(mode name, mode number) from ``nvpmodel -q``; (None, None) if it says neither."""
    mode = _POWER_MODE.search(text)
    if mode is None:
        return None, None
    after = text[mode.end():].split()
    return mode.group(1), int(after[0]) if after and after[0].isdigit() else None


def read_power_mode(nvpmodel: str | None = None) -> tuple[str | None, int | None]:
    """The board's power mode, or (None, None) where ``nvpmodel`` is absent or fails."""
    nvpmodel = nvpmodel or shutil.which("nvpmodel")
    if nvpmodel is None:
        return None, None
    try:
        out = subprocess.run([nvpmodel, "-q"], capture_output=True, text=True,
                             timeout=NVPMODEL_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvpmodel -q failed: %s", exc)
        return None, None
    return parse_nvpmodel(out)


class BoardMonitor:
    """The latest tegrastats line of this board, read by a thread; nothing on other hosts.

    ``command`` defaults to ``tegrastats --interval MS`` where ``tegrastats`` is on PATH."""

    def __init__(self, interval_ms: int = 1000, command: list[str] | None = None,
                 nvpmodel: str | None = None):
        tegrastats = shutil.which("tegrastats")
        if command is None and tegrastats is not None:
            command = [tegrastats, "--interval", str(interval_ms)]
        self.command = command
        self._nvpmodel = nvpmodel
        self._latest: BoardState | None = None
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.command is not None

    def start(self) -> BoardMonitor:
        if self.command is None:
            return self
        try:
            self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except OSError as exc:
            log.warning("board telemetry off: cannot run %s: %s", self.command[0], exc)
            self.command = None
            return self
        self._thread = threading.Thread(target=self._read, name="tegrastats", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        mode, mode_read_at = (None, None), -float("inf")
        for line in self._process.stdout:
            state = parse_tegrastats(line)
            if state is None:
                continue
            if time.monotonic() - mode_read_at > POWER_MODE_EVERY_S:  # nvpmodel -m changes it
                mode, mode_read_at = read_power_mode(self._nvpmodel), time.monotonic()
            state.power_mode, state.power_mode_id = mode
            with self._lock:
                self._latest = state
        log.info("tegrastats ended (exit %s)", self._process.wait())

    def state(self) -> BoardState | None:
        with self._lock:
            return self._latest

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
