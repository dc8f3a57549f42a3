"""What one long prompt costs everyone else: other devices' round times while a device
sends a ~2,000-token prompt, against the same devices with no long prompt, in one run.

A real controller with the real target (fixed policy) serves ``--devices`` raw device
links that run rounds back to back (greedy drafts of 4 tokens; draft sent -> verdict
received is one round time). After ``--baseline-s`` a newcomer starts a request with a
``--prompt-tokens`` prompt and drafts at once; the window lasts until its first verdict
(its prompt is prefilled by then) plus 1 s. Printed: the others' p50/p99 round time in
the baseline and in that window, the largest gap, and the newcomer's time to its first
verdict.

    .venv/bin/python scripts/bench_prefill.py [--devices 2] [--prompt-tokens 2000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

from device_agent.link import ControllerLink
from edge_controller import protocol as P
from edge_controller.launch import LabKeys

SHORT_PROMPT = [1, 504, 3458, 314, 253, 1345, 28, 2853]


class Rounds(threading.Thread):
    """One device doing rounds back to back; (sent_at, answered_at) of each."""

    def __init__(self, endpoint: str, keys: LabKeys, name: str, fingerprint: str, vocab: int,
                 stop: threading.Event):
        super().__init__(daemon=True)
        self.link = ControllerLink(endpoint, curve=keys.client(name), timeout_s=120)
        self.fingerprint, self.vocab, self.stop = fingerprint, vocab, stop
        self.times: list[tuple[float, float]] = []
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.link.send(P.Hello("", "bench", self.fingerprint, self.vocab))
            self.link.receive()
            request = 0
            while not self.stop.is_set():
                request += 1
                self._request(f"r{request}")
        except Exception as exc:  # reported by the main thread
            self.error = exc
        finally:
            self.link.close()

    def _request(self, request_id: str) -> None:
        self.link.send(P.Start(request_id, SHORT_PROMPT, 400))
        while not isinstance(self.link.receive(), P.Control):
            pass
        position, last = len(SHORT_PROMPT), SHORT_PROMPT[-1]
        for round_ in range(10**6):
            sent = time.monotonic()
            self.link.send(P.Draft(request_id, round_, position, [last] * 4))
            verdict = self.link.receive()
            while isinstance(verdict, P.Control):
                verdict = self.link.receive()
            if not isinstance(verdict, P.Verdict):
                raise RuntimeError(f"expected a verdict, got {verdict}")
            self.times.append((sent, time.monotonic()))
            position, last = position + len(verdict.tokens), verdict.tokens[-1]
            if verdict.done or self.stop.is_set():
                return


def percentiles(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"n": len(ordered), "p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3, "max_ms": ordered[-1] * 1e3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--baseline-s", type=float, default=10.0)
    parser.add_argument("--prefill-chunk", type=int, help="limits.prefill_chunk (default: "
                        "the controller's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import models
    from edge_controller.config import load_config
    from edge_controller.controller import EdgeController, TargetInfo
    from edge_controller.verifier.engine import Verifier
    from edge_controller.verifier.worker import torch_to_the_verifier
    from models.target import load_target

    threads = torch_to_the_verifier()  # as edge-controller start does
    model, tokenizer = load_target(models.ensure().target_gguf)
    info = TargetInfo.from_model("smollm2-135m", model, tokenizer)
    keys = LabKeys()
    chunk = {"limits__prefill_chunk": args.prefill_chunk} if args.prefill_chunk else {}
    config = load_config(None, server__bind="tcp://127.0.0.1:*", control__policy="fixed",
                         limits__max_len=args.prompt_tokens + 48, **chunk,
                         **keys.config_overrides())
    controller = EdgeController(config, Verifier(model, max_sessions=args.devices + 1,
                                                 max_len=config.limits.max_len), info,
                                torch_threads=threads)
    stop = threading.Event()
    with controller.running():
        others = [Rounds(controller.endpoint, keys, f"dev{i}", info.fingerprint,
                         info.vocab_size, stop) for i in range(args.devices)]
        for device in others:
            device.start()
        time.sleep(args.baseline_s)
        long_prompt = (tokenizer("The history of the printing press. " * 400)["input_ids"]
                       * 2)[: args.prompt_tokens]
        with ControllerLink(controller.endpoint, curve=keys.client("newcomer"),
                            timeout_s=600) as newcomer:
            newcomer.send(P.Hello("", "bench", info.fingerprint, info.vocab_size))
            newcomer.receive()
            started = time.monotonic()
            newcomer.send(P.Start("long", long_prompt, 8))
            newcomer.receive()
            newcomer.send(P.Draft("long", 0, len(long_prompt), [long_prompt[-1]]))
            while not isinstance(newcomer.receive(), P.Verdict):
                pass
            first_verdict = time.monotonic()
        time.sleep(1.0)
        stop.set()
        for device in others:
            device.join(120)
    failures = [d.error for d in others if d.error]
    if failures:
        raise RuntimeError(f"a device failed: {failures[0]}")
    window_end = first_verdict + 1.0
    rounds = [(s, a) for d in others for s, a in d.times]
    baseline = [a - s for s, a in rounds if a < started]
    during = [a - s for s, a in rounds if a > started and s < window_end]
    result = {"devices": args.devices, "prompt_tokens": len(long_prompt),
              "prefill_chunk": config.limits.prefill_chunk,
              "time_to_first_verdict_s": first_verdict - started,
              "baseline": percentiles(baseline), "during_long_prefill": percentiles(during)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    b, d = result["baseline"], result["during_long_prefill"]
    print(f"others' rounds, baseline: p50 {b['p50_ms']:.0f} ms, p99 {b['p99_ms']:.0f} ms, "
          f"max {b['max_ms']:.0f} ms ({b['n']} rounds)")
    print(f"others' rounds while a {len(long_prompt)}-token prompt is prefilled: p50 "
          f"{d['p50_ms']:.0f} ms, p99 {d['p99_ms']:.0f} ms, max {d['max_ms']:.0f} ms "
          f"({d['n']} rounds)")
    print(f"newcomer's first verdict after {result['time_to_first_verdict_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
