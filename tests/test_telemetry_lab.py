"""Telemetry against ground truth the test controls: shaped links in a NetworkLab.

A ping reflector (answering exactly like the controller) runs in the hub namespace; the
probe runs in the device namespace as ``python -m device_agent.telemetry probe`` and
prints one JSON report per measurement, stamped with the (host-wide) monotonic clock.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import time

import pytest

from edge_controller.launch import LabKeys
from edge_controller.trial.netns import LinkShape, NetworkLab

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the network lab needs root")

PY = sys.executable
PORT = 5555
RTT_TOL_S = 0.015
RATE_TOL = 0.25


@pytest.fixture(scope="module")
def lab():
    """The lab, a CURVE reflector in its hub (the controller's own transport), the keys."""
    with NetworkLab(["dev"]) as lab, LabKeys() as keys:
        reflector = lab.spawn(
            None,
            [PY, "-m", "device_agent.telemetry", "reflect", "--bind", f"tcp://*:{PORT}",
             "--duration", "120", *keys.controller_args()],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert reflector.stdout.readline().strip()  # bound
        lab.keys = keys
        yield lab


def probe(lab: NetworkLab, *args: str) -> subprocess.Popen:
    return lab.spawn(
        "dev",
        [PY, "-m", "device_agent.telemetry", "probe", "--controller", lab.endpoint("dev", PORT),
         *lab.keys.agent_args("dev"), *args],
        stdout=subprocess.PIPE,
        text=True,
    )


def next_report(proc: subprocess.Popen, timeout_s: float = 15.0) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    line = proc.stdout.readline() if ready else ""
    assert line, f"no report from the probe (exit {proc.poll()})"
    return json.loads(line)


def median_report(reports: list[dict]) -> dict:
    """Per-field median: the figure a controller would smooth to; CPU-busy hosts (shared
    with model tests) can stall one process for a burst, which one sample would show."""
    return {key: statistics.median(r[key] for r in reports) for key in ("rtt_s", "uplink_bps")}


def test_reported_rtt_follows_the_link_delay(lab):
    lab.set_link("dev", LinkShape(delay_ms=40))
    report = next_report(probe(lab, "--rtt-count", "5", "--burst-count", "0"))
    assert report["rtt_s"] == pytest.approx(0.080, abs=RTT_TOL_S)


def test_reported_uplink_follows_the_tbf_rate(lab):
    lab.set_link("dev", LinkShape(delay_ms=2, rate_mbit=8))
    proc = probe(lab, "--rtt-count", "3", "--duration", "10")
    report = median_report([next_report(proc) for _ in range(3)])
    proc.kill()
    assert report["uplink_bps"] == pytest.approx(8e6, rel=RATE_TOL)
    assert report["rtt_s"] == pytest.approx(0.004, abs=RTT_TOL_S)


def test_link_worsens_mid_run_and_the_reports_follow(lab):
    lab.set_link("dev", LinkShape(delay_ms=10, rate_mbit=8))
    proc = probe(lab, "--rtt-count", "3", "--every", "0.1", "--duration", "30")
    before = median_report([next_report(proc) for _ in range(3)])
    lab.set_link("dev", delay_ms=60, rate_mbit=2)
    changed_at = time.monotonic()
    after = []
    while len(after) < 3:
        report = next_report(proc)
        if report["started_at"] > changed_at:  # a report that began before may mix both
            after.append(report)
    proc.kill()
    assert before["rtt_s"] == pytest.approx(0.020, abs=RTT_TOL_S)
    assert before["uplink_bps"] == pytest.approx(8e6, rel=RATE_TOL)
    assert median_report(after)["rtt_s"] == pytest.approx(0.120, abs=RTT_TOL_S)
    assert median_report(after)["uplink_bps"] == pytest.approx(2e6, rel=RATE_TOL)
