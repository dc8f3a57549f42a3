"""The controller's transport: the ROUTER socket, CURVE and ZAP, socket limits, sending.

It owns *who* a frame is from, never *what* it says: frames go up raw, with the peer's
authenticated identity, and come down as bytes; nothing here decodes a message.

Security (docs/security.md): by default the socket is a CURVE server and a ZAP handler
(pyzmq's authenticator thread) admits only keys on the allowlist of the keys directory,
which is re-read when it changes. Every frame carries the key its connection was
authenticated with (the ZAP User-Id, the Z85 public key): that key, not the routing id
and not what the frame says, is the device's identity. ROUTER_HANDOVER stays off, so a
connection that claims a routing id in use is ignored by libzmq instead of taking the
route over. ``insecure`` is plain TCP without any of this, refused off loopback unless
``insecure_anywhere``.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from edge_controller import keys as K
from edge_controller import protocol as P
from edge_controller.config import ControllerConfig
from edge_controller.logs import PeerLog

log = logging.getLogger(__name__)

ZAP_DOMAIN = b"multispin"
HEARTBEAT_IVL_S = 1.0  # ZMTP pings to every connection; one silent for the heartbeat
# timeout (server.session_timeout_s) is closed, and its device's registration dropped
ALLOWLIST_CHECK_S = 0.5  # revocation takes effect within this (plus one loop tick)
RECEIVE_QUEUE = 16  # frames libzmq holds per connection before it stops reading its socket
SEND_QUEUE = 256  # frames queued to one device before sends to it fail (it is dropped)
# A connection that has not completed its handshake by then is closed (libzmq's default is
# 30 s): idle TCP connections from anyone must not hold file descriptors for long.
HANDSHAKE_TIMEOUT_S = 5.0
MAX_BUCKETS = 4096  # rate-limit state kept per identity; idle ones are forgotten first
MAX_DROPS_PER_RECEIVE = 256  # frames over their rate dropped in one receive() at most


class TransportError(RuntimeError):
    """The transport cannot be set up as configured; the message says what to change."""


@dataclass(frozen=True)
class Peer:
    """Who sent a frame. ``identity`` keys everything the controller holds for a device."""

    route: bytes  # ZeroMQ routing id of the connection the frame came on
    key: bytes | None  # Z85 CURVE public key; None without keys (insecure)
    name: str | None  # the name the key is listed under; None if unlisted or insecure

    @property
    def identity(self) -> bytes:
        return self.key if self.key is not None else self.route

    @property
    def label(self) -> str:
        """For logs: the listed name, or a short form of the key or route."""
        if self.name is not None:
            return self.name
        return self.key.decode("ascii")[:12] if self.key else self.route.hex()[:12]


def is_loopback(endpoint: str) -> bool:
    """True for endpoints that only this host can reach (tcp on loopback, ipc, inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    return is_loopback_host(rest.rpartition(":")[0].strip("[]"))


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback address; "*", an interface name or another host name is
    reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RateLimit:
    """Token buckets per identity, in frames and in bytes: a frame that finds either empty
    is dropped before anyone decodes it (docs/limits.md)."""

    def __init__(self, frames_per_s: float, frame_burst: int, bytes_per_s: float,
                 byte_burst: int):
        self.rates = (frames_per_s, bytes_per_s)
        self.bursts = (float(frame_burst), float(byte_burst))
        self._buckets: dict[bytes, list[float]] = {}  # identity -> [frames, bytes, at]
        self.dropped = 0

    def admit(self, identity: bytes, size: int, now: float) -> bool:
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget(now)
            bucket = self._buckets[identity] = [*self.bursts, now]
        elapsed, bucket[2] = now - bucket[2], now
        bucket[0] = min(self.bursts[0], bucket[0] + elapsed * self.rates[0])
        bucket[1] = min(self.bursts[1], bucket[1] + elapsed * self.rates[1])
        if bucket[0] < 1 or bucket[1] < size:
            self.dropped += 1
            return False
        bucket[0] -= 1
        bucket[1] -= size
        return True

    def _forget(self, now: float) -> None:
        """Drop the buckets that have refilled (idle ones), else the oldest."""
        full = [i for i, b in self._buckets.items()
                if now - b[2] >= max(self.bursts[k] / self.rates[k] for k in (0, 1))]
        for identity in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[identity]


class Transport:
    """One ROUTER socket: bind, receive (peer + raw frames), send, watch the allowlist.

    Key files are read at construction (so a bad keys directory fails before any model
    loads); sockets and the authenticator thread exist from :meth:`open` to :meth:`close`.
    """

    def __init__(self, bind: str, keys_dir: str | Path | None, *, insecure: bool = False,
                 insecure_anywhere: bool = False, rate_limit: RateLimit | None = None,
                 heartbeat_timeout_s: float = 5.0):
        if keys_dir and insecure:
            raise TransportError("both a keys directory and insecure mode given: choose one")
        if not keys_dir and not insecure:
            raise TransportError(
                "no keys: make them with `edge-controller keys init --dir DIR` and list each "
                "device with `edge-controller keys add NAME PUBKEY --dir DIR`, then start with "
                "--keys DIR (or [security] keys_dir); --insecure runs plain TCP on loopback, "
                "for tests only")
        if insecure and not insecure_anywhere and not is_loopback(bind):
            raise TransportError(
                f"--insecure binds loopback only, and {bind} is reachable from other hosts: "
                "use keys, or add --insecure-anywhere if you really mean plain TCP there")
        self.bind = bind
        self.rate_limit = rate_limit
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._fd_route: dict[int, bytes] = {}  # connection (its fd) -> the route it speaks on
        self._lost: list[bytes] = []  # routes whose connection closed, not yet reported
        self._monitor: zmq.Socket | None = None
        self._warnings = PeerLog(log)
        self.keys_dir = Path(keys_dir) if keys_dir else None
        self.allowlist: K.Allowlist | None = None
        self._allowlist_seen = 0  # the allowlist generation the controller last acted on
        self._keypair: K.Keypair | None = None
        if self.keys_dir is not None:  # key files are checked now, before any model loads
            K.require_curve()
            self._keypair = K.load_own_keypair(self.keys_dir, K.CONTROLLER)
            self.allowlist = K.Allowlist(self.keys_dir)
            self.allowlist.reload()
            self._allowlist_seen = self.allowlist.generation
        self.endpoint: str | None = None
        self._context: zmq.Context | None = None
        self._socket: zmq.Socket | None = None
        self._auth: ThreadAuthenticator | None = None
        self._allowlist_checked = 0.0

    @classmethod
    def from_config(cls, config: ControllerConfig) -> Transport:
        """From ``server.bind``, ``[security]`` and the per-device rates of ``[limits]``."""
        security, limits = config.security, config.limits
        return cls(config.server.bind, security.keys_dir or None, insecure=security.insecure,
                   insecure_anywhere=security.insecure_anywhere,
                   rate_limit=RateLimit(limits.messages_per_s, limits.message_burst,
                                        limits.bytes_per_s, limits.bytes_burst),
                   heartbeat_timeout_s=config.server.session_timeout_s)

    @property
    def secure(self) -> bool:
        return self.keys_dir is not None

    def open(self) -> str:
        """Bind (after the ZAP handler is up: libzmq admits everyone when none is)."""
        self._context = zmq.Context()
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sends to vanished devices raise, not vanish
        sock.setsockopt(zmq.ROUTER_HANDOVER, 0)  # a claimed routing id never takes a route over
        # A larger frame never reaches memory: libzmq closes that connection instead (the
        # device reconnects); the per-type limits below it are checked in decode().
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
        sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_IVL_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.heartbeat_timeout_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TTL, int(self.heartbeat_timeout_s * 1000))
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._socket = sock
        if self.secure:
            keypair = self._keypair
            self._auth = ThreadAuthenticator(self._context, log=log.getChild("zap"))
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN.decode(), self.allowlist)
            sock.curve_server = True
            sock.curve_secretkey = keypair.secret
            sock.curve_publickey = keypair.public
            sock.zap_domain = ZAP_DOMAIN
            log.info("CURVE on: controller key %s, %d device(s) listed in %s",
                     keypair.public_text, len(self.allowlist.names), self.allowlist.directory)
        else:
            log.warning("INSECURE: plain TCP on %s: no encryption, no authentication; anyone "
                        "who reaches this port can use the controller and read its traffic",
                        self.bind)
        sock.bind(self.bind)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def poll(self, timeout_s: float, wake_fd: int | None = None) -> bool:
        """Wait up to ``timeout_s`` for a message; True if one waits. A readable
        ``wake_fd`` (the verifier's forward done) ends the wait early."""
        if wake_fd is None:
            return bool(self._socket.poll(int(timeout_s * 1000)))
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(wake_fd, zmq.POLLIN)
        return self._socket in dict(poller.poll(int(timeout_s * 1000)))

    def receive(self) -> tuple[Peer, list[bytes]] | None:
        """The next admitted message, if one is waiting: its sender and its body frames.
        Messages over their sender's rate are dropped here, unread."""
        for _ in range(MAX_DROPS_PER_RECEIVE):
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            key = frames[-1].get("User-Id").encode("ascii") if self.secure else None
            peer = Peer(frames[0].bytes, key, self.allowlist.name_of(key) if key else None)
            # The events of this frame's connection (and of any earlier one on its fd) were
            # queued before the frame: read them first, or a reused fd would map wrongly.
            self._read_events()
            self._fd_route[frames[-1].get(zmq.SRCFD)] = peer.route
            size = sum(len(f) for f in frames[1:])
            if self.rate_limit is None or self.rate_limit.admit(peer.identity, size,
                                                                time.monotonic()):
                return peer, [f.bytes for f in frames[1:]]
            self._warnings(peer.label, "over its rate: a frame of %d bytes dropped", size)
        return None  # the rest wait: a flood of drops must not hold the loop either

    def disconnected(self) -> list[bytes]:
        """Routes whose connection closed since the last call: the peer left, or its
        heartbeats stopped for the heartbeat timeout (a link down)."""
        self._read_events()
        routes, self._lost = self._lost, []
        return routes

    def _read_events(self) -> None:
        """Connections opened and closed, in order: a closed one's route is lost; a new one
        on a reused fd starts without a route until it speaks."""
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            route = self._fd_route.pop(event["value"], None)
            if route is not None and event["event"] == zmq.EVENT_DISCONNECTED:
                self._lost.append(route)

    def send(self, route: bytes, frame: bytes) -> bool:
        """Queue one frame for a route; False if that connection is gone or its queue full."""
        try:
            self._socket.send_multipart([route, frame], zmq.NOBLOCK)
            return True
        except (zmq.Again, zmq.ZMQError):  # peer gone (ROUTER_MANDATORY) or its queue full
            return False

    def allowlist_changed(self, now: float | None = None) -> bool:
        """Re-read the allowlist if it changed on disk (at most every ALLOWLIST_CHECK_S).

        New handshakes see the new list at once; the caller ends the sessions of keys that
        are no longer listed, whose connections were admitted before."""
        now = time.monotonic() if now is None else now
        if not self.secure or now - self._allowlist_checked < ALLOWLIST_CHECK_S:
            return False
        self._allowlist_checked = now
        try:
            self.allowlist.reload()
        except OSError as exc:  # e.g. no file descriptor left under a connection flood
            self._warnings("allowlist", "cannot re-read %s (%s); the list stays as it was",
                           self.allowlist.directory, exc)
            return False
        if self.allowlist.generation == self._allowlist_seen:
            return False
        self._allowlist_seen = self.allowlist.generation
        log.info("allowlist re-read: %d device(s) listed", len(self.allowlist.names))
        return True

    def close(self, linger_s: float = 0.0) -> None:
        """Close everything; ``linger_s``: how long queued answers may still go out."""
        if self._socket is not None:
            self._socket.disable_monitor()
        if self._auth is not None:
            if self._auth.is_alive():
                self._auth.stop()
            else:  # died: its sockets are still open, and term() would wait for them
                log.error("the ZAP authenticator thread had died")
            self._auth = None
        if self._context is not None:  # closes every socket of ours, then terms
            self._context.destroy(linger=int(linger_s * 1000))
            self._context = self._socket = self._monitor = None
