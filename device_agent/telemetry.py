"""What a device reports besides its draft speed: host state and link quality.

- :func:`host_state`: CPU load, memory, temperatures, battery (psutil) and Wi-Fi signal
  and bit rate (``/proc/net/wireless``, ``iw``) where the host has them; absent sources
  give ``None`` / empty fields, never an error.
- :class:`LinkProbe`: round-trip time from Ping/Pong and uplink capacity from a short
  unpaced burst of padded pings, timed by the controller's arrival clock
  (``Pong.received_at``). Paced uploads would only measure the pacer, so the burst
  bypasses it.

The results map onto :class:`edge_controller.protocol.Telemetry`: ``rtt_s``, ``uplink_bps``
and ``host`` (``HostState.to_dict()``).

``python -m device_agent.telemetry probe`` runs the probe against an endpoint and prints
one JSON line per measurement; ``python -m device_agent.telemetry reflect`` answers pings
exactly as the controller does (link checks and tests without a controller).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from device_agent.link import ControllerLink, LinkTimeout
from edge_controller import protocol as P
from edge_controller.transport import Transport

log = logging.getLogger(__name__)

PROC_WIRELESS = "/proc/net/wireless"
IW_TIMEOUT_S = 2.0
MAX_BURST_BYTES = 1 << 20  # bound on a probe burst's total size


# ---- host state --------------------------------------------------------------------------
@dataclass
class WifiState:
    interface: str
    link_quality: float | None = None  # /proc/net/wireless "link" (driver scale, often /70)
    signal_dbm: float | None = None
    tx_bitrate_mbit: float | None = None  # from `iw dev IF link`
    rx_bitrate_mbit: float | None = None


@dataclass
class HostState:
    cpu_percent: float  # all cores, since the previous call (0.0 on the first)
    memory_used_bytes: int
    memory_total_bytes: int
    temperatures_c: dict[str, float] = field(default_factory=dict)  # hottest sensor per chip
    battery_percent: float | None = None
    battery_plugged: bool | None = None
    wifi: WifiState | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``Telemetry.host`` map."""
        return asdict(self)


def host_state(proc_wireless: str = PROC_WIRELESS) -> HostState:
    memory = psutil.virtual_memory()
    sensors = getattr(psutil, "sensors_temperatures", dict)()  # absent on some platforms
    temperatures = {
        chip: max(entry.current for entry in entries)
        for chip, entries in sensors.items()
        if entries
    }
    battery = getattr(psutil, "sensors_battery", lambda: None)()
    return HostState(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_used_bytes=memory.total - memory.available,
        memory_total_bytes=memory.total,
        temperatures_c=temperatures,
        battery_percent=None if battery is None else battery.percent,
        battery_plugged=None if battery is None else battery.power_plugged,
        wifi=read_wifi(proc_wireless),
    )


def read_wifi(proc_wireless: str = PROC_WIRELESS) -> WifiState | None:
    """The first wireless interface's state, or None where the host has none."""
    try:
        with open(proc_wireless) as f:
            states = parse_proc_wireless(f.read())
    except OSError:
        return None
    if not states:
        return None
    wifi = states[0]
    iw = shutil.which("iw")
    if iw is not None:
        try:
            out = subprocess.run(
                [iw, "dev", wifi.interface, "link"],
                capture_output=True,
                text=True,
                timeout=IW_TIMEOUT_S,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        wifi.tx_bitrate_mbit, wifi.rx_bitrate_mbit = parse_iw_bitrates(out)
    return wifi


def parse_proc_wireless(text: str) -> list[WifiState]:
    """Parse ``/proc/net/wireless``: two header lines, then ``iface: status link level ...``."""
    states = []
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) < 3:
            continue
        states.append(WifiState(name.strip(), _number(fields[1]), _number(fields[2])))
    return states


def parse_iw_bitrates(text: str) -> tuple[float | None, float | None]:
    """(tx, rx) bit rates in Mbit/s from ``iw dev IF link``; None where not connected."""

    def rate(direction: str) -> float | None:
        match = re.search(rf"{direction} bitrate:\s*([\d.]+)\s*MBit/s", text)
        return float(match.group(1)) if match else None

    return rate("tx"), rate("rx")


def _number(text: str) -> float | None:
    try:
        return float(text.rstrip("."))
    except ValueError:
        return None


# ---- link probe --------------------------------------------------------------------------
@dataclass
class LinkReport:
    rtt_s: float
    uplink_bps: float  # 0.0 when not measured
    started_at: float  # time.monotonic() when the measurement began


