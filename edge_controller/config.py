"""Controller configuration: TOML parsed once into typed dataclasses, with clear errors."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edge_controller.protocol import MAX_DRAFT_TOKENS, MAX_FRAME_BYTES

T = TypeVar("T")
SCHEDULERS = ("sync", "continuous", "proactive")
# Acceptance models draft control plans with: one rate per device, or its measured
# per-position curve (docs/system-model.md, "Acceptance curves").
ACCEPTANCE_MODELS = ("geometric", "curve")
CONFIDENCE_POLICY = "confidence"  # caps and stopping thresholds (control/confidence.py)


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    # "sync": rounds wait for every member's draft (or round_deadline_s); "continuous":
    # the verifier runs whenever it is free, on every draft in, up to batch_tokens per
    # forward; "proactive": continuous, and devices draft on while their draft is
    # verified, up to predraft_len tokens past it (docs/scheduling.md).
    scheduler: str = "sync"
    batch_tokens: int = 256  # continuous: tokens per forward (drafts + 1 each, prefill)
    predraft_len: int = 16  # proactive: the most tokens a device drafts past its upload
    round_deadline_s: float = 0.25
    session_timeout_s: float = 5.0  # no heartbeat (every 1 s) this long: registration dropped
    metrics_port: int = 0  # Prometheus /metrics on metrics_bind:PORT; 0 = off
    metrics_bind: str = "127.0.0.1"  # unauthenticated: loopback unless you mean otherwise
    # Append one JSON line per start ("serving", with the wall clock), per round and per
    # plan here (trials, plots); "t" counts seconds from the start.
    timeline: str = ""


@dataclass
class SecurityConfig:
    """docs/security.md. ``keys_dir``: CURVE keys and the allowlist (``edge-controller keys``).
    Without it the controller refuses to start unless ``insecure`` (plain TCP, loopback only
    unless ``insecure_anywhere``)."""

    keys_dir: str = ""
    insecure: bool = False
    insecure_anywhere: bool = False


@dataclass
class TargetConfig:
    model: str = "default"
    gguf: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    # Soaks and capacity studies only (docs/soak.md): no model; verdicts are replayed from
    # this trace file's recorded target outputs, each forward sleeping a + b x its tokens
    # (replay_verify_time, s and s/token: by default an assumed GPU-class fit).
    replay: str = ""
    replay_verify_time: tuple[float, ...] = (0.006, 2e-5)


@dataclass
class LimitsConfig:
    """What one device may cost the others (docs/limits.md)."""

    max_sessions: int = 16  # KV slots: requests in flight at once
    max_devices: int = 1024  # registrations (devices known to the controller) at once
    max_len: int = 2048
    max_new_tokens: int = 1024
    prefill_chunk: int = 64  # prompt tokens prefilled per round (mixed into its forward)
    idle_rounds: int = 8  # a request with no draft for this many rounds in a row...
    idle_s: float = 5.0  # ...and at least this long is ended, its KV slot freed
    max_request_s: float = 900.0  # a request still going after this long is ended
    messages_per_s: float = 200.0  # per device: frames beyond this rate are dropped...
    message_burst: int = 400  # ...after a burst of this many
    bytes_per_s: float = 512.0 * 2**10  # per device: frame bytes beyond this rate are dropped...
    bytes_burst: int = 2**20  # ...after a burst of this many (an uplink probe: 256 KiB)


@dataclass
class ControlConfig:
    """Draft control. ``policy`` = "fixed" (``draft_len`` for all, unpaced uploads), a
    solver of edge_controller/control (heterogeneous, homogeneous, agnostic, ...), or an
    online one (online, online-naive, online-discounted, online-contextual: a bandit over
    draft lengths per device, control/bandit.py; synchronous rounds only), or
    "confidence" (caps and per-device stopping thresholds, control/confidence.py;
    synchronous rounds only)."""

    policy: str = "heterogeneous"
    draft_len: int = 4  # fixed and fixed-L policies, and every device's first rounds
    acceptance: str = "geometric"  # the model plans assume: one of ACCEPTANCE_MODELS
    max_draft_len: int = 16
    bandwidth_hz: float = 10e6  # B: the uplink band the shares divide (FDMA)
    spectral_efficiency: float = 3.0  # s_k of a device that reports none (bit/s/Hz)
    bits_per_token: float = 24.0  # b and b0 until a device's own frames give a fit
    overhead_bits: float = 800.0
    resolve_interval_s: float = 1.0  # re-solve at most this often...
    resolve_threshold: float = 0.1  # ...and only when an estimate moved by this fraction
    verify_time_file: str = ""  # T_v fit of scripts/bench_verify.py --sweep; "" = calibrate
    online_exploration: float = 0.3  # online*: c of the bandits' confidence bonus
    online_discount: float = 0.99  # online-discounted: each round keeps this of the past
    online_delay_buckets_ms: tuple[float, ...] = (25.0, 50.0, 100.0)  # online-contextual
    # confidence: one stopping threshold h for every device (a multiple of 0.1), the caps
    # planned for it; 0: the controller chooses h per device
    stop_confidence: float = 0.0


@dataclass
class ControllerConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    def validate(self) -> ControllerConfig:
        checks = [
            (self.server.scheduler in SCHEDULERS,
             f"server.scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.control.max_draft_len + 1 <= self.server.batch_tokens <= 1 << 16,
             "server.batch_tokens must hold the longest draft (control.max_draft_len + 1) "
             "and be at most 65536"),
            (2 <= self.server.predraft_len <= MAX_DRAFT_TOKENS,
             f"server.predraft_len must be in 2..{MAX_DRAFT_TOKENS} (the guess and a token)"),
            (self.server.round_deadline_s > 0, "server.round_deadline_s must be > 0"),
            (self.server.session_timeout_s > 0, "server.session_timeout_s must be > 0"),
            (self.target.dtype in ("float32", "float16", "bfloat16"),
             "target.dtype must be float32, float16 or bfloat16"),
            (self.target.device.split(":")[0] in ("cpu", "cuda"),
             "target.device must be cpu or cuda"),
            (len(self.target.replay_verify_time) == 2
             and all(0 <= x < 10 for x in self.target.replay_verify_time),
             "target.replay_verify_time must be [a, b] in seconds and seconds per token"),
            (1 <= self.limits.max_sessions <= 4096, "limits.max_sessions must be in 1..4096"),
            (1 <= self.limits.max_devices <= 1_000_000,
             "limits.max_devices must be in 1..1000000"),
            (self.limits.max_len >= 16, "limits.max_len must be >= 16"),
            (1 <= self.limits.max_new_tokens < self.limits.max_len,
             "limits.max_new_tokens must be in 1..max_len-1"),
            (1 <= self.limits.prefill_chunk <= self.limits.max_len,
             "limits.prefill_chunk must be in 1..max_len"),
            (self.limits.idle_rounds >= 1 and self.limits.idle_s > 0
             and self.limits.max_request_s > 0,
             "limits.idle_rounds must be >= 1, limits.idle_s and max_request_s > 0"),
            (self.limits.messages_per_s > 0 and self.limits.message_burst >= 1
             and self.limits.bytes_per_s > 0 and self.limits.bytes_burst >= MAX_FRAME_BYTES,
             "limits.messages_per_s and bytes_per_s must be > 0, message_burst >= 1, "
             f"bytes_burst >= {MAX_FRAME_BYTES} (one largest frame)"),
            (1 <= self.control.max_draft_len <= MAX_DRAFT_TOKENS,
             f"control.max_draft_len must be in 1..{MAX_DRAFT_TOKENS}"),
            (0 <= self.control.draft_len <= self.control.max_draft_len,
             "control.draft_len must be in 0..max_draft_len"),
            (self.control.policy in policy_names(),
             f"control.policy must be one of {policy_names()}"),
            (self.control.acceptance in ACCEPTANCE_MODELS,
             f"control.acceptance must be one of {', '.join(ACCEPTANCE_MODELS)}"),
            (self.control.bandwidth_hz > 0, "control.bandwidth_hz must be > 0"),
            (self.control.spectral_efficiency > 0, "control.spectral_efficiency must be > 0"),
            (self.control.bits_per_token > 0 and self.control.overhead_bits >= 0,
             "control.bits_per_token must be > 0 and control.overhead_bits >= 0"),
            (self.control.resolve_interval_s >= 0 and self.control.resolve_threshold >= 0,
             "control.resolve_interval_s and resolve_threshold must be >= 0"),
            (0 <= self.control.online_exploration <= 100,
             "control.online_exploration must be in 0..100"),
            (0 < self.control.online_discount <= 1, "control.online_discount must be in (0, 1]"),
            (len(self.control.online_delay_buckets_ms) <= 16
             and list(self.control.online_delay_buckets_ms)
             == sorted(set(self.control.online_delay_buckets_ms))
             and all(0 < b < 1e5 for b in self.control.online_delay_buckets_ms),
             "control.online_delay_buckets_ms: at most 16 ascending delays in (0, 1e5) ms"),
            (not self.control.policy.startswith("online") or self.server.scheduler == "sync",
             "the online policies learn from synchronous rounds: server.scheduler = \"sync\""),
            (round(self.control.stop_confidence * 10) == self.control.stop_confidence * 10
             and 0 <= self.control.stop_confidence < 1,
             "control.stop_confidence must be 0 (chosen per device) or one of 0.1 .. 0.9"),
            (self.control.policy != CONFIDENCE_POLICY or self.server.scheduler == "sync",
             "the confidence policy plans synchronous rounds: server.scheduler = \"sync\""),
        ]
        require(checks)
        return self


def policy_names() -> list[str]:
    from edge_controller.control.bandit import ONLINE_POLICIES
    from edge_controller.control.solvers import POLICIES

    return ["fixed", *POLICIES, *ONLINE_POLICIES, CONFIDENCE_POLICY]


def load_config(path: str | Path | None = None, **overrides: Any) -> ControllerConfig:
    """Read a controller TOML file (defaults when ``path`` is None).

    ``overrides`` are ``section__key=value`` pairs from the command line, e.g.
    ``server__bind="tcp://0.0.0.0:5555"``.
    """
    return load_sections(ControllerConfig, path, overrides).validate()


def load_sections(cls: type[T], path: str | Path | None, overrides: dict[str, Any]) -> T:
    """A config dataclass of sections (each a dataclass) from a TOML file and
    ``section__key`` overrides, every key and type checked (not yet validated)."""
    raw = read_toml(path, "config file") if path is not None else {}
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    sections = {f.name for f in dataclasses.fields(cls)}
    config = cls()
    for name, table in raw.items():
        if name not in sections:
            raise ConfigError(f"unknown config section [{name}] (known: {', '.join(sections)})")
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        section = getattr(config, name)
        defaults = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)}
        setattr(config, name, dataclasses.replace(section, **checked_table(defaults, table, name)))
    return config


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file's tables; ConfigError saying what is wrong with it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def require(checks: list[tuple[bool, str]]) -> None:
    """ConfigError with the message of the first check that fails."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def checked_table(
    defaults: dict[str, Any], table: Any, where: str, error: type[Exception] = ConfigError
) -> dict[str, Any]:
    """``table``'s values checked against ``defaults`` (key -> default value, or
    ``dataclasses.MISSING`` for a required key of any type). Unknown keys and wrong types
    raise ``error`` naming the key; integers are taken for floats, lists for tuples."""
    if not isinstance(table, dict):
        raise error(f"{where} must be a table")
    out = {}
    for key, value in table.items():
        if key not in defaults:
            raise error(f"unknown key {where}.{key} (known: {', '.join(defaults)})")
        default = defaults[key]
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not dataclasses.MISSING and (
            not isinstance(value, type(default))
            or isinstance(value, bool) != isinstance(default, bool)
        ):
            kind = "list" if isinstance(default, tuple) else type(default).__name__
            raise error(f"{where}.{key} must be a {kind}, got {value!r}")
        out[key] = value
    return out
