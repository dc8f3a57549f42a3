"""A network lab on one host: one network namespace per device, shaped links to a hub.

Layout (docs/trials.md)::

    msp-<pid>-hub  (controller)                       msp-<pid>-<k>  (device k)
    10.231.k.1/30  tun  <--- wire process --->  tun  10.231.k.2/30
                         uplink:   delay + jitter + loss     (tbf rate cap on the device's tun)
                         downlink: delay

Every address lives in a namespace the lab creates; nothing is added to the root
namespace. The *wire* is one small process (``python -m edge_controller.trial.netns wire``)
that owns both tun devices of every link and forwards IP packets between them after the
link's delay; it drops uplink packets with the link's loss probability and adds uniform
jitter without reordering. A rate cap is a real ``tc`` tbf qdisc on the device-side tun.
(``tc netem`` would do the delay part in the kernel, but kernels built without
``CONFIG_NET_SCH_NETEM`` exist, this one included; the wire works on any kernel with TUN.)

Teardown (normal exit, exceptions, SIGINT/SIGTERM while the lab is open) kills every
process the lab spawned, by pid, stops the wire and deletes every namespace it created.
:func:`cleanup_stale` removes what a crashed earlier run left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import logging
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PREFIX = "msp-"  # every namespace of the project: f"{PREFIX}{owner pid}-{hub | k}"
MAX_DEVICES = 250  # device k gets 10.231.k.0/30
COMMAND_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
WIRE_QUEUE_PACKETS = 1000  # per direction and link, like netem's default limit
MTU_BYTES = 1500
WIRE_RT_PRIORITY = 10  # SCHED_FIFO; the wire sleeps in select() between packets

_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl


class LabError(RuntimeError):
    """The lab cannot be built or a command in it failed."""


@dataclass(frozen=True)
class LinkShape:
    """One device's link. Delays are one way; ``down_delay_ms=None`` mirrors ``delay_ms``."""

    delay_ms: float = 0.0  # uplink one-way delay (device -> controller)
    jitter_ms: float = 0.0  # uplink, uniform in +-jitter, packet order kept
    loss_pct: float = 0.0  # uplink packet loss
    rate_mbit: float = 0.0  # uplink tbf cap; 0 = uncapped
    down_delay_ms: float | None = None  # downlink one-way delay

    def __post_init__(self):
        values = (
            self.delay_ms,
            self.jitter_ms,
            self.loss_pct,
            self.rate_mbit,
            self.down_delay_ms or 0.0,
        )
        if min(values) < 0 or self.loss_pct > 100:
            raise ValueError(f"invalid link shape {self}: need values >= 0 and loss_pct <= 100")

    def wire_config(self) -> dict[str, float]:
        down = self.delay_ms if self.down_delay_ms is None else self.down_delay_ms
        return {
            "up_delay_s": self.delay_ms / 1e3,
            "up_jitter_s": self.jitter_ms / 1e3,
            "up_loss": self.loss_pct / 100,
            "down_delay_s": down / 1e3,
        }


@dataclass
class DeviceNet:
    """Where device ``name`` (the lab's k-th) lives."""

    name: str
    index: int
    netns: str
    iface: str  # the device-side tun, inside ``netns``
    hub_iface: str  # the hub-side tun, inside the hub namespace
    shape: LinkShape = field(default_factory=LinkShape)

    @property
    def address(self) -> str:
        return f"10.231.{self.index}.2"

    @property
    def hub_address(self) -> str:
        """The controller's address as this device sees it."""
        return f"10.231.{self.index}.1"


def check_requirements() -> None:
    """Raise LabError unless this process can build a lab (root, iproute2, /dev/net/tun)."""
    if os.geteuid() != 0:
        raise LabError("the network lab needs root (network namespaces, tun, tc)")
    missing = [tool for tool in ("ip", "tc", "taskset") if shutil.which(tool) is None]
    if missing:
        raise LabError(f"the network lab needs {', '.join(missing)} (iproute2, util-linux)")
    if not os.path.exists("/dev/net/tun"):
        raise LabError("the network lab needs /dev/net/tun (kernel TUN support)")