class LinkProbe:
    """Ping/Pong measurements over a :class:`ControllerLink`.

    Meant to run between requests, when nothing else is in flight. Any other message that
    arrives during a probe (a control update, an error) is not lost: it is appended to
    :attr:`held`, in arrival order, for the caller to handle next.
    """

    def __init__(self, link: ControllerLink, timeout_s: float = 5.0):
        self.link = link
        self.timeout_s = timeout_s
        self.held: list[P.Message] = []
        self._last_stamp = 0.0

    def rtt(self, count: int = 5) -> float:
        """Median round trip of ``count`` pings sent one after the other (seconds)."""
        samples = []
        for _ in range(count):
            sent_at = self._stamp()
            self.link.send(P.Ping(sent_at))
            self._pongs({sent_at})
            samples.append(time.monotonic() - sent_at)
        return statistics.median(samples)

    def uplink_capacity(self, burst_bytes: int = 32 * 1024, count: int = 8) -> float:
        """Uplink bit/s from ``count`` back-to-back pings padded to ``burst_bytes``.

        The controller stamps each ping's arrival; the rate is the bytes that arrived after
        the first ping over the time from the first arrival to the last.
        """
        if count < 2 or not 0 < burst_bytes * count <= MAX_BURST_BYTES:
            raise ValueError(f"need count >= 2 and a burst of at most {MAX_BURST_BYTES} bytes")
        payload = bytes(burst_bytes)
        sent = set()
        for _ in range(count):
            sent_at = self._stamp()
            self.link.send(P.Ping(sent_at, payload))
            sent.add(sent_at)
        pongs = sorted(self._pongs(sent).values(), key=lambda pong: pong.received_at)
        span = pongs[-1].received_at - pongs[0].received_at
        if span <= 0:
            raise ValueError("the burst arrived too fast to time: use a larger burst")
        return sum(pong.received_bytes for pong in pongs[1:]) * 8 / span

    def measure(
        self, rtt_count: int = 5, burst_bytes: int = 32 * 1024, burst_count: int = 8
    ) -> LinkReport:
        """RTT and, unless ``burst_count == 0``, uplink capacity."""
        started_at = time.monotonic()
        rtt = self.rtt(rtt_count)
        uplink = self.uplink_capacity(burst_bytes, burst_count) if burst_count else 0.0
        return LinkReport(rtt, uplink, started_at)

    def _stamp(self) -> float:
        """A monotonic time distinct from every earlier one: it names the ping."""
        self._last_stamp = max(time.monotonic(), math.nextafter(self._last_stamp, math.inf))
        return self._last_stamp

    def _pongs(self, sent: set[float]) -> dict[float, P.Pong]:
        deadline = time.monotonic() + self.timeout_s
        pongs: dict[float, P.Pong] = {}
        while len(pongs) < len(sent):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LinkTimeout(
                    f"{len(sent) - len(pongs)} of {len(sent)} pongs missing "
                    f"after {self.timeout_s:g} s"
                )
            msg = self.link.receive(remaining)
            if isinstance(msg, P.Pong) and msg.sent_at in sent:
                pongs[msg.sent_at] = msg
            elif not isinstance(msg, P.Pong):  # pongs of abandoned probes are dropped
                self.held.append(msg)
        return pongs


# ---- a ping reflector --------------------------------------------------------------------
def reflect(
    transport: Transport,
    duration_s: float,
    on_ready: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Answer pings on the controller's own transport (``transport``, not yet open: CURVE
    or insecure by its settings) exactly like the controller, for ``duration_s`` at most.

    ``on_ready`` gets the bound endpoint; ``stop`` ends it early. Returns how many pings
    were answered; other messages are ignored.
    """
    stop = stop or threading.Event()
    endpoint = transport.open()
    if on_ready is not None:
        on_ready(endpoint)
    answered = 0
    deadline = time.monotonic() + duration_s
    try:
        while (remaining := deadline - time.monotonic()) > 0 and not stop.is_set():
            if not transport.poll(min(remaining, 0.1)):
                continue
            while (message := transport.receive()) is not None:
                peer, body = message
                try:
                    msg = P.decode(body[0]) if len(body) == 1 else None
                except P.ProtocolError:
                    continue
                if isinstance(msg, P.Ping):
                    pong = P.Pong(msg.sent_at, len(body[0]), time.monotonic())
                    transport.send(peer.route, P.encode(pong))
                    answered += 1
    finally:
        transport.close()
    return answered


def main(argv: list[str] | None = None) -> int:
    from device_agent.cli import add_link_arguments, link_security

    parser = argparse.ArgumentParser(prog="python -m device_agent.telemetry")
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="measure the link to a controller (JSON lines)")
    probe.add_argument("--controller", required=True)
    add_link_arguments(probe)
    probe.add_argument("--every", type=float, default=0.0, help="seconds between measurements")
    probe.add_argument("--duration", type=float, default=0.0, help="keep measuring this long")
    probe.add_argument("--rtt-count", type=int, default=5)
    probe.add_argument("--burst-bytes", type=int, default=32 * 1024)
    probe.add_argument("--burst-count", type=int, default=8, help="0: RTT only")
    echo = sub.add_parser("reflect", help="answer pings like the controller")
    echo.add_argument("--bind", required=True)
    echo.add_argument("--duration", type=float, required=True)
    echo.add_argument("--keys", metavar="DIR", help="controller keys directory (CURVE)")
    echo.add_argument("--insecure", action="store_true", help="plain TCP (loopback only...)")
    echo.add_argument("--insecure-anywhere", action="store_true", help="...unless this too")
    args = parser.parse_args(argv)

    if args.command == "reflect":
        transport = Transport(args.bind, args.keys, insecure=args.insecure,
                              insecure_anywhere=args.insecure_anywhere)
        reflect(transport, args.duration, lambda endpoint: print(endpoint, flush=True))
        return 0
    curve, problem = link_security(args)
    if problem:
        parser.error(problem)
    ends_at = time.monotonic() + args.duration
    with ControllerLink(args.controller, curve=curve, timeout_s=10.0) as link:
        probe_ = LinkProbe(link)
        probe_.rtt(count=1)  # the first ping also waits for the connection's handshake
        while True:
            report = probe_.measure(args.rtt_count, args.burst_bytes, args.burst_count)
            print(json.dumps(asdict(report)), flush=True)
            if time.monotonic() + args.every >= ends_at:
                return 0
            time.sleep(args.every)


if __name__ == "__main__":
    sys.exit(main())
