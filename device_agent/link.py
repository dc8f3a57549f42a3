"""The device's ZeroMQ link to the controller: a DEALER that dials out (works behind NAT)."""

from __future__ import annotations

import zmq

from device_agent.pacer import UplinkPacer
from edge_controller import protocol as P


class LinkTimeout(TimeoutError):
    """The controller did not answer in time."""


class ControllerLink:
    def __init__(self, endpoint: str, *, identity: bytes | None = None, timeout_s: float = 60.0,
                 pacer: UplinkPacer | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.pacer = pacer or UplinkPacer()  # unpaced until the controller sets a rate
        self._socket = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if identity is not None:
            self._socket.setsockopt(zmq.ROUTING_ID, identity)
        self._socket.connect(endpoint)
        self.sent_bytes = 0

    def send(self, msg: P.Message) -> int:
        """Send one message. Uploads are paced to this device's share of the band; pings
        are not (probe bursts must measure the link, not the pacer)."""
        frame = P.encode(msg)
        if not isinstance(msg, P.Ping):
            self.pacer.wait(len(frame))
        self._socket.send(frame)
        self.sent_bytes += len(frame)
        return len(frame)

    def send_raw(self, frames: list[bytes]) -> None:
        """Send frames as they are (tests of the controller's input validation)."""
        self._socket.send_multipart(frames)

    def receive(self, timeout_s: float | None = None) -> P.Message:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        if not self._socket.poll(int(timeout * 1000)):
            raise LinkTimeout(f"no answer from the controller at {self.endpoint} in {timeout:g} s")
        return P.decode(self._socket.recv())

    def close(self) -> None:
        self._socket.close(0)

    def __enter__(self) -> ControllerLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