class NetworkLab:
    """``with NetworkLab(["jetson", "phone"]) as lab:`` builds the namespaces and links."""

    def __init__(
        self,
        devices: Sequence[str] | dict[str, LinkShape],
        *,
        prefix: str = PREFIX,
        wire_cpus: Sequence[int] | None = None,
    ):
        names = list(devices)
        if not 0 < len(names) <= MAX_DEVICES or len(set(names)) != len(names):
            raise ValueError(f"need 1..{MAX_DEVICES} distinct device names")
        owner = f"{os.getpid():x}"
        self.prefix = prefix
        self.hub_netns = f"{prefix}{os.getpid()}-hub"
        shapes = devices if isinstance(devices, dict) else {}
        self.devices = {
            name: DeviceNet(
                name,
                k,
                f"{prefix}{os.getpid()}-{k}",
                f"msp{owner}d{k}",
                f"msp{owner}h{k}",
                shapes.get(name, LinkShape()),
            )
            for k, name in enumerate(names)
        }
        self.wire_cpus = wire_cpus
        self._wire: subprocess.Popen | None = None
        self._wire_lock = threading.Lock()
        self._spawned: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._saved_handlers: dict[int, object] = {}

    # ---- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> NetworkLab:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        check_requirements()
        removed = cleanup_stale(self.prefix)
        if removed:
            log.warning("removed stale namespaces of crashed runs: %s", ", ".join(removed))
        self._install_signal_handlers()
        pairs = [f"{d.hub_iface}:{d.iface}" for d in self.devices.values()]
        self._wire = self._popen(
            [sys.executable, "-m", "edge_controller.trial.netns", "wire", *pairs],
            self.wire_cpus,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._wire_reply() != {"ready": True}:
            raise LabError("the wire process did not start")
        self._add_netns(self.hub_netns)
        for dev in self.devices.values():
            self._add_netns(dev.netns)
            self._attach(dev.hub_iface, self.hub_netns, f"{dev.hub_address}/30")
            self._attach(dev.iface, dev.netns, f"{dev.address}/30")
            self.set_link(dev.name, dev.shape)
        log.info("lab up: %d devices, hub %s", len(self.devices), self.hub_netns)

    def close(self) -> None:
        """Kill spawned processes, stop the wire, delete the namespaces. Idempotent."""
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this
        try:
            for proc in self._spawned:
                _stop(proc)
            self._spawned.clear()
            if self._wire is not None:
                self._wire.stdin.close()
                _stop(self._wire)
                self._wire = None
            for netns in reversed(self._created):
                _kill_netns_pids(netns)
                _run(["ip", "netns", "del", netns], check=False)
            self._created.clear()
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, previous)
            self._restore_signal_handlers()

    # ---- use -------------------------------------------------------------------------
    def set_link(self, device: str, shape: LinkShape | None = None, **changes) -> LinkShape:
        """Change a live link: ``set_link("phone", delay_ms=80, rate_mbit=2)``.

        Fields not named keep their value; ``shape`` replaces the whole link first.
        Returns the new shape. Packets already in flight keep the delay they were sent with.
        """
        dev = self.devices[device]
        new = dataclasses.replace(shape or dev.shape, **changes)
        self._wire_command({"link": dev.index, "shape": new.wire_config()})
        tc = ["tc", "-n", dev.netns, "qdisc"]
        if new.rate_mbit > 0:
            rate_bytes = new.rate_mbit * 1e6 / 8
            burst = max(2 * MTU_BYTES, int(rate_bytes * 0.004))  # ~4 ms, two packets at least
            tbf = f"tbf rate {new.rate_mbit}mbit burst {burst} latency 200ms".split()
            _run([*tc, "replace", "dev", dev.iface, "root", *tbf])
        elif dev.shape.rate_mbit > 0:
            _run([*tc, "del", "dev", dev.iface, "root"])
        dev.shape = new
        log.info("%s link: %s", device, new)
        return new

    def set_up(self, device: str, up: bool) -> None:
        """Take a device's link down (its interface, inside its namespace: nothing gets
        through either way, as when Wi-Fi drops) or bring it up again."""
        dev = self.devices[device]
        _run(["ip", "-n", dev.netns, "link", "set", "dev", dev.iface, "up" if up else "down"])
        log.info("%s link %s", device, "up" if up else "down")

    def counters(self, device: str) -> dict[str, int]:
        """Packets the wire forwarded and dropped on a link, per direction."""
        return self._wire_command({"link": self.devices[device].index})

    def spawn(
        self,
        device: str | None,
        argv: Sequence[str],
        *,
        cpus: Sequence[int] | None = None,
        **popen_kwargs,
    ) -> subprocess.Popen:
        """Start ``argv`` in ``device``'s namespace (None: the hub), optionally on ``cpus``.

        The process gets its own session (a terminal's Ctrl-C reaches the lab, which stops
        it) and gets SIGTERM when the thread that spawned it ends (Linux's parent-death
        signal follows the thread, not the process): spawn from a thread that outlives it.
        """
        netns = self.hub_netns if device is None else self.devices[device].netns
        proc = self._popen(["ip", "netns", "exec", netns, *argv], cpus, **popen_kwargs)
        self._spawned.append(proc)
        return proc

    def endpoint(self, device: str, port: int) -> str:
        """The ZeroMQ endpoint of a controller bound in the hub, as ``device`` dials it."""
        return f"tcp://{self.devices[device].hub_address}:{port}"

    # ---- internals -------------------------------------------------------------------
    def _popen(
        self, argv: Sequence[str], cpus: Sequence[int] | None, **popen_kwargs
    ) -> subprocess.Popen:
        if cpus:
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        popen_kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(list(argv), preexec_fn=_die_with_parent, **popen_kwargs)

    def _add_netns(self, netns: str) -> None:
        _run(["ip", "netns", "add", netns])
        self._created.append(netns)
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])

    def _attach(self, iface: str, netns: str, address: str) -> None:
        _run(["ip", "link", "set", iface, "netns", netns])
        _run(["ip", "-n", netns, "link", "set", iface, "addrgenmode", "none"])  # no IPv6 chatter
        _run(["ip", "-n", netns, "addr", "add", address, "dev", iface])
        _run(["ip", "-n", netns, "link", "set", iface, "up"])

    def _wire_command(self, command: dict) -> dict:
        # One command and its reply at a time: chaos timers change links and read
        # counters from threads of their own, and replies carry no id.
        with self._wire_lock:
            if self._wire is None or self._wire.poll() is not None:
                raise LabError("the wire process is not running")
            self._wire.stdin.write(json.dumps(command) + "\n")
            self._wire.stdin.flush()
            return self._wire_reply()

    def _wire_reply(self) -> dict:
        ready, _, _ = select.select([self._wire.stdout], [], [], COMMAND_TIMEOUT_S)
        line = self._wire.stdout.readline() if ready else ""
        if not line:
            raise LabError("the wire process did not answer")
        return json.loads(line)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; close() still runs on exceptions
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved_handlers[sig] = signal.signal(sig, _raise_on_signal)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler)
        self._saved_handlers.clear()


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named ``{prefix}{pid}-...`` whose owner pid is gone.

    Processes still running inside them (left by the crashed run) are killed by pid.
    Namespaces of live labs, and names not in this scheme, are left alone.
    """
    removed = []
    listing = [line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines()]
    for netns in (name for name in listing if name.startswith(prefix)):
        owner = netns[len(prefix) :].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        _kill_netns_pids(netns)
        _run(["ip", "netns", "del", netns], check=False)
        removed.append(netns)
    return removed


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_netns_pids(netns: str) -> None:
    for pid in _run(["ip", "netns", "pids", netns], check=False).stdout.split():
        log.warning("killing pid %s still running in %s", pid, netns)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process (and its group, which it leads), then SIGKILL after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _raise_on_signal(signum, frame):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


# ---- the wire ----------------------------------------------------------------------------
@dataclass
class _Direction:
    """One direction of one link: packets read from ``src`` go out on ``dst`` when due."""

    src: int
    dst: int
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    forwarded: int = 0
    dropped: int = 0

    def take(self, packet: bytes, now: float, rng: random.Random) -> None:
        if rng.random() < self.loss or len(self.queue) >= WIRE_QUEUE_PACKETS:
            self.dropped += 1
            return
        due = now + max(0.0, self.delay_s + rng.uniform(-self.jitter_s, self.jitter_s))
        if self.queue:
            due = max(due, self.queue[-1][0])  # jitter never reorders
        self.queue.append((due, packet))

    def flush(self, now: float) -> None:
        while self.queue and self.queue[0][0] <= now:
            try:
                os.write(self.dst, self.queue.popleft()[1])
                self.forwarded += 1
            except OSError:  # the far end went down: the packet is lost, as on a wire
                self.dropped += 1


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    return fd


def run_wire(pairs: Sequence[tuple[str, str]], seed: int = 0) -> None:
    """Forward between tun pairs ``(hub_iface, device_iface)`` until stdin closes.

    Commands arrive as JSON lines on stdin: ``{"link": k, "shape": {...}}`` reconfigures
    link k (``shape`` optional); every command is answered with link k's counters.
    """
    rng = random.Random(seed)
    try:  # the wire stands for hardware: trial processes must not starve it of CPU
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(WIRE_RT_PRIORITY))
    except OSError as exc:
        log.warning("wire runs without real-time priority (%s): CPU load may add delay", exc)
    links = []
    for hub_name, device_name in pairs:
        hub, device = _open_tun(hub_name), _open_tun(device_name)
        links.append({"up": _Direction(device, hub), "down": _Direction(hub, device)})
    by_src = {d.src: d for link in links for d in link.values()}
    print(json.dumps({"ready": True}), flush=True)
    stdin = sys.stdin.fileno()
    while True:
        now = time.monotonic()
        for direction in by_src.values():
            direction.flush(now)
        dues = [d.queue[0][0] for d in by_src.values() if d.queue]
        timeout = max(0.0, min(dues) - now) if dues else None
        readable, _, _ = select.select([stdin, *by_src], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            if fd == stdin:
                line = sys.stdin.readline()
                if not line:
                    return
                print(json.dumps(_configure(links, json.loads(line))), flush=True)
                continue
            for _ in range(64):  # bounded: other links get their turn
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                by_src[fd].take(packet, now, rng)


def _configure(links: list[dict[str, _Direction]], command: dict) -> dict[str, int]:
    link = links[command["link"]]
    shape = command.get("shape")
    if shape is not None:
        link["up"].delay_s, link["up"].jitter_s = shape["up_delay_s"], shape["up_jitter_s"]
        link["up"].loss, link["down"].delay_s = shape["up_loss"], shape["down_delay_s"]
    return {
        f"{name}_{what}": getattr(d, what)
        for name, d in link.items()
        for what in ("forwarded", "dropped")
    }


if __name__ == "__main__":
    if sys.argv[1:2] != ["wire"]:
        sys.exit("usage: python -m edge_controller.trial.netns wire HUB_IF:DEVICE_IF ...")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the lab stops the wire, not a terminal
    run_wire([tuple(pair.split(":")) for pair in sys.argv[2:]])
