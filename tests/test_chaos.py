"""Chaos in a live trial: a link down, a loss burst and a controller crash while real
devices generate over shaped links; every output stays the target's, and the report shows
each fault and each device's recovery."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from edge_controller.launch import BIN

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"),
]

# The devices commit from about 4 s on (drafters loaded, registered): faults come after.
TRIAL = """
name = "chaos-ci"
policies = ["heterogeneous"]
baselines = false  # the faults are the subject; tests/test_live_control.py runs baselines
max_new_tokens = 48
requests = 6

[[devices]]
name = "steady"
draft = "q8_0"
prompt = "The three laws of thermodynamics are"
draft_pace_s = 0.03
rate_mbit = 20

[[devices]]
name = "roamer"
draft = "q5_0"
prompt = "A short history of the printing press:"
draft_pace_s = 0.03
delay_ms = 10

[[chaos]]
at_s = 6
loss_burst = { device = "steady", percent = 30, seconds = 3 }

[[chaos]]
at_s = 8
link_down = { device = "roamer", seconds = 5 }

[[chaos]]
at_s = 14
restart_controller = true
"""


def test_a_chaos_trial_loses_nothing_and_reports_the_dips(tmp_path):
    trial = tmp_path / "chaos.toml"
    trial.write_text(TRIAL)
    out = tmp_path / "out"
    proc = subprocess.run([str(BIN / "edge-controller"), "trial", str(trial), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    policy = json.loads((out / "report.json").read_text())["policies"]["heterogeneous"]
    assert [u["tokens"] for u in policy["users"]] == [6 * 48, 6 * 48]
    assert all(u["lossless"] for u in policy["users"]), policy["users"]

    faults = {f["kind"]: f for f in policy["chaos"]["faults"]}
    assert set(faults) == {"loss_burst", "link_down", "restart_controller"}
    assert all("ended_s" in f for f in faults.values())
    assert faults["loss_burst"]["uplink_dropped"] > 0  # the burst did drop packets
    down = faults["link_down"]
    assert down["ended_s"] - down["at_s"] >= 5.0
    rows = {(r["fault"], r["device"]): r for r in policy["chaos"]["recovery"]}
    # Nothing crosses a downed link: the roamer's longest gap spans the outage.
    assert rows[(down["label"], "roamer")]["longest_gap_s"] >= 4.5
    # The crash stops every device's commits until the new controller serves.
    restart = faults["restart_controller"]
    for device in ("steady", "roamer"):
        assert rows[(restart["label"], device)]["longest_gap_s"] > 0.5
    log = (out / "heterogeneous" / "controller.log").read_text()
    assert log.count("controller: serving") == 2  # the first run and the one after the crash
    assert "of them output" in log.replace("(0 of them output)", "")  # re-created requests
    assert (out / "chaos-heterogeneous.png").stat().st_size > 0
    assert "### Faults (heterogeneous)" in (out / "report.md").read_text()
