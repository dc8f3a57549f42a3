"""The device's ZeroMQ link to the controller: a DEALER that dials out (works behind NAT).

With keys (the default path) the link is a CURVE client pinned to the controller's public
key. A socket monitor turns the handshake's outcome into clear errors: a key the controller
does not list, or a controller with the other security setting, fails at once; a wrong
controller key gets no answer at all, and the timeout then says so. Each socket takes a
fresh random routing id (never shared, never reused): the controller keeps routes by key,
and libzmq ignores a connection that claims a routing id in use.
"""

from __future__ import annotations

import secrets
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from device_agent.pacer import UplinkPacer
from edge_controller import protocol as P
from edge_controller.keys import CurveClient

HEARTBEAT_IVL_MS = 1000
# Both sides ping every second; the controller asks (its TTL) to be dropped after its
# session timeout (5 s), which usually comes first; this bounds a link on its own.
HEARTBEAT_TIMEOUT_MS = 8000
MECHANISM_MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
ZAP_DENIED = 400  # ZAP's status for "not allowed" (300 is a temporary error, 500 internal)
_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class LinkLost(ConnectionError):
    """The link to the controller is gone for now (a resume may mend it)."""


class LinkTimeout(LinkLost, TimeoutError):
    """The controller did not answer in time."""


class LinkRefused(ConnectionError):
    """The controller refused the connection at the handshake; str() says why and what to do."""


class KeyRefused(LinkRefused):
    """The controller's ZAP handler refused this device's key (not on its allowlist)."""

    def __init__(self, public_key: str, status: int):
        super().__init__(f"the controller refused this device's key {public_key} (ZAP status "
                         f"{status}): it is not on the controller's allowlist")
        self.public_key = public_key


class ControllerLink:
    def __init__(self, endpoint: str, *, curve: CurveClient | None = None,
                 timeout_s: float = 60.0, pacer: UplinkPacer | None = None):
        self.endpoint = endpoint
        self.curve = curve
        self.timeout_s = timeout_s
        self.pacer = pacer or UplinkPacer()  # unpaced until the controller sets a rate
        self.sent_bytes = 0
        self._handshake_failed = False
        self._open()

    def _open(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, secrets.token_hex(16).encode())
        sock.setsockopt(zmq.SNDTIMEO, int(self.timeout_s * 1000))
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)  # a controller cannot flood memory
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        if self.curve is not None:
            self.curve.apply(sock)
        self._monitor = sock.get_monitor_socket(_EVENTS)
        sock.connect(self.endpoint)
        self._socket = sock
        self._handshaken = False
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def send(self, msg: P.Message, wait: bool = True) -> int:
        """Send one message. Uploads are paced to this device's share of the band; pings
        are not (probe bursts must measure the link, not the pacer).

        ZeroMQ holds a message while the link has no connection; ``wait`` bounds that by
        the link's timeout (LinkTimeout), else a message that cannot go at once is dropped
        (returns 0)."""
        frame = P.encode(msg)
        if not isinstance(msg, P.Ping) and wait:
            self.pacer.wait(len(frame))
        try:
            self._socket.send(frame, 0 if wait else zmq.NOBLOCK)
        except zmq.Again:
            if wait:
                raise LinkTimeout(self.silence(self.timeout_s)) from None
            return 0
        self.sent_bytes += len(frame)
        return len(frame)

    def send_raw(self, frames: list[bytes]) -> None:
        """Send frames as they are (tests of the controller's input validation)."""
        self._socket.send_multipart(frames)

    def receive(self, timeout_s: float | None = None,
                versions: tuple[int, ...] = (P.PROTOCOL_VERSION,)) -> P.Message:
        """The next message from the controller, of one of ``versions``. LinkRefused at
        once if the handshake is refused; LinkTimeout, saying what the silence most likely
        means, if none comes."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            ready = dict(self._poller.poll(remaining * 1000))
            if self._socket in ready:
                return P.decode_versioned(self._socket.recv(), versions)[0]
            if self._monitor in ready:
                self._on_event(recv_monitor_message(self._monitor))
        raise LinkTimeout(self.silence(timeout))

    def pending(self) -> bool:
        """A message from the controller is waiting (``receive`` returns it at once)."""
        return bool(self._socket.poll(0, zmq.POLLIN))

    def _on_event(self, event: dict) -> None:
        kind, value = event["event"], event["value"]
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._handshaken, self._handshake_failed = True, False
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._handshake_failed = True  # a CURVE server that cannot read our hello
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            if value == ZAP_DENIED and self.curve is not None:
                raise KeyRefused(self.curve.keypair.public_text, value)
            raise LinkRefused(f"the controller at {self.endpoint} could not authenticate this "
                              f"device (ZAP status {value}); try again, or see its log")
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            if value != MECHANISM_MISMATCH:
                raise LinkRefused(f"the handshake with the controller at {self.endpoint} failed "
                                  f"(ZMTP protocol error {value:#x})")
            if self.curve is not None:
                raise LinkRefused(f"the controller at {self.endpoint} runs without keys (it was "
                                  "started with --insecure): connect with --insecure instead")
            raise LinkRefused(f"the controller at {self.endpoint} requires keys: pass --keys DIR "
                              "(made with `device-agent keys init --dir DIR`, its public key "
                              "listed on the controller) and --controller-key KEY")
        elif kind == zmq.EVENT_DISCONNECTED and self._handshaken:
            # libzmq would reconnect with the same routing id, which the controller ignores
            # while its side of the old connection lives: start over with a fresh one. The
            # controller has dropped (or will drop) what it held for the old connection.
            self.reconnect()
            raise LinkLost("the connection to the controller closed")

    def silence(self, timeout: float) -> str:
        """What ``timeout`` seconds without an answer most likely mean."""
        said = f"no answer from the controller at {self.endpoint} in {timeout:g} s"
        if self.curve is None:
            return said + " (is it running, and reachable from here?)"
        if self._handshake_failed:
            return (said + ": it took the connection but could not complete the secure "
                    "handshake, so the controller key given with --controller-key is most "
                    "likely wrong")
        return (said + " (is it running, and reachable from here? a wrong --controller-key "
                "is a likely cause too: then the controller cannot answer)")

    def reconnect(self) -> None:
        """A new connection, with a fresh routing id (queued messages are dropped)."""
        self._close_socket()
        self._open()

    def close(self) -> None:
        self._close_socket()

    def _close_socket(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(0)
        self._socket.close(0)

    def __enter__(self) -> ControllerLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
