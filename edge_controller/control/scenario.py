"""Scenario files (TOML) parsed once into typed parameters, with clear errors.

[system]
bandwidth_hz = 10e6
bits_per_token = 17            # greedy ids; sparse or full-distribution uploads cost more
overhead_bits = 0              # b0 per upload message (default 0)
max_draft_len = 16             # default 16
verify_time = { base_s = 0.025, per_token_s = 0.0004 }
[[users]]
name = "orin-nano-1"
draft_s_per_token = 0.015
acceptance = 0.8               # geometric rate, or a per-position curve [0.9, 0.8, ...]
spectral_efficiency = 3.0      # bit/s/Hz
delay_s = 0.01                 # default 0
[[drift]]                      # optional, for `edge-controller simulate`: at at_s (simulated
at_s = 20.0                    # seconds) the user (a name, or "*" for every user) takes new
user = "orin-nano-1"           # values of any of delay_s, acceptance, draft_s_per_token,
delay_s = 0.05                 # spectral_efficiency
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_controller.control.model import (
    GeometricAcceptance,
    PositionAcceptance,
    SystemParams,
    UserParams,
    VerifyTime,
)

MAX_DRAFT_LEN_LIMIT = 64
MAX_BITS = 1e12  # per token or message: a full 16-bit distribution over 49,152 tokens is 8e5
MAX_DRIFTS = 1000
USER_KEYS = ("draft_s_per_token", "acceptance", "spectral_efficiency", "delay_s")


class ScenarioError(ValueError):
    """A scenario file that cannot describe a servable system."""


@dataclass(frozen=True)
class Drift:
    """At ``at_s`` simulated seconds, ``user`` ("*": all) takes the values in ``changes``."""

    at_s: float
    user: str
    changes: dict[str, float | list[float]]


@dataclass(frozen=True)
class Scenario:
    name: str
    system: SystemParams
    users: UserParams  # the truth at t = 0
    description: str = ""
    drift: tuple[Drift, ...] = ()  # in time order
    rows: tuple[dict[str, Any], ...] = field(default=(), repr=False)  # users as parsed

    def change_times(self) -> list[float]:
        """The distinct times > 0 at which some drift applies, in order."""
        return sorted({d.at_s for d in self.drift if d.at_s > 0})

    def users_at(self, t: float) -> UserParams:
        """The users' true parameters at simulated time ``t`` (drifts at or before it)."""
        rows = [dict(row) for row in self.rows]
        for drift in self.drift:  # in time order
            if drift.at_s > t:
                break
            for row in rows:
                if drift.user in ("*", row["name"]):
                    row.update(drift.changes)
        return _users(rows, self.system)


def _check_keys(table: dict[str, Any], where: str, required: set[str], optional: set[str]) -> None:
    if not isinstance(table, dict):
        raise ScenarioError(f"{where}: expected a table, got {type(table).__name__}")
    unknown = set(table) - required - optional
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {sorted(unknown)}")
    missing = required - set(table)
    if missing:
        raise ScenarioError(f"{where}: missing key(s) {sorted(missing)}")


def _number(table: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"{where}.{key}: expected a finite number, got {value!r}")
    if value < 0:
        raise ScenarioError(f"{where}.{key} must be >= 0, got {value}")
    return float(value)


def _positive(table: dict[str, Any], key: str, where: str, why: str) -> float:
    value = _number(table, key, where)
    if value == 0:
        raise ScenarioError(f"{where}.{key} is 0: {why}")
    return value


