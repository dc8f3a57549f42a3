"""Scenario validation (one test per bad value) and the ``plan`` command."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from edge_controller.cli import main
from edge_controller.control.model import PositionAcceptance
from edge_controller.control.scenario import ScenarioError, load_scenario, parse_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "configs" / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.toml"))
ENTRY_POINT = "import sys; from edge_controller.cli import main; sys.exit(main())"


def small() -> dict:
    return tomllib.loads((SCENARIOS / "small-heterogeneous.toml").read_text())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenarios_load(path):
    scenario = load_scenario(path)
    assert scenario.users.num_users == len(tomllib.loads(path.read_text())["users"])
    assert scenario.system.verify_time.base_s > 0


def test_defaults_and_acceptance_limits_are_legal():
    data = small()
    del data["system"]["overhead_bits"], data["system"]["max_draft_len"]
    del data["users"][0]["delay_s"]
    data["users"][0]["acceptance"] = 1
    data["users"][1]["acceptance"] = 0
    scenario = parse_scenario(data)
    assert scenario.system.overhead_bits == 0 and scenario.system.max_draft_len == 16
    assert scenario.users.delay_s[0] == 0
    np.testing.assert_array_equal(scenario.users.acceptance.rate[:2], [1.0, 0.0])


def test_per_position_curve_is_padded_with_its_last_value():
    data = small()
    data["users"][0]["acceptance"] = [0.9, 0.7]
    acceptance = parse_scenario(data).users.acceptance
    assert isinstance(acceptance, PositionAcceptance)
    np.testing.assert_allclose(acceptance.probs[:4, 0], [0.9, 0.7, 0.7, 0.7])
    np.testing.assert_allclose(acceptance.probs[:, 1], 0.6)


def edit(path: tuple, value) -> dict:
    data = small()
    table = data
    for key in path[:-1]:
        table = table[key]
    if value is KeyError:
        del table[path[-1]]
    else:
        table[path[-1]] = value
    return data


BAD = {
    "negative draft time": (("users", 0, "draft_s_per_token"), -0.01, ">= 0"),
    "negative delay": (("users", 1, "delay_s"), -1.0, ">= 0"),
    "acceptance above 1": (("users", 0, "acceptance"), 1.2, r"\[0, 1\]"),
    "acceptance below 0": (("users", 0, "acceptance"), -0.1, r"\[0, 1\]"),
    "curve outside [0, 1]": (("users", 0, "acceptance"), [0.9, 1.5], r"\[0, 1\]"),
    "empty curve": (("users", 0, "acceptance"), [], "empty"),
    "acceptance as text": (("users", 0, "acceptance"), "high", r"\[0, 1\]"),
    "zero spectral efficiency": (("users", 2, "spectral_efficiency"), 0.0, "no bandwidth share"),
    "zero bandwidth": (("system", "bandwidth_hz"), 0, "no share can carry"),
    "negative bits": (("system", "bits_per_token"), -17, ">= 0"),
    "negative verify time": (("system", "verify_time", "per_token_s"), -1e-4, ">= 0"),
    "zero verify base": (("system", "verify_time", "base_s"), 0.0, "cannot take no time"),
    "infinite delay": (("users", 0, "delay_s"), float("inf"), "finite"),
    "boolean bandwidth": (("system", "bandwidth_hz"), True, "finite number"),
    "fractional max draft": (("system", "max_draft_len"), 4.5, "integer"),
    "max draft too large": (("system", "max_draft_len"), 1000, "0..64"),
    "unknown system key": (("system", "bandwith_hz"), 1e6, "unknown key"),
    "unknown user key": (("users", 0, "accept"), 0.5, "unknown key"),
    "unknown top-level key": (("extra",), 1, "unknown key"),
    "missing acceptance": (("users", 0, "acceptance"), KeyError, "missing key"),
    "missing verify time": (("system", "verify_time"), KeyError, "missing key"),
    "duplicate name": (("users", 1, "name"), "orin-nano-code", "duplicate"),
    "empty name": (("users", 1, "name"), "", "non-empty"),
    "no users": (("users",), [], "at least one"),
    "users not a table": (("users",), [1, 2], "expected a table"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_values_are_rejected_clearly(case):
    path, value, message = BAD[case]
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(edit(path, value))


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[system\n")
    with pytest.raises(ScenarioError, match="invalid TOML"):
        load_scenario(bad)


def test_plan_json_has_the_documented_keys(capsys):
    path = SCENARIOS / "small-heterogeneous.toml"
    assert main(["plan", str(path), "--policy", "heterogeneous", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"policy", "goodput_tok_s", "solve_s", "users"} <= set(report)
    assert report["policy"] == "heterogeneous"
    assert [u["name"] for u in report["users"]] == list(load_scenario(path).users.names)
    for user in report["users"]:
        assert set(user) == {"name", "draft_len", "bandwidth_share", "goodput_tok_s"}
    total = sum(u["goodput_tok_s"] for u in report["users"])
    assert total == pytest.approx(report["goodput_tok_s"])


def test_plan_table_names_every_user(capsys):
    path = SCENARIOS / "cell-8-greedy.toml"
    assert main(["plan", str(path), "--policy", "fixed-L"]) == 0
    out = capsys.readouterr().out
    for name in load_scenario(path).users.names:
        assert name in out
    assert "goodput" in out


def test_plan_bad_file_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    text = (SCENARIOS / "small-heterogeneous.toml").read_text()
    bad.write_text(text.replace("acceptance = 0.9", "acceptance = 1.5"))
    result = subprocess.run(
        [sys.executable, "-c", ENTRY_POINT, "plan", str(bad), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "acceptance" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
