"""``device-agent serve``'s configuration: a TOML file (configs/agent.example.toml) and the
command line's flags over it, checked as the controller's config is."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_controller.config import ConfigError, load_sections, require
from edge_controller.protocol import MAX_TOP_K
from edge_controller.transport import is_loopback_host

DEFAULT_HTTP = "127.0.0.1:8080"


@dataclass
class ControllerSection:
    endpoint: str = ""  # tcp://HOST:PORT of the edge controller
    key: str = ""  # the controller's public key (Z85) or its controller.key file
    keys_dir: str = ""  # this device's keys (device-agent keys init)
    insecure: bool = False  # plain TCP, for a controller started with --insecure (tests)
    device_id: str = ""  # with keys: checked against the name the key is listed under
    timeout_s: float = 10.0  # no answer this long: the link counts as lost
    resume_timeout_s: float = 60.0  # then reconnect and resume for this long at most


@dataclass
class DraftSection:
    model: str = "q4_0"  # configs/models.toml name, GGUF file, ONNX directory; "none": no drafter
    tokenizer: str = "q4_0"  # with model = "none": the GGUF (or name) whose vocabulary to use
    threads: int = 1
    top_k: int = 32  # size of the sparse draft distribution uploaded when sampling
    pace_s: float = 0.0  # emulate a slower board: at least this many s per drafted token
    provider: str = "cpu"  # an ONNX draft's execution provider (device_agent/onnx_drafter.py)


@dataclass
class HttpSection:
    bind: str = DEFAULT_HTTP  # HOST:PORT; beyond loopback only with an API key and TLS
    api_key_file: str = ""  # a file holding the key clients send as "Authorization: Bearer"
    tls_cert: str = ""  # PEM certificate chain and key: HTTPS
    tls_key: str = ""
    queue_size: int = 8  # requests waiting for the agent; more get 429
    default_max_tokens: int = 256  # chat requests that name no max_tokens


@dataclass
class TelemetrySection:
    spectral_efficiency: float = 0.0  # bit/s/Hz of this device's uplink; 0 = unknown
    interval_s: float = 5.0  # telemetry this often during a request
    probe_uplink: int = 0  # uplink capacity probe at registration: this many padded pings
    tegrastats_interval_ms: int = 1000  # on a Jetson (tegrastats on PATH)


@dataclass
class AgentConfig:
    controller: ControllerSection = field(default_factory=ControllerSection)
    draft: DraftSection = field(default_factory=DraftSection)
    http: HttpSection = field(default_factory=HttpSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)

    def validate(self) -> AgentConfig:
        c, d, h, t = self.controller, self.draft, self.http, self.telemetry
        checks = [
            (c.endpoint.startswith(("tcp://", "ipc://")),
             "controller.endpoint (--controller) is required: tcp://HOST:PORT"),
            (c.timeout_s > 0 and c.resume_timeout_s >= 0,
             "controller.timeout_s must be > 0 and resume_timeout_s >= 0"),
            (c.insecure or (c.key and c.keys_dir) or False,
             "the link to the controller is encrypted and authenticated: set controller.key "
             "and controller.keys_dir (--controller-key, --keys), or controller.insecure for a "
             "controller started with --insecure"),
            (not (c.insecure and (c.key or c.keys_dir)),
             "controller.insecure goes without controller.key and controller.keys_dir"),
            (d.threads >= 1 and d.pace_s >= 0, "draft.threads must be >= 1, pace_s >= 0"),
            (1 <= d.top_k <= MAX_TOP_K, f"draft.top_k must be in 1..{MAX_TOP_K}"),
            (1 <= h.queue_size <= 1024, "http.queue_size must be in 1..1024"),
            (h.default_max_tokens >= 1, "http.default_max_tokens must be >= 1"),
            (bool(h.tls_cert) == bool(h.tls_key), "http.tls_cert and http.tls_key go together"),
            (t.interval_s > 0 and t.probe_uplink >= 0 and t.tegrastats_interval_ms >= 100,
             "telemetry.interval_s must be > 0, probe_uplink >= 0, tegrastats_interval_ms "
             ">= 100"),
        ]
        require(checks)
        host, _port = http_address(h.bind)
        if not is_loopback_host(host) and not (h.api_key_file and h.tls_cert):
            raise ConfigError(
                f"http.bind {h.bind} is reachable from other hosts: that needs an API key "
                "(--api-key-file) and TLS (--tls-cert, --tls-key), or keep the default "
                f"{DEFAULT_HTTP} and reach it through an SSH tunnel (docs/serve.md)")
        return self


def load_agent_config(path: str | Path | None = None, **overrides: Any) -> AgentConfig:
    """Read an agent TOML file (defaults when ``path`` is None), ``section__key`` overrides
    over it (command-line flags)."""
    return load_sections(AgentConfig, path, overrides).validate()


def http_address(bind: str) -> tuple[str, int]:
    """(host, port) of a HOST:PORT (an IPv6 host in brackets)."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise ConfigError(f"http.bind must be HOST:PORT, got {bind!r}")
    return host.strip("[]"), int(port)

