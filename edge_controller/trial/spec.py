"""Trial files (configs/trials/*.toml): devices, their links and boards, the policies."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_controller.config import ACCEPTANCE_MODELS, SCHEDULERS, checked_table


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


CHAOS_KINDS = ("link_down", "restart_controller", "loss_burst", "delay_step")
MAX_FAULT_S = 600.0


@dataclass(frozen=True)
class ChaosEvent:
    """A fault injected ``at_s`` seconds after a policy's devices start (docs/trials.md).

    ``link_down``: the device's interface is down for ``seconds`` (nothing gets through).
    ``restart_controller``: the controller is killed (-9, a crash) and started again.
    ``loss_burst``: ``percent`` of the device's uplink packets are lost for ``seconds``.
    ``delay_step``: the device's one-way link delay is ``delay_ms`` for ``seconds`` (delay
    drift: a step that outlasts the run holds to its end)."""

    at_s: float
    kind: str
    device: str = ""
    seconds: float = 0.0
    percent: float = 0.0
    delay_ms: float = 0.0

    @property
    def label(self) -> str:
        if self.kind == "restart_controller":
            return "controller restart"
        what = {"link_down": "down", "loss_burst": f"{self.percent:g}% loss",
                "delay_step": f"delay {self.delay_ms:g} ms"}[self.kind]
        return f"{self.device} {what} {self.seconds:g} s"


@dataclass(frozen=True)
class TrialSpec:
    name: str
    devices: tuple[TrialDevice, ...]
    description: str = ""
    policies: tuple[str, ...] = ("heterogeneous", "agnostic")
    acceptance: str = "geometric"  # the controller's control.acceptance: or "curve"
    # Each policy runs under each scheduler: report keys "POLICY" (sync) and
    # "POLICY@SCHEDULER" (docs/scheduling.md).
    schedulers: tuple[str, ...] = ("sync",)
    # The honest baselines on the same workload: "server-decode" (every device without a
    # drafter, continuous) and "target-alone" (the requests one after another).
    baselines: bool = True
    batch_tokens: int = 256  # continuous: tokens per forward
    predraft_len: int = 16  # proactive: tokens a device drafts past its upload at most
    bandwidth_hz: float = 1e6  # the uplink band the controller divides
    max_new_tokens: int = 32
    requests: int = 2  # per device and policy
    temperature: float = 0.0
    draft_top_k: int = 16  # sparse q size when sampling: what makes uploads large
    draft_len: int = 4  # control.draft_len: fixed and fixed-L's length, every first round
    verifier_cpus: tuple[int, ...] = (0,)
    drafter_cpus: tuple[int, ...] = (1,)
    round_deadline_s: float = 1.0
    chaos: tuple[ChaosEvent, ...] = ()


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
    chaos = raw.pop("chaos", [])
    if not isinstance(chaos, list):
        raise TrialError(f"{path}: chaos must be [[chaos]] tables")
    top = _typed(TrialSpec, raw, "trial", skip=("devices", "name", "chaos"))
    spec = TrialSpec(
        name=str(raw.get("name", path.stem)),
        devices=tuple(TrialDevice(**_typed(TrialDevice, d, f"devices[{i}]"))
                      for i, d in enumerate(devices)),
        chaos=tuple(_chaos(entry, f"chaos[{i}]") for i, entry in enumerate(chaos)),
        **top,
    )
    validate(spec)
    return spec


def _chaos(entry: Any, where: str) -> ChaosEvent:
    """``{at_s = 30, link_down = {device = "phone", seconds = 10}}`` and the like."""
    if not isinstance(entry, dict):
        raise TrialError(f"{where} must be a table")
    kinds = [k for k in CHAOS_KINDS if k in entry]
    if len(kinds) != 1:
        raise TrialError(f"{where} needs exactly one of {', '.join(CHAOS_KINDS)}")
    kind = kinds[0]
    top = checked_table({"at_s": 0.0, kind: dataclasses.MISSING}, entry, where, TrialError)
    if "at_s" not in top:
        raise TrialError(f"{where} needs at_s (seconds since the devices started)")
    if kind == "restart_controller":
        if entry[kind] is not True:
            raise TrialError(f"{where}.restart_controller must be true")
        return ChaosEvent(top["at_s"], kind)
    fields = {"device": dataclasses.MISSING, "seconds": dataclasses.MISSING}
    if kind == "loss_burst":
        fields["percent"] = dataclasses.MISSING
    if kind == "delay_step":
        fields["delay_ms"] = dataclasses.MISSING
    table = checked_table(fields, entry[kind], f"{where}.{kind}", TrialError)
    missing = set(fields) - set(table)
    if missing:
        raise TrialError(f"{where}.{kind} needs {', '.join(sorted(missing))}")
    for key in ("seconds", "percent", "delay_ms"):
        if key in table and (isinstance(table[key], bool)
                             or not isinstance(table[key], int | float)):
            raise TrialError(f"{where}.{kind}.{key} must be a number")
    if not isinstance(table["device"], str):
        raise TrialError(f"{where}.{kind}.device must be a device name")
    return ChaosEvent(top["at_s"], kind, table["device"], float(table["seconds"]),
                      float(table.get("percent", 0.0)), float(table.get("delay_ms", 0.0)))


def _typed(cls, table: Any, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}
    if isinstance(table, dict):
        table = {k: v for k, v in table.items() if k not in skip}
    return checked_table(defaults, table, where, TrialError)


def _server_problem(spec: TrialSpec) -> str | None:
    """What the controller would say about the trial's server keys (its own checks)."""
    from edge_controller.config import ConfigError, load_config

    try:
        load_config(None, server__batch_tokens=spec.batch_tokens,
                    server__predraft_len=spec.predraft_len, control__draft_len=spec.draft_len)
    except ConfigError as exc:
        return str(exc)
    return None


