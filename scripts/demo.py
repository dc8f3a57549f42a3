"""Local demo: one edge controller and three device agents with different drafts.

Makes keys in a temporary directory (a controller keypair, one per device, all listed:
what an operator does with ``keys init`` and ``keys add``), starts ``edge-controller start
--keys`` on loopback, then three ``device-agent generate --json`` processes at once (drafts
q8_0, q5_0, q4_0 in llama.cpp, one prompt each), and prints a per-device table and the
texts. With greedy decoding (the default) every text is exactly what the target model
alone would write; with --temperature it follows the target's distribution. ``--onnx``
adds a fourth device drafting with ONNX Runtime (the ``onnx`` draft, built on first use).

    scripts/demo.sh [--max-new-tokens 64] [--temperature 0.8 --seed 7] [--onnx]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from edge_controller.launch import AgentSpec, LabKeys, controller_process, run_agents

ROOT = Path(__file__).resolve().parent.parent
DEVICES = [
    ("jetson-orin-q8", "q8_0", "Write a short poem about the sea.\n"),
    ("laptop-q5", "q5_0", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("phone-q4", "q4_0", "Photosynthesis is the process by which"),
]
ONNX_DEVICE = ("npu-board-onnx", "onnx", "The three laws of motion state that")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "demo", help="log folder")
    parser.add_argument("--onnx", action="store_true", help="a fourth device drafting with "
                        "ONNX Runtime (its draft is built on first use, ~40 s here)")
    args = parser.parse_args()
    devices = DEVICES + [ONNX_DEVICE] if args.onnx else DEVICES

    print("building the default models (cached after the first run) ...", flush=True)
    include = ["--include", "onnx"] if args.onnx else []
    subprocess.run([sys.executable, "-m", "models", "ensure", *include], check=True)
    log_path = args.out / "controller.log"
    specs = [
        AgentSpec(name, draft, prompt, args.max_new_tokens,
                  ("--temperature", str(args.temperature), "--seed", str(args.seed)))
        for name, draft, prompt in devices
    ]
    print(f"starting the controller (log: {log_path}) ...", flush=True)
    with LabKeys() as keys, controller_process(
            log_path, keys, "--config", str(ROOT / "configs" / "controller.toml")) as controller:
        ep = controller.endpoint
        print(f"controller serving on {ep} (CURVE, keys in {keys.root}); running "
              f"{len(specs)} device agents at once ...", flush=True)
        results = [runs[0] for runs in run_agents(ep, specs, keys)]
    print_table(specs, results)
    return 0


def print_table(specs: list[AgentSpec], results: list[dict]) -> None:
    header = (f"{'device':<16} {'draft':<6} {'tokens':>6} {'rounds':>6} {'accept':>7} "
              f"{'tok/round':>9} {'draft tok/s':>11} {'goodput tok/s':>13}")
    print("\n" + header + "\n" + "-" * len(header))
    for spec, r in zip(specs, results, strict=True):
        s = r["stats"]
        print(f"{spec.device_id:<16} {spec.draft:<6} {len(r['tokens']):>6} {s['rounds']:>6} "
              f"{s['acceptance_rate']:>7.2f} {s['tokens_per_round']:>9.2f} "
              f"{s['draft_tokens_per_s']:>11.1f} {s['goodput_tok_s']:>13.2f}")
    for spec, r in zip(specs, results, strict=True):
        print(f"\n--- {spec.device_id} ({spec.draft}) ---\n{r['text']}")


if __name__ == "__main__":
    sys.exit(main())
