"""The soak: many synthetic devices against one real controller for minutes, nothing lost.

A real `edge-controller start` (CURVE keys, the real loop, draft control, timeline) and N
synthetic devices (device_agent/synthetic.py: the real agent over real ZeroMQ, drafting by
replaying recorded real drafts) in a few worker processes. ``--verifier stub`` verifies by
replaying the recorded target transcripts at a verify-time fit (no model: the CPU goes to
the controller's own work); ``--verifier real`` runs the real target (16 slots). Every
request's output is checked against the recorded truth. The controller's RSS is sampled
every few seconds. docs/soak.md says what each figure means.

    .venv/bin/python scripts/load_test.py --devices 200 --minutes 10 --verifier stub --json
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_agent.synthetic import DEVICES_PER_PROCESS  # noqa: E402
from edge_controller.config import SCHEDULERS, TargetConfig  # noqa: E402
from edge_controller.launch import (  # noqa: E402
    LabKeys,
    free_endpoint,
    start_controller,
    stop_controller,
)
from edge_controller.trial.runner import busy_fraction  # noqa: E402
from models.traces import TRACES_DIR, TraceSet  # noqa: E402

RSS_EVERY_S = 2.0


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def controller_config(args: argparse.Namespace, traces: TraceSet, out: Path) -> Path:
    longest = max(len(t.prompt_ids) + len(t.truth) for t in traces.traces)
    max_len = 1 << math.ceil(math.log2(longest + 17 + 1))  # small: bookkeeping, not text
    slots = args.devices if args.verifier == "stub" else 16
    target, control = "", f"policy = {json.dumps(args.policy)}\n"
    if args.verifier == "stub":
        a, b = args.verify_time
        target = (f"[target]\nreplay = {json.dumps(str(args.traces))}\n"
                  f"replay_verify_time = [{a}, {b}]\n")
        if args.verify_time_file:
            control += f"verify_time_file = {json.dumps(str(args.verify_time_file))}\n"
    config = out / "controller.toml"
    config.write_text(
        f"{target}[server]\ntimeline = {json.dumps(str(out / 'timeline.jsonl'))}\n"
        f"scheduler = {json.dumps(args.scheduler)}\n"
        f"[limits]\nmax_sessions = {slots}\nmax_devices = {max(args.devices, 16)}\n"
        f"max_len = {max_len}\nmax_new_tokens = {max_len - 18}\n[control]\n{control}")
    return config


def verify_time_fit(args: argparse.Namespace, source: str) -> dict | str:
    """What the stub slept per forward, and where that law came from."""
    if args.verifier == "real":
        return "calibrated on this machine (controller log)"
    if args.verify_time_file:
        return {"law": json.loads(args.verify_time_file.read_text()), "source": source}
    return {"a_s": args.verify_time[0], "b_s_per_token": args.verify_time[1], "source": source}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--verifier", choices=("stub", "real"), default="stub")
    parser.add_argument("--verify-time", type=float, nargs=2, metavar=("A", "B"),
                        help="stub: seconds per forward and per token fed (default: an "
                        "ASSUMED GPU-class fit, target.replay_verify_time's default)")
    parser.add_argument("--verify-time-file", type=Path, metavar="FIT.json",
                        help="stub: sleep what a `scripts/bench_verify.py --sweep` law "
                        "says of each forward's draft lengths and contexts (e.g. a sweep "
                        "measured on a GPU) instead")
    parser.add_argument("--policy", default="heterogeneous")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="sync",
                        help="the controller's scheduler (docs/scheduling.md); under "
                        "proactive the synthetic devices pre-draft from their recordings")
    parser.add_argument("--server-decode", action="store_true",
                        help="the synthetic devices draft nothing: the controller decodes "
                        "every request, one token per forward (as --draft none)")
    parser.add_argument("--traces", type=Path, default=TRACES_DIR / "smollm2-135m.json.gz")
    parser.add_argument("--warmup-s", type=float, default=None,
                        help="RSS after warm-up is taken this long in (default: a fifth)")
    parser.add_argument("--out", type=Path, default=Path("out/soak"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.verify_time is None:
        args.verify_time, source = TargetConfig.replay_verify_time, "assumed GPU-class"
    else:
        source = "given (--verify-time)"
    if args.verify_time_file:
        args.verify_time_file = args.verify_time_file.resolve()
        source = f"{args.verify_time_file} (scripts/bench_verify.py law)"
    args.traces = args.traces.resolve()  # the workers run in the repository
    if args.devices < 1 or args.minutes <= 0:
        parser.error("need --devices >= 1 and --minutes > 0")
    if args.verifier == "real" and args.devices > 16:
        parser.error("--verifier real runs 16 KV slots: at most 16 devices")
    traces = TraceSet.load(args.traces)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timeline.jsonl").unlink(missing_ok=True)
    duration = args.minutes * 60
    warmup = duration / 5 if args.warmup_s is None else args.warmup_s
    names = [f"syn-{i:03d}" for i in range(args.devices)]

    with LabKeys() as keys:
        for name in names:
            keys.device_dir(name)  # made and listed before the controller starts
        endpoint = free_endpoint()
        print(f"controller ({args.verifier} verifier) ...", file=sys.stderr, flush=True)
        controller = start_controller(args.out / "controller.log", keys, endpoint,
                                      "--config", str(controller_config(args, traces,
                                                                        args.out)))
        started = time.time()
        until = started + duration
        logs = ExitStack()
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "device_agent.synthetic", "--controller", endpoint,
                 "--names", ",".join(names[i:i + DEVICES_PER_PROCESS]),
                 "--keys-root", str(keys.root / "devices"),
                 f"--controller-key={keys.controller_key}", "--traces", str(args.traces),
                 "--until", str(until)] + (["--server-decode"] if args.server_decode else []),
                stdout=subprocess.PIPE,
                stderr=logs.enter_context((args.out / f"worker-{i}.log").open("w")),
                text=True, cwd=ROOT)
            for i in range(0, len(names), DEVICES_PER_PROCESS)
        ]
        rss: list[tuple[float, float]] = []
        try:
            while any(w.poll() is None for w in workers):
                rss.append((time.time() - started, rss_mib(controller.pid)))
                print(f"\r{rss[-1][0]:6.0f} s  controller RSS {rss[-1][1]:7.1f} MiB",
                      end="", file=sys.stderr, flush=True)
                time.sleep(RSS_EVERY_S)
            print(file=sys.stderr)
            tallies = [json.loads(line) for w in workers for line in w.communicate()[0]
                       .splitlines() if line.strip()]
            failed_workers = sum(w.returncode != 0 for w in workers)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
            logs.close()
            stop_controller(controller)

    events = [json.loads(x) for x in (args.out / "timeline.jsonl").read_text().splitlines()]
    rounds = [e["t"] for e in events if "devices" in e]
    gaps_ms = [(b - a) * 1e3 for a, b in zip(rounds, rounds[1:], strict=False)]
    after_warmup = [m for t, m in rss if t >= warmup]
    result = {
        "devices": args.devices,
        "minutes": args.minutes,
        "verifier": args.verifier,
        "scheduler": args.scheduler,
        "server_decode": args.server_decode,
        "devices_finished": len(tallies),
        "requests": sum(t["requests"] for t in tallies),
        "rounds": len(rounds),
        "tokens": sum(t["tokens"] for t in tallies),
        "lost_tokens": sum(t["lost_tokens"] for t in tallies),
        "duplicated_tokens": sum(t["duplicated_tokens"] for t in tallies),
        "errors": sum(t["errors"] for t in tallies) + (args.devices - len(tallies)),
        "worker_failures": failed_workers,
        "near_ties": sum(t["near_ties"] for t in tallies),
        # each device's committed tokens over the run: the slowest one's is the capacity
        # criterion of scripts/capacity.py
        "device_tok_s_min": round(min((t["tokens"] for t in tallies), default=0) / duration, 2),
        "device_tok_s_mean": round(sum(t["tokens"] for t in tallies)
                                   / max(len(tallies), 1) / duration, 2),
        "first_error": next((t["first_error"] for t in tallies if t["first_error"]), ""),
        "rss_mib_after_warmup": round(after_warmup[0], 1) if after_warmup else None,
        "rss_mib_max": round(max(m for _, m in rss), 1),
        "rss_mib_end": round(rss[-1][1], 1),
        "round_p50_ms": round(float(np.percentile(gaps_ms, 50)), 1) if gaps_ms else None,
        "round_p99_ms": round(float(np.percentile(gaps_ms, 99)), 1) if gaps_ms else None,
        "verify_time_fit": verify_time_fit(args, source),
        **forward_stats(events),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    plot_rss(rss, warmup, args.out / "rss.png", f"{args.devices} devices, {args.verifier}")
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    # Nothing lost means every device reported and nothing failed, not only zero counts.
    clean = not (result["lost_tokens"] or result["duplicated_tokens"] or result["errors"]
                 or failed_workers)
    return 0 if clean else 1


def forward_stats(events: list[dict]) -> dict:
    """The verifier's side of a run, from its timeline: the busy fraction, draft tokens per
    forward, and forward seconds fitted on them (ms + ms per token; prompt chunks riding
    along are in the seconds, not in the tokens)."""
    forwards = [e for e in events if "verify_s" in e]
    if len(forwards) < 2:
        return {}
    tokens = np.array([sum(d["draft_len"] + 1 for d in e["devices"]) for e in forwards])
    seconds = np.array([e["verify_s"] for e in forwards])
    per_token, base = np.polyfit(tokens, seconds, 1) if np.ptp(tokens) else (0.0, seconds.mean())
    return {"verifier_busy": round(busy_fraction(events), 3),
            "tokens_per_forward": round(float(tokens.mean()), 1),
            "forward_fit_ms": [round(float(base) * 1e3, 1), round(float(per_token) * 1e3, 2)]}


def plot_rss(rss: list[tuple[float, float]], warmup: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t / 60 for t, _ in rss], [m for _, m in rss])
    ax.axvline(warmup / 60, color="gray", linestyle="--", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("controller RSS (MiB)")
    ax.set_title(f"soak: {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
