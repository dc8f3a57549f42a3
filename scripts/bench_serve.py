"""What the HTTP layer costs: ``device-agent generate`` vs ``device-agent serve`` on the same
prompts, against one controller, in one run.

Per prompt, ``--requests`` greedy requests each way, in alternating blocks (generate,
serve, generate, serve) so that drift on a noisy machine hits both. ``generate``'s time is
its own per-request wall time (prompt in to last verdict, from its --json stats); serve's
is the client's, HTTP request out to the whole answer in (non-streamed), and to the first
event and to the last (streamed). Both sides must produce the same text. The controller
runs ``--policy fixed`` so both get the same draft lengths.

    .venv/bin/python scripts/bench_serve.py [--requests 5] [--max-new-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from edge_controller.launch import (
    BIN,
    AgentSpec,
    LabKeys,
    controller_process,
    free_endpoint,
    run_agents,
)

PROMPTS = [
    "The three most important inventions of the last century are",
    "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Photosynthesis is the process by which",
]


def post(url: str, body: dict) -> tuple[dict | list[float], float]:
    """(answer, seconds) of a completion; streamed: (arrival times of events, seconds)."""
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        if not body.get("stream"):
            return json.loads(response.read()), time.perf_counter() - started
        arrivals, text = [], []
        for line in response:
            if line.startswith(b"data: {"):
                arrivals.append(time.perf_counter() - started)
                text.append(json.loads(line[6:])["choices"][0]["text"])
        return ["".join(text), arrivals], time.perf_counter() - started


def wait_healthy(url: str, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                return json.loads(response.read())["target"]
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("device-agent serve never became healthy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5, help="per prompt, per block")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--draft", default="q4_0")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n = args.max_new_tokens
    times: dict[str, list[float]] = {"generate": [], "serve": [], "serve_stream": [],
                                     "stream_first_event": []}
    mismatches = 0
    with LabKeys() as keys, controller_process(Path("/tmp/bench_serve_controller.log"), keys,
                                               "--policy", "fixed") as controller:
        port = free_endpoint().rpartition(":")[2]
        url = f"http://127.0.0.1:{port}"
        serve = subprocess.Popen(
            [str(BIN / "device-agent"), "serve", "--controller", controller.endpoint,
             *keys.agent_args("bench-serve"), "--draft", args.draft, "--http",
             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            model = wait_healthy(url)
            post(url, {"model": model, "prompt": PROMPTS[0], "max_tokens": 4,
                       "temperature": 0})  # warm-up
            for block in range(2):
                print(f"block {block + 1}/2: generate", file=sys.stderr)
                texts = {}
                for prompt in PROMPTS:  # one agent at a time, as serve runs
                    (results,) = run_agents(controller.endpoint, [AgentSpec(
                        "bench-gen", args.draft, prompt, n, requests=args.requests)], keys)
                    texts[prompt] = results[0]["text"]
                    times["generate"] += [len(r["tokens"]) / r["stats"]["tokens_per_s"]
                                          for r in results]
                print(f"block {block + 1}/2: serve", file=sys.stderr)
                for prompt in PROMPTS:
                    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0}
                    for _ in range(args.requests):
                        answer, seconds = post(url, body)
                        times["serve"].append(seconds)
                        mismatches += answer["choices"][0]["text"] != texts[prompt]
                        (text, arrivals), seconds = post(url, {**body, "stream": True})
                        times["serve_stream"].append(seconds)
                        times["stream_first_event"].append(arrivals[0])
                        mismatches += text != texts[prompt]
        finally:
            serve.terminate()
            serve.wait(30)
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "requests_each_way": len(times["generate"]), "max_new_tokens": n,
        "median_s": medians,
        "serve_over_generate": medians["serve"] / medians["generate"],
        "stream_over_generate": medians["serve_stream"] / medians["generate"],
        "overhead_ms": (medians["serve"] - medians["generate"]) * 1000,
        "text_mismatches": mismatches,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{len(times['generate'])} requests each way, {n} tokens, median per request:")
        for name, value in medians.items():
            print(f"  {name:20s} {value * 1000:8.1f} ms")
        print(f"serve / generate: {report['serve_over_generate']:.3f} "
              f"({report['overhead_ms']:+.1f} ms); streamed: "
              f"{report['stream_over_generate']:.3f}; text mismatches: {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