def validate(spec: TrialSpec) -> None:
    """Raise TrialError naming the first value that cannot run."""
    from edge_controller.config import policy_names

    names = [d.name for d in spec.devices]
    checks = [
        (len(set(names)) == len(names), "device names must be distinct"),
        (all(n.replace("-", "").isalnum() and len(n) <= 32 for n in names),
         "device names: letters, digits and '-', at most 32 characters"),
        (len(spec.policies) > 0, "policies must name at least one policy"),
        (len(spec.schedulers) > 0 and set(spec.schedulers) <= set(SCHEDULERS),
         f"schedulers must be among {', '.join(SCHEDULERS)}"),
        (_server_problem(spec) is None, f"{_server_problem(spec)}"),
        (set(spec.policies) <= set(policy_names()),
         f"policies must be among {', '.join(policy_names())}"),
        (spec.acceptance in ACCEPTANCE_MODELS,
         f"acceptance must be one of {', '.join(ACCEPTANCE_MODELS)}"),
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
    for i, c in enumerate(spec.chaos):
        where = f"chaos[{i}] ({c.kind})"
        checks += [
            (0 <= c.at_s <= 3600, f"{where}: at_s must be in 0..3600"),
            (c.kind == "restart_controller" or c.device in names,
             f"{where}: device {c.device!r} is not one of the trial's devices"),
            (c.kind == "restart_controller" or 0 < c.seconds <= MAX_FAULT_S,
             f"{where}: seconds must be in (0, {MAX_FAULT_S:g}]"),
            (c.kind != "loss_burst" or 0 < c.percent < 100,
             f"{where}: percent must be in (0, 100) (a link down is link_down)"),
            (c.kind != "delay_step" or 0 <= c.delay_ms <= 10_000,
             f"{where}: delay_ms must be in 0..10000"),
        ]
    for ok, message in checks:
        if not ok:
            raise TrialError(f"trial {spec.name}: {message}")
