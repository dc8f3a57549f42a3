"""Trial files (configs/trials/*.toml): devices, their links and boards, the policies."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_controller.config import checked_table


class TrialError(ValueError):
    """A trial file that cannot be run; the message names the key."""


@dataclass(frozen=True)
class TrialDevice:
    name: str
    draft: str = "q4_0"  # registry name or GGUF path
    prompt: str = "Tell me about the history of the bicycle."
    draft_pace_s: float = 0.0  # emulate a slower board: at least this long per draft token
    spectral_efficiency: float = 3.0  # its (emulated) radio, bit/s/Hz
    delay_ms: float = 5.0  # one-way link delay
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float = 0.0  # tbf cap on the device's uplink; must sit above its paced rate


@dataclass(frozen=True)
class TrialSpec:
    name: str
    devices: tuple[TrialDevice, ...]
    description: str = ""
    policies: tuple[str, ...] = ("heterogeneous", "agnostic")
    bandwidth_hz: float = 1e6  # the uplink band the controller divides
    max_new_tokens: int = 32
    requests: int = 2  # per device and policy
    temperature: float = 0.0
    draft_top_k: int = 16  # sparse q size when sampling: what makes uploads large
    verifier_cpus: tuple[int, ...] = (0,)
    drafter_cpus: tuple[int, ...] = (1,)
    round_deadline_s: float = 1.0


def load_trial(path: str | Path) -> TrialSpec:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TrialError(f"trial file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise TrialError(f"{path}: not valid TOML: {exc}") from None
    devices = raw.pop("devices", None)
    if not isinstance(devices, list) or not devices:
        raise TrialError(f"{path}: needs at least one [[devices]] table")
    top = _typed(TrialSpec, raw, "trial", skip=("devices", "name"))
    spec = TrialSpec(
        name=str(raw.get("name", path.stem)),
        devices=tuple(TrialDevice(**_typed(TrialDevice, d, f"devices[{i}]"))
                      for i, d in enumerate(devices)),
        **top,
    )
    validate(spec)
    return spec


def _typed(cls, table: Any, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}
    if isinstance(table, dict):
        table = {k: v for k, v in table.items() if k not in skip}
    return checked_table(defaults, table, where, TrialError)


def validate(spec: TrialSpec) -> None:
    """Raise TrialError naming the first value that cannot run."""
    from edge_controller.control.solvers import POLICIES

    names = [d.name for d in spec.devices]
    checks = [
        (len(set(names)) == len(names), "device names must be distinct"),
        (all(n.replace("-", "").isalnum() and len(n) <= 32 for n in names),
         "device names: letters, digits and '-', at most 32 characters"),
        (len(spec.policies) > 0, "policies must name at least one policy"),
        (set(spec.policies) <= {"fixed", *POLICIES},
         f"policies must be among fixed, {', '.join(POLICIES)}"),
        (spec.bandwidth_hz > 0, "bandwidth_hz must be > 0"),
        (spec.max_new_tokens >= 1 and spec.requests >= 1, "max_new_tokens and requests >= 1"),
        (spec.temperature >= 0, "temperature must be >= 0"),
        (spec.verifier_cpus and spec.drafter_cpus, "verifier_cpus and drafter_cpus not empty"),
    ]
    for d in spec.devices:
        checks += [
            (min(d.draft_pace_s, d.delay_ms, d.jitter_ms, d.loss_pct, d.rate_mbit) >= 0,
             f"device {d.name}: times, loss and rate must be >= 0"),
            (d.loss_pct < 100 and d.spectral_efficiency > 0,
             f"device {d.name}: loss_pct < 100 and spectral_efficiency > 0"),
            (d.rate_mbit == 0 or d.rate_mbit * 1e6 > spec.bandwidth_hz * d.spectral_efficiency,
             f"device {d.name}: rate_mbit must exceed the largest paced rate "
             f"{spec.bandwidth_hz * d.spectral_efficiency / 1e6:g} Mbit/s (the pacer emulates "
             "the share; the cap only bounds the link)"),
        ]
    for ok, message in checks:
        if not ok:
            raise TrialError(f"trial {spec.name}: {message}")
