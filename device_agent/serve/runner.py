"""Putting ``device-agent serve`` together: drafter, link, agent, worker, HTTP server."""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from device_agent.agent import DeviceAgent, TelemetryOptions, device_name
from device_agent.board import BoardMonitor
from device_agent.drafter import Drafter
from device_agent.link import ControllerLink
from device_agent.serve.config import AgentConfig, http_address
from device_agent.serve.http import ApiServer, ServeApp
from device_agent.serve.service import AgentService
from edge_controller.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RunningService:
    server: ApiServer
    service: AgentService

    @property
    def url(self) -> str:
        return self.server.url


def read_api_key(path: str) -> str | None:
    if not path:
        return None
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"http.api_key_file: cannot read {path}: {exc}") from None
    if len(key) < 16:
        raise ConfigError(f"http.api_key_file {path}: the key must hold at least 16 characters")
    return key


def tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"http.tls_cert/tls_key: cannot load {cert} and {key}: {exc}") from None
    return context


@contextmanager
def running(config: AgentConfig, drafter: Drafter, curve=None,
            board: BoardMonitor | None = None) -> Iterator[RunningService]:
    """The service on its own threads until the block ends (tests; ``serve`` below)."""
    c, h, t = config.controller, config.http, config.telemetry
    api_key = read_api_key(h.api_key_file)
    tls = tls_context(h.tls_cert, h.tls_key)
    link = ControllerLink(c.endpoint, curve=curve, timeout_s=c.timeout_s)
    telemetry = TelemetryOptions(t.spectral_efficiency, t.interval_s,
                                 probe_bursts=t.probe_uplink)
    agent = DeviceAgent(drafter, link, device_name(c.device_id, secure=curve is not None),
                        telemetry, resume_timeout_s=c.resume_timeout_s, board=board)
    service = AgentService(agent, queue_size=h.queue_size,
                           default_max_tokens=h.default_max_tokens).start()
    try:
        server = ApiServer(http_address(h.bind), ServeApp(service, api_key=api_key,
                                                         draft_top_k=config.draft.top_k), tls)
    except OSError as exc:
        _stop(service, link)
        raise ConfigError(f"http.bind {h.bind}: {exc.strerror or exc}") from None
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    try:
        yield RunningService(server, service)
    finally:
        server.shutdown()
        server.server_close()
        _stop(service, link)


def _stop(service: AgentService, link: ControllerLink) -> None:
    """The worker owns the link: it is closed here only once the worker has ended."""
    if service.stop():
        link.close()
    else:
        log.warning("the agent's worker did not stop in time (a controller that does not "
                    "answer); leaving it to the process's exit")


def serve(config: AgentConfig, drafter: Drafter, curve=None) -> int:
    """Run until SIGTERM or Ctrl-C; 0 on a clean stop."""
    board = BoardMonitor(config.telemetry.tegrastats_interval_ms).start()
    if board.available:
        log.info("board telemetry: %s", " ".join(board.command))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        with running(config, drafter, curve, board) as service:
            log.info("serving %s's agent on %s/v1 (controller %s)", drafter.model_id,
                        service.url, config.controller.endpoint)
            stop.wait()
            log.info("stopping: cancelling the request in flight, saying goodbye")
    finally:
        board.stop()
    return 0
