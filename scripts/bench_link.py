"""What the secure link costs: CURVE vs plain TCP, in one run, on this host's loopback.

Two measurements, each with keys (CURVE + ZAP allowlist) and without (--insecure):

1. **Link round trip**: a device link sends a frame of a draft's size to the controller's
   real transport, which sends it straight back; median and p99 over ``--frames``, for a
   greedy draft (16 token ids) and a sparse-sampling draft (16 x 32 (id, count) pairs).
2. **Controller round**: a real controller with the real target (fixed policy, L = 4)
   and one device link doing ``--rounds`` rounds: draft sent -> verdict received.

Each side runs ``--repeats`` times in alternating order; printed: the medians over all
runs and the ratio CURVE / plain for each.

    .venv/bin/python scripts/bench_link.py [--frames 2000] [--rounds 40] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from device_agent.link import ControllerLink
from edge_controller import protocol as P
from edge_controller.launch import LabKeys
from edge_controller.transport import Transport

DRAFT_LEN = 16
SPARSE_K = 32


def draft_frames() -> dict[str, P.Draft]:
    tokens = list(range(1000, 1000 + DRAFT_LEN))
    ids = [[t, *range(2000 + 40 * i, 2000 + 40 * i + SPARSE_K - 1)]
           for i, t in enumerate(tokens)]
    return {"greedy": P.Draft("r", 0, 100, tokens),
            "sparse": P.Draft("r", 0, 100, tokens, ids, [[1000] * SPARSE_K] * DRAFT_LEN)}


@contextmanager
def echo_transport(keys: LabKeys):
    """The controller's real Transport, answering every frame with itself, in a thread."""
    transport = Transport("tcp://127.0.0.1:*", None if keys.insecure else keys.controller_dir,
                          insecure=keys.insecure)
    endpoint = transport.open()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            if transport.poll(0.05):
                while (message := transport.receive()) is not None:
                    peer, body = message
                    transport.send(peer.route, body[0])

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join()
        transport.close()


def link_round_trips(keys: LabKeys, frames: int) -> dict[str, list[float]]:
    out = {}
    with echo_transport(keys) as endpoint, \
            ControllerLink(endpoint, curve=keys.client("bench"), timeout_s=10) as link:
        for kind, draft in draft_frames().items():
            times = []
            for i in range(frames + 50):
                started = time.perf_counter()
                link.send(draft)
                link.receive()
                if i >= 50:  # warm-up: the handshake, the first allocations
                    times.append(time.perf_counter() - started)
            out[kind] = times
    return out


def controller_rounds(keys: LabKeys, target, target_info, rounds: int,
                      threads: int | None = None) -> list[float]:
    from edge_controller.config import load_config
    from edge_controller.controller import EdgeController
    from edge_controller.verifier.engine import Verifier

    config = load_config(None, server__bind="tcp://127.0.0.1:*", control__policy="fixed",
                         **keys.config_overrides())
    controller = EdgeController(config, Verifier(target[0], max_sessions=2, max_len=512),
                                target_info, torch_threads=threads)
    times = []
    with controller.running(), ControllerLink(controller.endpoint, curve=keys.client("bench"),
                                              timeout_s=60) as link:
        link.send(P.Hello("bench", "bench", target_info.fingerprint, target_info.vocab_size))
        link.receive()
        prompt = [1, 504, 3458, 314, 253, 1345]
        link.send(P.Start("r", prompt, rounds * 6))
        link.receive()  # control
        position = len(prompt)
        for r in range(rounds):
            started = time.perf_counter()
            link.send(P.Draft("r", r, position, [42, 43, 44, 45]))
            verdict = link.receive()
            times.append(time.perf_counter() - started)
            if not isinstance(verdict, P.Verdict):
                raise RuntimeError(f"round {r}: expected a verdict, got {verdict}")
            position += len(verdict.tokens)
            if verdict.done:
                break
    return times[2:]


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3, "n": len(ordered)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each side, in alternating order (default 3)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import models
    from edge_controller.controller import TargetInfo
    from edge_controller.verifier.worker import torch_to_the_verifier
    from models.target import load_target

    threads = torch_to_the_verifier()  # as edge-controller start does
    target = load_target(models.ensure().target_gguf)
    target_info = TargetInfo.from_model("smollm2-135m", *target)
    result: dict = {"link": {}, "round": {}}
    link_times: dict = {}
    round_times: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        setups = {"curve": LabKeys(Path(tmp) / "keys"), "plain": LabKeys(insecure=True)}
        for rep in range(args.repeats):  # alternate the order: neither side always goes first
            for label in sorted(setups, reverse=rep % 2 == 1):
                keys = setups[label]
                for kind, times in link_round_trips(keys, args.frames).items():
                    link_times.setdefault(kind, {}).setdefault(label, []).extend(times)
                round_times.setdefault(label, []).extend(
                    controller_rounds(keys, target, target_info, args.rounds, threads))
    for kind, by_label in link_times.items():
        result["link"][kind] = {label: summary(t) for label, t in by_label.items()}
    result["round"] = {label: summary(t) for label, t in round_times.items()}
    for row in result["link"].values():
        row["ratio"] = row["curve"]["median_ms"] / row["plain"]["median_ms"]
    result["round"]["ratio"] = (result["round"]["curve"]["median_ms"]
                                / result["round"]["plain"]["median_ms"])
    sizes = {k: len(P.encode(d)) for k, d in draft_frames().items()}
    if args.json:
        print(json.dumps({**result, "frame_bytes": sizes}, indent=2))
        return 0
    for kind, row in result["link"].items():
        print(f"link round trip, {kind} draft ({sizes[kind]} B): CURVE "
              f"{row['curve']['median_ms']:.3f} ms (p99 {row['curve']['p99_ms']:.3f}) vs plain "
              f"{row['plain']['median_ms']:.3f} ms (p99 {row['plain']['p99_ms']:.3f}): "
              f"{row['ratio']:.2f}x")
    r = result["round"]
    print(f"controller round (L=4, real target): CURVE {r['curve']['median_ms']:.1f} ms vs "
          f"plain {r['plain']['median_ms']:.1f} ms: {r['ratio']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
