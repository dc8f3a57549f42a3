"""Fuzz a live controller while a real device generates next to it.

A real controller (CURVE, fixed policy) and a real agent that generates the same prompt
again and again (its output checked against the target alone, token for token); beside
them, fuzzers on allowlisted keys send frames at ``--rate`` frames/s in all. Frames are
drawn by Hypothesis from every message type and field (edge_controller/fuzzing.py: up to
``--pool`` of them; a longer run cycles through cheap mutations of that pool). After every
frame a fuzzer sends a ping and waits for its pong: what came back in between is the
frame's answer. A crash is: the controller dies, logs an unhandled exception, or a frame
that must be answered (fuzzing.expected_answer) is not, or the pong never comes.

The agent's speed is compared with a baseline run in which the fuzzers send valid pings
at the same rate: ``agent_slowdown`` = baseline tokens/s / tokens/s under fuzzing.

    .venv/bin/python scripts/fuzz_controller.py --frames 10000 --rate 500 --seed 1 --json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from device_agent.link import ControllerLink, LinkTimeout
from edge_controller import fuzzing
from edge_controller import protocol as P
from edge_controller.launch import AgentSpec, LabKeys, controller_process

PROMPT = "The rules of chess are"
NEW_TOKENS = 24
FRAMES_PER_S_PER_KEY = 80  # each frame goes with a ping: under the controller's 200 msg/s
BARRIER_TIMEOUT_S = 15.0


class Fuzzer(threading.Thread):
    """One allowlisted key sending its share of the frames, each followed by a ping."""

    def __init__(self, index: int, endpoint: str, keys: LabKeys, frames: list[bytes],
                 rate: float, fingerprint: str, vocab_size: int):
        super().__init__(daemon=True)
        self.link = ControllerLink(endpoint, curve=keys.client(f"fuzz{index}"), timeout_s=30)
        self.frames, self.interval = frames, 1.0 / rate
        self.hello = P.Hello("", "fuzzer", fingerprint, vocab_size)
        self.sent = self.missing_replies = self.lost = 0
        self.examples: list[str] = []  # hex of frames that got no answer

    def run(self) -> None:
        next_at = time.monotonic()
        for i, frame in enumerate(self.frames):
            if i % 64 == 0:  # registered again now and then: the registered paths too
                self.link.send(self.hello)
                self._answers(-1.0)
            time.sleep(max(next_at - time.monotonic(), 0.0))
            # Behind (the controller was slow): go on at the pace, never in a catch-up
            # burst, which the rate limit would drop (and the barrier pong with it).
            next_at = max(next_at + self.interval, time.monotonic())
            self.link.send_raw([frame])
            self.sent += 1
            answers = self._answers(float(i))
            if answers is None:
                self.lost += 1
                self.examples.append(frame[:64].hex())
            elif (expected := fuzzing.expected_answer(frame)) and not any(
                    isinstance(answer, expected) for answer in answers):
                self.missing_replies += 1
                self.examples.append(frame[:64].hex())
        self.link.close()

    def _answers(self, barrier: float) -> list | None:
        return fuzzing.answers_before_pong(self.link, barrier, BARRIER_TIMEOUT_S)


def run_phase(endpoint: str, keys: LabKeys, frames: list[bytes], rate: float, info,
              default_models) -> tuple[list[Fuzzer], list[dict], float]:
    """Fuzzers over ``frames`` and the agent generating until they are done."""
    workers = max(1, math.ceil(rate / FRAMES_PER_S_PER_KEY))
    fuzzers = [Fuzzer(w, endpoint, keys, frames[w::workers], rate / workers, info.fingerprint,
                      info.vocab_size) for w in range(workers)]
    spec = AgentSpec("agent", default_models.drafts["q8_0"], PROMPT, NEW_TOKENS,
                     ("--timeout", "60"), requests=2)
    results: list[dict] = []
    started = time.monotonic()
    for fuzzer in fuzzers:
        fuzzer.start()
    while any(f.is_alive() for f in fuzzers) or not results:
        proc = subprocess.run(spec.command(endpoint, keys), capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            results.append({"error": proc.stderr.strip()[-500:]})
            break
        results += [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    for fuzzer in fuzzers:
        fuzzer.join()
    return fuzzers, results, time.monotonic() - started


def answers_a_ping(endpoint: str, keys: LabKeys) -> bool:
    with ControllerLink(endpoint, curve=keys.client("last-look"), timeout_s=10) as link:
        link.send(P.Ping(7.0))
        try:
            return isinstance(link.receive(), P.Pong)
        except (LinkTimeout, P.ProtocolError):
            return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=500.0, help="frames/s, all fuzzers")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline-frames", type=int,
                        help="pings in the baseline run (default: --frames)")
    parser.add_argument("--pool", type=int, default=20_000,
                        help="frames drawn by Hypothesis; longer runs mutate them")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fuzz")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import models
    from edge_controller.controller import TargetInfo
    from models.target import load_target, reference_greedy

    default_models = models.ensure()
    target = load_target(default_models.target_gguf)
    info = TargetInfo.from_model("smollm2-135m", *target)
    rng = random.Random(args.seed)
    pool = fuzzing.corpus(args.seed, min(args.pool, args.frames),
                          vocab_size=info.vocab_size)
    frames = list(itertools.islice(itertools.chain(pool, (
        fuzzing.mutate(rng.choice(pool), rng.choice(pool), rng)
        for _ in itertools.count())), args.frames))
    pings = [P.encode(P.Ping(0.5))] * (args.baseline_frames or len(frames))  # the baseline

    with LabKeys() as keys:
        log_path = args.out / "controller.log"
        with controller_process(log_path, keys, "--policy", "fixed") as controller:
            endpoint = controller.endpoint
            base_fuzzers, base_results, _ = run_phase(endpoint, keys, pings, args.rate, info,
                                                      default_models)
            fuzzers, results, seconds = run_phase(endpoint, keys, frames, args.rate, info,
                                                  default_models)
            alive = answers_a_ping(endpoint, keys)
        tracebacks = log_path.read_text().count("Traceback")
    runs = [r for r in results if "tokens" in r]
    base_runs = [r for r in base_results if "tokens" in r]
    if not runs or not base_runs:
        print(f"fuzz: the agent finished no request: {(results + base_results)[:2]}",
              file=sys.stderr)
        return 1
    reference, _ = reference_greedy(target, runs[0]["prompt_tokens"], NEW_TOKENS)
    lossless = all(r["tokens"] == reference for r in runs + base_runs) and not any(
        "error" in r for r in results + base_results)

    def rate(done: list[dict]) -> float:
        return sum(len(r["tokens"]) for r in done) / sum(
            len(r["tokens"]) / r["stats"]["tokens_per_s"] for r in done)

    missing = sum(f.missing_replies for f in fuzzers)
    lost = sum(f.lost for f in fuzzers + base_fuzzers)
    summary = {
        "frames": sum(f.sent for f in fuzzers),
        "crashes": missing + lost + tracebacks + (0 if alive else 1),
        "controller_alive": alive,
        "agent_lossless": lossless,
        "agent_slowdown": rate(base_runs) / rate(runs),
        "missing_replies": missing, "lost_pongs": lost, "tracebacks": tracebacks,
        "agent_requests": len(runs), "seconds": seconds, "rate": args.rate, "seed": args.seed,
        "pool": len(pool), "examples": [e for f in fuzzers for e in f.examples][:10],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['frames']} frames at {args.rate:g}/s: {summary['crashes']} crashes, "
              f"controller alive: {alive}, agent lossless: {lossless} "
              f"({len(runs)} requests), agent slowdown {summary['agent_slowdown']:.2f}x")
    return 0 if summary["crashes"] == 0 and lossless else 1


if __name__ == "__main__":
    sys.exit(main())
