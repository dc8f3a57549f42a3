"""The HTTP side of ``device-agent serve``: OpenAI's routes, auth, TLS, server-sent events.

Python's threading HTTP server: one thread per connection (at most ``MAX_CONNECTIONS``),
HTTP/1.1 with keep-alive; streams go out as server-sent events in chunked encoding, one
event per verified round. A client that hangs up is noticed within ``POLL_S`` (its socket
reads as closed, or a write fails) and its request is cancelled at the controller.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import json
import logging
import queue
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from device_agent.agent import SamplingOptions
from device_agent.serve import api
from device_agent.serve.api import ApiError, CompletionRequest
from device_agent.serve.chat import ChatTemplate
from device_agent.serve.service import AgentService, Job, Outcome
from edge_controller.protocol import MIN_TEMPERATURE
from edge_controller.transport import is_loopback_host

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_CONNECTIONS = 64  # HTTP threads at once; more connections are answered 503
MAX_PER_CLIENT = 16  # connections from one address beyond loopback
POLL_S = 0.2  # how often a waiting handler looks whether its client is still there
READ_DEADLINE_S = 10.0  # a request (line, headers, body) or a keep-alive pause, in all
SOCKET_TIMEOUT_S = 60.0  # a client that takes no bytes for this long is dropped
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # as urlsplit names them
WARN_EVERY_S = 10.0
_BUSY_BODY = json.dumps(ApiError(503, "too many connections", type_="server_error").body())
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
         % (len(_BUSY_BODY), _BUSY_BODY.encode()))


class ServeApp:
    """What the handlers share: the service, the drafter's tokenizer, the API key."""

    def __init__(self, service: AgentService, *, api_key: str | None = None,
                 draft_top_k: int = 32):
        self.service = service
        self.drafter = service.agent.drafter
        self.api_key = api_key.encode() if api_key else None
        self.draft_top_k = draft_top_k
        self._chat: ChatTemplate | None = None

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self.api_key)

    def model_ids(self) -> list[str]:
        target = self.service.health.target
        return [target] if target else []

    def job(self, request: CompletionRequest) -> Job:
        """The worker's job for a checked request (400 for what cannot run here)."""
        known = self.model_ids()
        if known and request.model not in known:
            raise ApiError(404, f"The model {request.model!r} does not exist here: this agent "
                           f"serves {known[0]!r}", param="model", code="model_not_found")
        prompt_ids = self._prompt_ids(request)
        limit = self.drafter.n_ctx - 1
        if len(prompt_ids) >= limit:
            raise ApiError(400, f"the prompt holds {len(prompt_ids)} tokens; this agent's "
                           f"draft context holds {limit}", param="prompt",
                           code="context_length_exceeded")
        if request.max_tokens is not None:
            self.service.max_tokens(request.max_tokens)  # over the known limit: 400 now
        temperature = request.temperature if request.temperature >= MIN_TEMPERATURE else 0.0
        sampling = SamplingOptions(temperature, request.top_p, 0, request.seed, self.draft_top_k)
        return Job(prompt_ids, request.max_tokens, sampling, request.stop)

    def _prompt_ids(self, request: CompletionRequest) -> list[int]:
        if request.chat:
            if self._chat is None:
                try:
                    self._chat = ChatTemplate(self.drafter)
                except ValueError as exc:
                    raise ApiError(400, str(exc)) from None
            try:
                return self._chat.prompt_ids(request.messages)
            except Exception as exc:  # noqa: BLE001 - the template's complaint, bad Unicode
                raise ApiError(400, f"the chat template refused the messages: {exc}",
                               param="messages") from None
        if isinstance(request.prompt, list):
            if any(not 0 <= t < self.drafter.vocab_size for t in request.prompt):
                raise ApiError(400, f"prompt token ids must be in 0..{self.drafter.vocab_size - 1}",
                               param="prompt")
            return request.prompt
        try:
            return self.drafter.tokenize(request.prompt)
        except UnicodeEncodeError:
            raise ApiError(400, "the prompt is not valid Unicode (a lone surrogate?)",
                           param="prompt") from None


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: ServeApp,
                 tls: ssl.SSLContext | None = None):
        self.app = app
        self.tls = tls
        self.loopback = is_loopback_host(address[0])  # then only loopback Host names are served
        self._open: dict[str, int] = {}  # connections per client address
        self._lock = threading.Lock()
        self._warned_at = -WARN_EVERY_S
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        client = client_address[0]
        with self._lock:
            total, mine = sum(self._open.values()), self._open.get(client, 0)
            refuse = total >= MAX_CONNECTIONS or (mine >= MAX_PER_CLIENT
                                                 and not is_loopback_host(client))
            if not refuse:
                self._open[client] = mine + 1
        if refuse:
            self._refuse(request, client)
            return
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket, client: str) -> None:
        if time.monotonic() - self._warned_at > WARN_EVERY_S:  # a flood logs one line
            self._warned_at = time.monotonic()
            log.warning("%d connections open: refusing more (latest from %s)",
                        sum(self._open.values()), client)
        if self.tls is None:
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(_BUSY)
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                left = self._open.pop(client_address[0]) - 1
                if left:
                    self._open[client_address[0]] = left

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # a client gone mid-request: its business
            log.debug("connection from %s: %s", client_address[0], sys.exc_info()[1])
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "multispin-edge-agent"
    timeout = SOCKET_TIMEOUT_S
    server: ApiServer

    def setup(self) -> None:
        # Headers and body (and each event) go out at once: Nagle's algorithm would hold a
        # body behind the headers' ACK, which a client delays by up to 40 ms.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._deadline: threading.Timer | None = None
        if self.server.tls is not None:  # the handshake runs here, not in the accept loop
            self.request.settimeout(READ_DEADLINE_S)
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def handle_one_request(self) -> None:
        """One request, read within READ_DEADLINE_S (the wait for it included): a client
        that trickles its headers, or idles on a kept-alive connection, is cut off then."""
        self._deadline = threading.Timer(READ_DEADLINE_S, self._cut_off)
        self._deadline.daemon = True
        self._deadline.start()
        try:
            super().handle_one_request()
        finally:
            self._read_done()

    def _read_done(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _cut_off(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """The standard library's own refusals (bad request lines, huge headers, unknown
        methods: 405 here) in OpenAI's error shape, not HTML."""
        self.close_connection = True
        code = 405 if code == HTTPStatus.NOT_IMPLEMENTED else code
        error = ApiError(code, message or HTTPStatus(code).phrase,
                         type_="invalid_request_error" if code < 500 else "server_error")
        with contextlib.suppress(OSError):
            self._send_json(code, error.body())

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("%s %s", self.address_string(), format % args)

    # ---- routes ----------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        routes = {"/health": self._health, "/v1/models": self._models, "/metrics": self._metrics}
        self._route(routes)

    def do_POST(self) -> None:  # noqa: N802
        routes = {"/v1/completions": lambda: self._complete(chat=False),
                  "/v1/chat/completions": lambda: self._complete(chat=True)}
        self._route(routes)

    def _route(self, routes: dict) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        self._responded = False
        try:
            self._check_origin()
            if not self.server.app.authorized(self.headers.get("Authorization")):
                raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                               code="invalid_api_key")
            if path not in routes:
                raise ApiError(404, f"no route {self.command} {path}", code="not_found")
            if self.command == "GET":
                self._read_done()
            routes[path]()
        except ApiError as exc:
            self.close_connection = True  # its body may be unread: no next request on it
            with contextlib.suppress(OSError):
                self._send_json(exc.status, exc.body())
        except OSError:  # the client went away (ssl.SSLError is one)
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a bug answers 500, never a dropped line
            log.exception("%s %s", self.command, path)
            self.close_connection = True
            if not self._responded:
                self._send_json(500, ApiError(500, f"internal error: {type(exc).__name__}",
                                              type_="server_error").body())

    def _check_origin(self) -> None:
        """Browsers must not reach a loopback API: DNS rebinding makes a foreign name
        resolve to 127.0.0.1, and a form posts cross-site as text/plain."""
        host = self.headers.get("Host") or ""
        try:
            name = urlsplit(f"//{host}").hostname or ""  # lower case, no port, no brackets
        except ValueError:
            name = ""
        if self.server.loopback and name not in LOOPBACK_HOSTS:
            raise ApiError(403, f"Host {host!r} is not this loopback API's name",
                           code="bad_host")
        origin = self.headers.get("Origin")
        if origin and self.server.loopback and urlsplit(origin).hostname not in LOOPBACK_HOSTS:
            raise ApiError(403, "cross-origin requests are not served", code="bad_origin")
        if self.command == "POST" and self.headers.get_content_type() != "application/json":
            raise ApiError(415, "POST bodies must be Content-Type: application/json")

    def _health(self) -> None:
        app = self.server.app
        health = app.service.health
        resuming = app.service.agent.resuming  # a request is mending a lost link
        registered = health.registered and not resuming
        body = {"status": "ok" if registered else "unavailable",
                "registered": registered, "device_id": health.device_id,
                "controller": app.service.agent.link.endpoint, "draft": app.drafter.model_id,
                "target": health.target, "rounds": health.rounds,
                "last_round_at": health.last_round_at, "in_flight": health.in_flight,
                "queue_depth": app.service.queue_depth(),
                "problem": "the link to the controller is lost; resuming" if resuming
                else health.problem}
        self._send_json(200 if registered else 503, body)

    def _models(self) -> None:
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "multispin-edge"}
                for model in self.server.app.model_ids()]
        self._send_json(200, {"object": "list", "data": data})

    def _metrics(self) -> None:
        self._send(200, self.server.app.service.metrics.render(),
                   "text/plain; version=0.0.4; charset=utf-8")

    def _complete(self, chat: bool) -> None:
        app = self.server.app
        request = api.parse_request(self._read_json(), chat)
        job = app.job(request)
        app.service.submit(job)
        id_ = api.new_id(chat)
        events = self._events(job)
        first = next(events, None)
        if first is None:
            return  # the client is gone
        if first[0] == "end" and first[1].error is not None:
            raise first[1].error
        if request.stream:
            self._stream(request, job, id_, first, events)
            return
        text = []
        for kind, value in itertools.chain([first], events):
            if kind == "text":
                text.append(value)
                continue
            outcome: Outcome = value
            if outcome.error is not None:
                raise outcome.error
            self._send_json(200, api.completion_body(
                request, id_, "".join(text), outcome.finish_reason or "stop",
                outcome.prompt_tokens, outcome.completion_tokens))

    def _stream(self, request: CompletionRequest, job: Job, id_: str,
                first: tuple[str, Any], events: Iterator[tuple[str, Any]]) -> None:
        self._responded = True
        self._chunked = self.request_version != "HTTP/1.0"  # 1.0: the body ends at close
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()
        try:
            if request.chat:
                self._event(api.chunk_body(request, id_, "", first=True))
            for kind, value in itertools.chain([first], events):
                if kind == "text":
                    self._event(api.chunk_body(request, id_, value))
                    continue
                outcome: Outcome = value
                if outcome.error is not None:
                    self._event(outcome.error.body())
                else:
                    self._event(api.chunk_body(request, id_, None if request.chat else "",
                                               outcome.finish_reason or "stop"))
                    if request.include_usage:
                        self._event(api.usage_chunk(request, id_, outcome.prompt_tokens,
                                                    outcome.completion_tokens))
                self._chunk(b"data: [DONE]\n\n")
                if self._chunked:
                    self._chunk(b"")
        except OSError:  # the client hung up mid-stream: the worker cancels the request
            job.cancelled.set()
            self.close_connection = True

    def _events(self, job: Job) -> Iterator[tuple[str, Any]]:
        """The job's events up to its end; stops early (and cancels it) if the client goes,
        every ``POLL_S`` whether events flow or not."""
        checked = time.monotonic()
        while True:
            try:
                kind, value = job.events.get(timeout=POLL_S)
            except queue.Empty:
                if not self.server.app.service.alive:
                    kind, value = "end", Outcome(None, len(job.prompt_ids), 0, ApiError(
                        503, "the agent's worker stopped", type_="server_error"))
                else:
                    kind = value = None
            if time.monotonic() - checked >= POLL_S or kind is None:
                checked = time.monotonic()
                if self._client_gone():
                    job.cancelled.set()
                    self.close_connection = True
                    return
            if kind is None:
                continue
            yield kind, value
            if kind == "end":
                return

    def _client_gone(self) -> bool:
        """The client closed its side. Plain HTTP: the socket reads as closed (bytes there
        are a pipelined next request). TLS: anything readable at all, since a TLS 1.3
        close_notify looks like data from outside and a client sends nothing else while
        it waits for an answer."""
        sock = self.connection
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            peeked = socket.socket.recv(sock, 1, socket.MSG_PEEK)
        except (OSError, ValueError):
            return True
        return not peeked or isinstance(sock, ssl.SSLSocket)

    # ---- bodies ----------------------------------------------------------------------
    def _read_json(self) -> Any:
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get("Transfer-Encoding") or len(lengths) > 1:
            raise ApiError(400, "one Content-Length and no Transfer-Encoding, please")
        if not lengths or not lengths[0].isascii() or not lengths[0].isdigit():
            raise ApiError(411, "a request body with Content-Length is required")
        if int(lengths[0]) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body of {lengths[0]} bytes exceeds {MAX_BODY_BYTES}")
        body = self.rfile.read(int(lengths[0]))
        self._read_done()
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "the request body is not valid JSON "
                           f"({type(exc).__name__})") from None

    def _send_json(self, status: int, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self._responded = True
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _event(self, body: dict) -> None:
        self._chunk(b"data: " + json.dumps(body).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
