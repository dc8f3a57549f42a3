"""NetworkLab: real namespaces, real tun links, real tc; every test checks cleanup too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from edge_controller.trial import netns
from edge_controller.trial.netns import LabError, LinkShape, NetworkLab, cleanup_stale

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the network lab needs root")

PY = sys.executable

# Sends COUNT numbered UDP datagrams (1 ms apart) stamped with the shared monotonic clock.
SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for seq in range(int(sys.argv[2])):
    s.sendto(f"{seq} {time.monotonic()}".encode(), (sys.argv[1], 9000))
    time.sleep(0.001)
"""
# Prints [[seq, one-way delay s], ...] in arrival order for datagrams of the next SECONDS.
RECEIVER = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9000)); s.settimeout(0.1)
print("ready", flush=True)
got, end = [], time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        seq, sent = s.recv(100).decode().split()
    except socket.timeout:
        continue
    got.append([int(seq), time.monotonic() - float(sent)])
print(json.dumps(got))
"""


def netns_names() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listing.stdout.splitlines()}


def udp_trace(lab: NetworkLab, device: str, count: int, seconds: float) -> list[list[float]]:
    receiver = lab.spawn(
        None, [PY, "-c", RECEIVER, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert receiver.stdout.readline().strip() == "ready"
    sender = lab.spawn(device, [PY, "-c", SENDER, lab.devices[device].hub_address, str(count)])
    assert sender.wait(30) == 0
    out, _ = receiver.communicate(timeout=30)
    return json.loads(out)


def test_lab_builds_namespaces_and_removes_everything_on_exit():
    with NetworkLab(["jetson", "phone"]) as lab:
        names = {lab.hub_netns, *(d.netns for d in lab.devices.values())}
        assert names <= netns_names()
        hub_addrs = subprocess.run(
            ["ip", "-n", lab.hub_netns, "-4", "addr"], capture_output=True, text=True, check=True
        ).stdout
        assert "10.231.0.1/30" in hub_addrs and "10.231.1.1/30" in hub_addrs
        phone = subprocess.run(
            ["ip", "-n", lab.devices["phone"].netns, "-4", "addr"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "10.231.1.2/30" in phone and "127.0.0.1" in phone
        sleeper = lab.spawn("jetson", ["sleep", "60"])
        iface = lab.devices["jetson"].iface
    assert sleeper.poll() is not None
    assert not names & netns_names()
    root_links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert iface not in root_links  # the tun devices went with the wire


def test_delay_and_jitter_shape_the_uplink_without_reordering():
    with NetworkLab({"d": LinkShape(delay_ms=20, jitter_ms=8)}) as lab:
        trace = udp_trace(lab, "d", count=200, seconds=1.5)
    assert [seq for seq, _ in trace] == list(range(200))  # none lost, order kept
    delays_ms = sorted(delay * 1e3 for _, delay in trace)
    p10, p90 = delays_ms[20], delays_ms[180]
    assert delays_ms[0] >= 12 - 1  # never earlier than delay - jitter
    assert p90 <= 28 + 3  # percentiles: a busy CPU may hold back the odd packet
    assert p90 - p10 > 5  # the jitter is there


def test_loss_drops_that_share_of_uplink_packets():
    with NetworkLab({"d": LinkShape(loss_pct=30)}) as lab:
        trace = udp_trace(lab, "d", count=600, seconds=1.5)
        counters = lab.counters("d")
    assert counters["up_forwarded"] == len(trace)
    assert counters["up_dropped"] == 600 - len(trace)
    assert len(trace) / 600 == pytest.approx(0.7, abs=0.06)


def test_set_link_changes_a_live_link_and_its_tbf_qdisc():
    with NetworkLab(["d"]) as lab:
        dev = lab.devices["d"]
        before = udp_trace(lab, "d", count=20, seconds=0.5)
        assert max(delay for _, delay in before) < 0.005
        shape = lab.set_link("d", delay_ms=30, rate_mbit=8)
        assert shape == LinkShape(delay_ms=30, rate_mbit=8)
        after = udp_trace(lab, "d", count=20, seconds=0.6)
        assert min(delay for _, delay in after) >= 0.029
        def qdisc() -> str:
            argv = ["tc", "-n", dev.netns, "qdisc", "show", "dev", dev.iface]
            return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

        assert "tbf" in qdisc() and "rate 8Mbit" in qdisc()
        lab.set_link("d", rate_mbit=0)
        assert "tbf" not in qdisc()


def test_devices_cannot_reach_each_other():
    probe = "import socket; socket.create_connection(('10.231.1.2', 9), timeout=1)"
    with NetworkLab(["a", "b"]) as lab:
        proc = lab.spawn("a", [PY, "-c", probe], stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode != 0 and "unreachable" in err


def test_spawn_pins_to_cpus():
    with NetworkLab(["d"]) as lab:
        proc = lab.spawn(
            "d",
            [PY, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            cpus=[0],
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = proc.communicate(timeout=10)
    assert json.loads(out) == [0]


LAB_SCRIPT = textwrap.dedent("""
    import json, time
    from edge_controller.trial.netns import NetworkLab
    with NetworkLab(["d"]) as lab:
        child = lab.spawn("d", ["sleep", "60"])
        print(json.dumps([lab.hub_netns, lab.devices["d"].netns, child.pid]), flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_tears_the_lab_down(sig):
    proc = subprocess.Popen([PY, "-c", LAB_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        hub, device, child = json.loads(proc.stdout.readline())
        assert {hub, device} <= netns_names()
        proc.send_signal(sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not {hub, device} & netns_names()
    assert not os.path.exists(f"/proc/{child}")


def test_a_killed_lab_takes_its_processes_along_and_leaves_namespaces_for_cleanup():
    proc = subprocess.Popen([PY, "-c", LAB_SCRIPT], stdout=subprocess.PIPE, text=True)
    hub, device, child = json.loads(proc.stdout.readline())
    proc.kill()  # no teardown runs
    proc.wait(10)
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}")  # it died with the lab's process
    assert {hub, device} <= netns_names()
    assert {hub, device} <= set(cleanup_stale())
    assert not {hub, device} & netns_names()


def test_cleanup_stale_removes_only_namespaces_of_dead_owners():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"msp-{dead.pid}-0", f"msp-{os.getpid()}-77"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    leftover = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "60"])
    try:
        removed = cleanup_stale()
        assert stale in removed and live not in removed
        assert leftover.wait(10) == -signal.SIGKILL
        assert stale not in netns_names() and live in netns_names()
    finally:
        if leftover.poll() is None:
            leftover.kill()
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_clear_error_without_root(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="needs root"):
        NetworkLab(["d"]).__enter__()


@pytest.mark.parametrize("bad", [{"delay_ms": -1}, {"loss_pct": 101}])
def test_invalid_link_shape_is_refused(bad):
    with pytest.raises(ValueError):
        LinkShape(**bad)
