"""UplinkPacer: token bucket semantics on a fake clock, and one real-time paced stream."""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from device_agent.pacer import MIN_RATE_BPS, UplinkPacer


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def make_pacer(rate_bps, burst_bytes):
    clock = FakeClock()
    return UplinkPacer(rate_bps, burst_bytes, clock=clock, sleep=clock.sleep), clock


@pytest.mark.parametrize("rate", [None, 0])
def test_unpaced_never_waits(rate):
    pacer, clock = make_pacer(rate, 1000)
    assert not pacer.paced
    assert all(pacer.wait(100_000) == 0.0 for _ in range(10))
    assert clock.sleeps == []


def test_first_message_goes_at_once_the_next_waits_for_its_bytes():
    pacer, clock = make_pacer(8000, 1000)  # 1000 bytes/s
    assert pacer.wait(1000) == 0.0
    assert pacer.wait(1000) == pytest.approx(1.0)
    assert pacer.wait(250) == pytest.approx(0.25)


def test_small_messages_are_paced_after_one_burst():
    pacer, clock = make_pacer(8000, 1000)
    waits = [pacer.wait(100) for _ in range(110)]
    assert waits[:10] == [0.0] * 10  # one bucket: one message's worth of burst
    assert waits[10:] == pytest.approx([0.1] * 100)
    assert clock.now == pytest.approx(10.0)


def test_message_larger_than_the_bucket_waits_for_all_its_bytes():
    pacer, clock = make_pacer(8000, 1000)
    pacer.wait(1000)
    assert pacer.wait(3000) == pytest.approx(3.0)
    assert pacer.wait(1000) == pytest.approx(1.0)
    assert clock.now == pytest.approx(4.0)  # 5000 bytes: the first 1000 free, 4000 at 1000 B/s


def test_default_depth_charges_every_message_its_time_on_air_even_after_idle():
    clock = FakeClock()
    pacer = UplinkPacer(8000, clock=clock, sleep=clock.sleep)  # 1000 bytes/s, no burst
    assert pacer.wait(500) == pytest.approx(0.5)
    clock.now += 60.0  # a long idle: an FDMA channel still takes 0.5 s for 500 bytes
    assert pacer.wait(500) == pytest.approx(0.5)
    assert pacer.wait(250) == pytest.approx(0.25)


def test_idle_time_refills_only_up_to_the_burst():
    pacer, clock = make_pacer(8000, 1000)
    pacer.wait(1000)
    clock.now += 100.0
    assert pacer.wait(1000) == 0.0
    assert pacer.wait(1000) == pytest.approx(1.0)


def test_set_rate_applies_from_now_on():
    pacer, clock = make_pacer(8000, 1000)
    pacer.wait(1000)
    clock.now += 0.5  # 500 bytes earned at the old rate
    pacer.set_rate(16000)
    assert pacer.wait(1000) == pytest.approx(500 / 2000)
    pacer.set_rate(None)
    assert pacer.wait(10**6) == 0.0
    pacer.set_rate(8000)  # pacing restarts with a full bucket
    assert pacer.wait(1000) == 0.0
    assert pacer.wait(1000) == pytest.approx(1.0)


def test_long_run_rate_matches_for_random_message_sizes():
    rate_bps, burst = 1e6, 4096
    pacer, clock = make_pacer(rate_bps, burst)
    rng = random.Random(7)
    sizes = [rng.randint(1, 3 * burst) for _ in range(2000)]
    for size in sizes:
        pacer.wait(size)
    # Every byte is paid at the rate but the first bucket's worth of credit.
    paid = sum(sizes) - burst
    assert clock.now == pytest.approx(paid * 8 / rate_bps, rel=1e-9)


@pytest.mark.parametrize("bad", [{"rate_bps": -1.0}, {"burst_bytes": -1}])
def test_rejects_invalid_settings(bad):
    with pytest.raises(ValueError):
        UplinkPacer(**{"rate_bps": 1e6, "burst_bytes": 1000, **bad})


def test_real_stream_over_a_socket_is_paced_to_the_rate():
    rate_bps, size, count = 800_000, 2000, 40  # 100 kB/s: ~0.8 s of real time
    sender, receiver = socket.socketpair()
    arrivals: list[float] = []

    def read() -> None:
        buffered = 0
        while len(arrivals) < count:
            chunk = receiver.recv(65536)
            if not chunk:
                return
            buffered += len(chunk)
            while buffered >= size * (len(arrivals) + 1):
                arrivals.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    pacer = UplinkPacer(rate_bps, burst_bytes=size)
    with sender, receiver:
        for _ in range(count):
            pacer.wait(size)
            sender.sendall(b"x" * size)
        reader.join(10)
    assert len(arrivals) == count
    measured = (count - 1) * size * 8 / (arrivals[-1] - arrivals[0])
    assert measured == pytest.approx(rate_bps, rel=0.15)


def test_a_tiny_or_absurd_rate_never_stalls_or_crashes_the_sender():
    """A share of 1e-300 of the band used to overflow the sleep; now positive rates have a
    floor, and non-finite ones are refused."""
    pacer, clock = make_pacer(1e-300, 0)
    pacer.wait(1000)
    assert clock.now == pytest.approx(1000 * 8 / MIN_RATE_BPS)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError):
            pacer.set_rate(bad)
