"""Jetson board telemetry. No board exists here: the tegrastats lines below are SYNTHETIC,
written from NVIDIA's documented tegrastats format for each board (L4T 35/36), not
recordings of a board."""

from __future__ import annotations

import sys
import time

import msgpack
import pytest

from device_agent.board import BoardMonitor, board_figures, parse_nvpmodel, parse_tegrastats
from edge_controller import protocol as P
from edge_controller.metrics import ControllerMetrics

SYNTHETIC_ORIN_NANO = (
    "RAM 2448/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) CPU [2%@1510,1%@1510,0%@1510,"
    "5%@1510,off,off] EMC_FREQ 0% GR3D_FREQ 12% cpu@47.031C soc2@46.125C soc0@46.156C "
    "gpu@47.75C tj@47.75C soc1@46.968C VDD_IN 4813mW/4813mW VDD_CPU_GPU_CV 482mW/482mW "
    "VDD_SOC 1448mW/1448mW")
SYNTHETIC_AGX_ORIN = (
    "08-27-2025 15:20:50 RAM 4694/30623MB (lfb 6015x4MB) SWAP 0/15311MB (cached 0MB) "
    "CPU [10%@729,0%@729,0%@729,0%@729,20%@729,0%@729,0%@729,0%@729,0%@2201,0%@2201,"
    "0%@2201,30%@2201] EMC_FREQ 3%@2133 GR3D_FREQ 45%@[1300,1300] NVENC off NVDEC off "
    "NVJPG off NVJPG1 off VIC off OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 "
    "CV0@-256C CPU@45.531C Tboard@33C SOC2@41.531C Tdiode@34.5C SOC0@41.968C CV1@-256C "
    "GPU@39.406C tj@45.531C SOC1@42.125C CV2@-256C VDD_GPU_SOC 2793mW/2793mW "
    "VDD_CPU_CV 399mW/399mW VIN_SYS_5V0 3931mW/3931mW VDDQ_VDD2_1V8AO 604mW/604mW")
SYNTHETIC_NVPMODEL = "NV Power Mode: MAXN\n0\n"


def test_orin_nano_line():
    state = parse_tegrastats(SYNTHETIC_ORIN_NANO)
    assert (state.ram_used_mb, state.ram_total_mb, state.swap_total_mb) == (2448, 7620, 3810)
    assert state.cpu_percent_per_core == [2, 1, 0, 5] and state.cores_online == 4
    assert state.cpu_percent == pytest.approx(2.0)
    assert (state.emc_percent, state.gpu_percent) == (0.0, 12.0)
    assert state.temperatures_c["gpu"] == 47.75 and len(state.temperatures_c) == 6
    assert state.power_mw == {"VDD_IN": 4813, "VDD_CPU_GPU_CV": 482, "VDD_SOC": 1448}
    assert state.power_total_mw == 4813  # the input rail, not the sum


def test_agx_orin_line():
    state = parse_tegrastats(SYNTHETIC_AGX_ORIN)
    assert state.cores_online == 12 and state.cpu_percent == pytest.approx(60 / 12)
    assert (state.emc_percent, state.gpu_percent) == (3.0, 45.0)
    assert "cv0" not in state.temperatures_c  # -256C: a powered-down sensor
    assert state.temperatures_c["tboard"] == 33.0 and state.temperatures_c["cpu"] == 45.531
    assert state.power_total_mw == 3931 and state.power_mw["VDD_GPU_SOC"] == 2793


def test_lines_that_are_not_tegrastats_and_missing_fields():
    assert parse_tegrastats("") is None
    assert parse_tegrastats("tegrastats: permission denied") is None
    bare = parse_tegrastats("RAM 100/200MB")
    assert bare.cpu_percent is None and bare.gpu_percent is None and bare.power_total_mw is None
    assert parse_nvpmodel(SYNTHETIC_NVPMODEL) == ("MAXN", 0)
    assert parse_nvpmodel("NV Power Mode: 15W\n") == ("15W", None)
    assert parse_nvpmodel("nvpmodel: not supported") == (None, None)


def test_monitor_reads_a_running_tegrastats(tmp_path):
    """A stand-in for the tool: prints the synthetic lines at its interval, as it would."""
    script = tmp_path / "tegrastats"
    script.write_text(
        "import sys, time\n"
        f"lines = [{SYNTHETIC_ORIN_NANO!r}, 'garbage', {SYNTHETIC_AGX_ORIN!r}]\n"
        "for line in lines:\n    print(line, flush=True)\n    time.sleep(0.05)\n"
        "time.sleep(30)\n")
    nvpmodel = tmp_path / "nvpmodel"
    nvpmodel.write_text(f"#!/bin/sh\nprintf '{SYNTHETIC_NVPMODEL}'\n")
    nvpmodel.chmod(0o755)
    monitor = BoardMonitor(command=[sys.executable, str(script)], nvpmodel=str(nvpmodel)).start()
    try:
        deadline = time.monotonic() + 10
        while (state := monitor.state()) is None or state.cores_online != 12:
            assert time.monotonic() < deadline, "the monitor never read the AGX line"
            time.sleep(0.05)
        assert (state.power_mode, state.power_mode_id) == ("MAXN", 0)
    finally:
        monitor.stop()
    assert monitor._process.poll() is not None  # stopped with the monitor


def test_board_telemetry_travels_in_protocol_4_and_later():
    board = parse_tegrastats(SYNTHETIC_AGX_ORIN).to_dict()
    frame = P.encode(P.Telemetry(host={}, board=board))
    assert len(frame) < P.FRAME_LIMITS["telemetry"]
    assert P.decode(frame).board == board
    v6 = msgpack.packb({"v": 6, "type": "telemetry", "draft_s_per_token": 0.01, "board": board})
    assert P.decode_versioned(v6)[0].board == board  # version 6 devices are still served
    old = msgpack.packb({"v": 3, "type": "telemetry", "draft_s_per_token": 0.01, "board": board})
    with pytest.raises(P.ProtocolError, match="unknown or repeated field"):
        P.decode_versioned(old, (3, 4))  # not a field of version 3


def test_the_controller_keeps_only_finite_numbers_of_a_board_map():
    hostile = {"cpu_percent": "lots", "gpu_percent": float("nan"), "ram_used_mb": True,
               "power_total_mw": 5000, "temperatures_c": {"a": "hot", "b": 50.5, "c": None}}
    assert board_figures(hostile) == {"power_total_mw": 5000.0, "temperature_max_c": 50.5}
    metrics = ControllerMetrics()
    metrics.show_board("dev", hostile)
    metrics.show_board("dev", {"temperatures_c": ["not", "a", "map"]})
    value = metrics.registry.get_sample_value("multispin_device_board",
                                              {"device": "dev", "figure": "power_total_mw"})
    assert value == 5000.0
