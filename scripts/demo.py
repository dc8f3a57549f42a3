"""Local demo: one edge controller and three device agents with different drafts.

Starts ``edge-controller start`` on loopback, then three ``device-agent generate --json``
processes at once (drafts q8_0, q5_0, q4_0, one prompt each), and prints a per-device table
and the texts. Every text is exactly what the target model alone would write (greedy).

    scripts/demo.sh [--max-new-tokens 64] [--temperature 0.8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEVICES = [
    ("jetson-orin-q8", "q8_0", "Write a short poem about the sea.\n"),
    ("laptop-q5", "q5_0", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("phone-q4", "q4_0", "Photosynthesis is the process by which"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="log folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    print("building the default models (cached after the first run) ...", flush=True)
    subprocess.run([BIN / "python", "-m", "models", "ensure"], check=True, cwd=ROOT)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    log_path = args.out / "controller.log"
    with open(log_path, "w") as log:
        controller = subprocess.Popen(
            [BIN / "edge-controller", "start", "--config", ROOT / "configs" / "controller.toml",
             "--bind", endpoint], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
    try:
        print(f"starting the controller on {endpoint} (log: {log_path}) ...", flush=True)
        _wait_for(log_path, "serving", controller, timeout_s=300)
        print("running 3 device agents at once ...", flush=True)
        agents = [
            subprocess.Popen(
                [BIN / "device-agent", "generate", "--controller", endpoint, "--device-id", name,
                 "--draft", draft, "--prompt", prompt, "--max-new-tokens",
                 str(args.max_new_tokens), "--temperature", str(args.temperature), "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            )
            for name, draft, prompt in DEVICES
        ]
        results = []
        for (name, draft, _), agent in zip(DEVICES, agents, strict=True):
            out, err = agent.communicate(timeout=900)
            if agent.returncode != 0:
                print(f"{name}: device agent failed ({agent.returncode}):\n{err}", file=sys.stderr)
                return 1
            results.append((name, draft, json.loads(out)))
    finally:
        controller.send_signal(signal.SIGINT)
        controller.wait(timeout=30)
    _print_table(results)
    return 0


def _print_table(results: list[tuple[str, str, dict]]) -> None:
    header = (f"{'device':<16} {'draft':<6} {'tokens':>6} {'rounds':>6} {'accept':>7} "
              f"{'tok/round':>9} {'draft tok/s':>11} {'goodput tok/s':>13}")
    print("\n" + header + "\n" + "-" * len(header))
    for name, draft, r in results:
        s = r["stats"]
        print(f"{name:<16} {draft:<6} {len(r['tokens']):>6} {s['rounds']:>6} "
              f"{s['acceptance_rate']:>7.2f} {s['tokens_per_round']:>9.2f} "
              f"{s['draft_tokens_per_s']:>11.1f} {s['goodput_tok_s']:>13.2f}")
    for name, _, r in results:
        print(f"\n--- {name} ---\n{r['text']}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log_path: Path, text: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log_path.read_text():
        if process.poll() is not None:
            raise SystemExit(f"controller exited ({process.returncode}); see {log_path}")
        if time.monotonic() > deadline:
            raise SystemExit(f"controller not ready after {timeout_s:.0f} s; see {log_path}")
        time.sleep(0.2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
