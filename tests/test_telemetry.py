"""Host state parsing and LinkProbe over real ZeroMQ sockets on loopback."""

from __future__ import annotations

import threading

import pytest
import zmq

from device_agent import telemetry
from device_agent.link import ControllerLink, LinkTimeout
from device_agent.telemetry import LinkProbe, host_state, parse_iw_bitrates, parse_proc_wireless
from edge_controller import protocol as P
from edge_controller.transport import Transport

PROC_WIRELESS = """\
Inter-| sta-|   Quality        |   Discarded packets               | Missed | WE
 face | tus | link level noise |  nwid  crypt   frag  retry   misc | beacon | 22
 wlp2s0: 0000   58.  -52.  -256        0      0      0      3      0        0
"""
IW_LINK = """\
Connected to aa:bb:cc:dd:ee:ff (on wlp2s0)
\tSSID: lab
\tfreq: 5180
\tsignal: -52 dBm
\trx bitrate: 390.0 MBit/s VHT-MCS 9 80MHz short GI VHT-NSS 1
\ttx bitrate: 433.3 MBit/s VHT-MCS 9 80MHz short GI VHT-NSS 1
"""


def test_parse_proc_wireless():
    (wifi,) = parse_proc_wireless(PROC_WIRELESS)
    assert (wifi.interface, wifi.link_quality, wifi.signal_dbm) == ("wlp2s0", 58.0, -52.0)


def test_parse_iw_bitrates_connected_and_not():
    assert parse_iw_bitrates(IW_LINK) == (433.3, 390.0)
    assert parse_iw_bitrates("Not connected.\n") == (None, None)


def test_read_wifi_uses_iw_where_present(tmp_path, monkeypatch):
    proc = tmp_path / "wireless"
    proc.write_text(PROC_WIRELESS)
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return type("Done", (), {"stdout": IW_LINK})()

    monkeypatch.setattr(telemetry.shutil, "which", lambda name: "/sbin/iw")
    monkeypatch.setattr(telemetry.subprocess, "run", fake_run)
    wifi = telemetry.read_wifi(str(proc))
    assert calls == [["/sbin/iw", "dev", "wlp2s0", "link"]]
    assert (wifi.tx_bitrate_mbit, wifi.rx_bitrate_mbit) == (433.3, 390.0)


def test_wifi_absent_gives_none_not_an_error(tmp_path, monkeypatch):
    assert telemetry.read_wifi(str(tmp_path / "missing")) is None
    header_only = tmp_path / "wireless"
    header_only.write_text("".join(PROC_WIRELESS.splitlines(keepends=True)[:2]))
    assert telemetry.read_wifi(str(header_only)) is None
    proc = tmp_path / "with_device"
    proc.write_text(PROC_WIRELESS)
    monkeypatch.setattr(telemetry.shutil, "which", lambda name: None)
    wifi = telemetry.read_wifi(str(proc))
    assert wifi.signal_dbm == -52.0 and wifi.tx_bitrate_mbit is None


def test_host_state_is_sane_and_travels_in_telemetry():
    state = host_state()
    assert 0 < state.memory_used_bytes < state.memory_total_bytes
    assert 0.0 <= state.cpu_percent <= 100.0
    assert all(isinstance(v, float) for v in state.temperatures_c.values())
    msg = P.Telemetry(draft_s_per_token=0.02, rtt_s=0.05, uplink_bps=8e6, host=state.to_dict())
    back = P.decode(P.encode(msg))
    assert back.host["memory_total_bytes"] == state.memory_total_bytes
    assert back.host["wifi"] == (None if state.wifi is None else state.to_dict()["wifi"])


@pytest.fixture
def reflector():
    """``telemetry.reflect`` on loopback in a thread; yields its endpoint."""
    endpoints = []
    ready = threading.Event()

    def on_ready(endpoint):
        endpoints.append(endpoint)
        ready.set()

    stop = threading.Event()
    transport = Transport("tcp://127.0.0.1:*", None, insecure=True)
    thread = threading.Thread(
        target=telemetry.reflect, args=(transport, 30.0, on_ready, stop), daemon=True
    )
    thread.start()
    assert ready.wait(5)
    yield endpoints[0]
    stop.set()
    thread.join(5)


def test_probe_measures_loopback(reflector):
    with ControllerLink(reflector) as link:
        probe = LinkProbe(link)
        report = probe.measure(rtt_count=3, burst_bytes=64 * 1024, burst_count=4)
    assert 0 < report.rtt_s < 0.1
    assert report.uplink_bps > 50e6  # loopback: far above any radio link
    assert probe.held == []


def test_probe_keeps_other_messages_and_ignores_stale_pongs():
    """A fake controller that sends a control update and a stray pong before each pong."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def serve():
        for _ in range(2):
            identity, frame = router.recv_multipart()
            ping = P.decode(frame)
            for msg in (
                P.Control(3, 0.5, 1e6),
                P.Pong(-1.0),
                P.Pong(ping.sent_at, len(frame), 1.0),
            ):
                router.send_multipart([identity, P.encode(msg)])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with ControllerLink(f"tcp://127.0.0.1:{port}") as link:
            probe = LinkProbe(link)
            rtt = probe.rtt(count=2)
        thread.join(5)
    finally:
        router.close(0)
    assert rtt > 0
    assert probe.held == [P.Control(3, 0.5, 1e6)] * 2


def test_probe_times_out_without_controller():
    with ControllerLink("tcp://127.0.0.1:9") as link:
        probe = LinkProbe(link, timeout_s=0.3)
        with pytest.raises(LinkTimeout):
            probe.rtt(count=1)


@pytest.mark.parametrize("burst", [{"count": 1}, {"burst_bytes": 1 << 20, "count": 8}])
def test_probe_refuses_unbounded_or_untimeable_bursts(burst):
    with ControllerLink("tcp://127.0.0.1:9") as link, pytest.raises(ValueError):
        LinkProbe(link).uplink_capacity(**burst)