def _bits(table: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = _number(table, key, where, default)
    if value > MAX_BITS:
        raise ScenarioError(f"{where}.{key} = {value:g} is absurd (at most {MAX_BITS:g} bits)")
    return value


def _acceptance(value: Any, where: str) -> float | list[float]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ScenarioError(f"{where}.acceptance: empty per-position curve")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            raise ScenarioError(f"{where}.acceptance: expected numbers in [0, 1], got {v!r}")
    return [float(v) for v in values] if isinstance(value, list) else float(value)


def _system(table: Any) -> SystemParams:
    where = "system"
    _check_keys(
        table,
        where,
        {"bandwidth_hz", "bits_per_token", "verify_time"},
        {"overhead_bits", "max_draft_len"},
    )
    verify = table["verify_time"]
    _check_keys(verify, f"{where}.verify_time", {"base_s", "per_token_s"}, set())
    max_len = table.get("max_draft_len", 16)
    if isinstance(max_len, bool) or not isinstance(max_len, int):
        raise ScenarioError(f"{where}.max_draft_len: expected an integer, got {max_len!r}")
    if not 0 <= max_len <= MAX_DRAFT_LEN_LIMIT:
        raise ScenarioError(f"{where}.max_draft_len must be in 0..{MAX_DRAFT_LEN_LIMIT}")
    return SystemParams(
        bandwidth_hz=_positive(table, "bandwidth_hz", where, "no share can carry an upload"),
        bits_per_token=_bits(table, "bits_per_token", where),
        overhead_bits=_bits(table, "overhead_bits", where, 0.0),
        max_draft_len=max_len,
        verify_time=VerifyTime(
            _positive(verify, "base_s", f"{where}.verify_time", "a round cannot take no time"),
            _number(verify, "per_token_s", f"{where}.verify_time"),
        ),
    )


def _user_values(row: dict[str, Any], where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keys`` present in ``row``, validated."""
    values: dict[str, Any] = {}
    for key in keys:
        if key not in row:
            continue
        if key == "acceptance":
            values[key] = _acceptance(row[key], where)
        elif key == "spectral_efficiency":
            values[key] = _positive(row, key, where, "no bandwidth share can serve this user")
        else:
            values[key] = _number(row, key, where)
    return values


def _users(rows: list[dict[str, Any]], system: SystemParams) -> UserParams:
    accept = [row["acceptance"] for row in rows]
    if all(isinstance(a, float) for a in accept):
        acceptance = GeometricAcceptance(np.array(accept))
    else:  # per-position curves, padded by repeating their last position
        depth = max(system.max_draft_len, 1)
        curves = [a if isinstance(a, list) else [a] for a in accept]
        acceptance = PositionAcceptance(np.array([(c + c[-1:] * depth)[:depth] for c in curves]).T)
    column = {key: np.array([row[key] for row in rows]) for key in USER_KEYS if key != "acceptance"}
    return UserParams(
        column["draft_s_per_token"], acceptance, column["spectral_efficiency"],
        column["delay_s"], tuple(row["name"] for row in rows),
    )


def _drift(entries: Any, names: list[str]) -> tuple[Drift, ...]:
    if not isinstance(entries, list):
        raise ScenarioError("[[drift]] must be an array of tables")
    if len(entries) > MAX_DRIFTS:
        raise ScenarioError(f"{len(entries)} [[drift]] entries: at most {MAX_DRIFTS}")
    drift = []
    for i, entry in enumerate(entries):
        where = f"drift[{i}]"
        _check_keys(entry, where, {"at_s", "user"}, set(USER_KEYS))
        if entry["user"] != "*" and entry["user"] not in names:
            raise ScenarioError(f"{where}.user: {entry['user']!r} is not a name in [[users]]"
                                ' (or "*" for every user)')
        changes = _user_values(entry, where, USER_KEYS)
        if not changes:
            raise ScenarioError(f"{where}: changes nothing; give new values of {USER_KEYS}")
        drift.append(Drift(_number(entry, "at_s", where), entry["user"], changes))
    return tuple(sorted(drift, key=lambda d: d.at_s))  # stable: file order at equal times


def parse_scenario(data: dict[str, Any], name: str = "scenario") -> Scenario:
    """Validate a decoded TOML document and build the typed scenario."""
    _check_keys(data, name, {"system", "users"}, {"description", "drift"})
    system = _system(data["system"])
    table = data["users"]
    if not isinstance(table, list) or not table:
        raise ScenarioError(f"{name}: [[users]] must list at least one device")
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(table):
        where = f"users[{i}]"
        _check_keys(row, where, {"name", *USER_KEYS} - {"delay_s"}, {"delay_s"})
        if not isinstance(row["name"], str) or not row["name"]:
            raise ScenarioError(f"{where}.name: expected a non-empty string")
        where = f"users[{i}] ({row['name']})"
        if row["name"] in [r["name"] for r in rows]:
            raise ScenarioError(f"{where}: duplicate user name")
        rows.append({"name": row["name"], "delay_s": 0.0, **_user_values(row, where, USER_KEYS)})
    drift = _drift(data.get("drift", []), [r["name"] for r in rows])
    scenario = Scenario(name, system, _users(rows, system), str(data.get("description", "")),
                        drift, tuple(rows))
    return replace(scenario, users=scenario.users_at(0.0))  # drifts at 0 s included


# Upload laws: greedy ids, sparse top-8 (id + probability), the full distribution.
UPLOAD_BITS = (17.0, 264.0, 786432.0)


def random_problem(
    num_users: int,
    seed: int = 0,
    bits_per_token: float = 17.0,
    overhead_bits: float = 800.0,
    curves: bool = False,
    verify_per_token_s: float = 0.0004,
) -> tuple[SystemParams, UserParams]:
    """A random system over DESIGN.md's realistic ranges (draft 10-80 ms/token, acceptance
    0.4-0.95, 0.5-7 bit/s/Hz, delay 5-50 ms; B = 20 MHz, L_max = 16, T_v = 25 ms + 0.4 ms
    per token), for benchmarks and solver references. ``curves``: per-position acceptance
    that decays along the draft (heavy-headed pairs) instead of a geometric rate."""
    rng = np.random.default_rng(seed)
    verify_time = VerifyTime(0.025, verify_per_token_s)
    system = SystemParams(20e6, bits_per_token, verify_time, overhead_bits, 16)
    draft_s = rng.uniform(0.010, 0.080, num_users)
    rate = rng.uniform(0.40, 0.95, num_users)
    efficiency = rng.uniform(0.5, 7.0, num_users)
    delay = rng.uniform(0.005, 0.050, num_users)
    acceptance = (
        PositionAcceptance(rate * rng.uniform(0.85, 1.0, (16, num_users)).cumprod(axis=0) ** 0.25)
        if curves
        else GeometricAcceptance(rate)
    )
    users = UserParams(draft_s, acceptance, efficiency, delay)
    return system, users


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; every problem raises ScenarioError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ScenarioError(f"cannot read {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: invalid TOML: {err}") from None
    return parse_scenario(data, path.stem)
