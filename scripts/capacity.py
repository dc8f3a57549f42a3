"""How many devices one verifier serves: the capacity of four ways of serving, in the simulator.

    .venv/bin/python scripts/capacity.py [--rate 5] [--max-devices 96] [--seconds 20]
        [--plot docs/img/capacity.png] [--json out/capacity.json]      # ~5 minutes

N devices of a stated mix (the hetero-3 trial's three kinds of board, repeated: a code
board, a chat laptop, a translating phone; drafting paced as in the trial, acceptance as
measured there, its links) share one uplink band and one verifier. For each way of
serving: synchronous rounds, continuous batching, proactive drafting (each with
`heterogeneous` solved for it: docs/system-model.md) and server-side decoding (no
drafts: the verifier decodes every device, one token per forward), N grows until the
slowest device's goodput in the simulator falls below --rate (N in multiples of 3, so
the mix stays whole: every 3 up to 24, then about x1.5 a step). Two verify laws: the
CPU verifier of this project's trials (its law MEASURED, fitted on their forwards: 135M
target on one core; the capacity itself is simulated) and a GPU-class law (ASSUMED, as
configs/scenarios: a 7B-class target on an edge GPU). Capacity: the largest N before the
first N at which some device gets less than the rate. The plans maximise the sum of
goodput, as the controller's do, which can leave the slowest kind of device little
(server-side decoding is fair by construction), so the mean device's capacity is reported too.

What it leaves out: the drafters' cores are the devices' own (a trial on one host shares
them); prompts and prefill; the model's and simulator's simplifications
(docs/system-model.md, docs/simulator.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_controller.control import Plan, SystemParams, UserParams, VerifyTime, solve  # noqa: E402
from edge_controller.control.serving import plan_for  # noqa: E402
from edge_controller.simulator import simulate_plan  # noqa: E402

# The hetero-3 trial's devices (configs/trials/hetero-3.toml): drafting s/token (the
# trial's pace, the drafter's own speed being faster), acceptance measured in its runs
# (docs/results.md), spectral efficiency and one-way delay as its links (x 2: round trip).
MIX = (  # name, t_k, a_k, s_k, d_k
    ("code", 0.02, 0.95, 5.0, 0.010),
    ("chat", 0.03, 0.65, 2.5, 0.020),
    ("translate", 0.12, 0.55, 0.8, 0.060),
)
LAWS = {
    "CPU (measured law)": VerifyTime(0.0455, 0.0071),  # fit on 1,139 trial forwards, 1-24 tokens
    "GPU (assumed law)": VerifyTime(0.030, 0.0002),
}
SERVING = ("sync", "continuous", "proactive", "server-decode")
BANDWIDTH_HZ = 1e6  # one 1 MHz uplink band for all of them
BITS_PER_TOKEN, OVERHEAD_BITS = 16.0, 800.0  # greedy ids; ~100 bytes of framing


DRAFT_SPEEDUP = 1.0  # --draft-speedup: boards that draft this many times faster


def devices(n: int) -> UserParams:
    rows = [MIX[i % len(MIX)] for i in range(n)]
    return UserParams([r[1] / DRAFT_SPEEDUP for r in rows], [r[2] for r in rows],
                      [r[3] for r in rows], [r[4] for r in rows],
                      names=tuple(f"{r[0]}-{i}" for i, r in enumerate(rows)))


def warm_plan(previous: Plan | None, n: int) -> Plan | None:
    """A start for n devices: each device at the length the previous N's plan gave its kind
    (the mix repeats, so the optimum moves little), so the ascent takes few moves."""
    if previous is None:
        return None
    kinds = previous.draft_len[: len(MIX)]
    lengths = np.array([kinds[i % len(MIX)] for i in range(n)])
    return Plan(previous.policy, lengths, np.full(n, 1.0 / n), np.zeros(n), 0.0, 0.0)


def goodputs(serving: str, law: VerifyTime, n: int, seconds: float,
             warm: Plan | None = None) -> tuple[np.ndarray, Plan]:
    """(n,) each device's goodput (tok/s) with n devices served this way, simulated, and
    the plan played."""
    system = SystemParams(BANDWIDTH_HZ, BITS_PER_TOKEN, law, OVERHEAD_BITS, max_draft_len=16)
    users = devices(n)
    if serving == "server-decode":  # nothing drafted or uploaded, no link in the loop
        users = UserParams(np.zeros(n), users.acceptance, users.spectral_efficiency, 0.0)
        system = SystemParams(BANDWIDTH_HZ, BITS_PER_TOKEN, law, 0.0, max_draft_len=0)
        plan = solve("fixed-L", system, users, fixed_draft_len=0)
        result = simulate_plan(system, users, plan, seconds, scheduler="continuous")
    else:
        plan = plan_for(serving, "heterogeneous", system, users,  # serving: from the last N
                        warm=None if serving == "sync" else warm_plan(warm, n))
        result = simulate_plan(system, users, plan, seconds, scheduler=serving)
    return result.user_goodput_tok_s, plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=5.0, help="tok/s every device must get")
    parser.add_argument("--max-devices", type=int, default=96)
    parser.add_argument("--seconds", type=float, default=20.0, help="simulated per point")
    parser.add_argument("--draft-speedup", type=float, default=1.0, metavar="X",
                        help="the boards draft X times faster than the trial's paced ones "
                        "(its 20-120 ms a token emulate slow boards for a CPU verifier)")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "capacity.png")
    parser.add_argument("--json", type=Path, help="write every point here")
    args = parser.parse_args(argv)
    global DRAFT_SPEEDUP
    if args.draft_speedup <= 0:
        parser.error("--draft-speedup must be > 0")
    DRAFT_SPEEDUP = args.draft_speedup
    counts = [n for n in (*range(3, 25, 3), 36, 48, 72, 96, 144, 192, 288, 384)
              if n <= args.max_devices]
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    capacity: dict[str, dict[str, dict[str, int]]] = {}
    for law_name, law in LAWS.items():
        curves[law_name], capacity[law_name] = {}, {}
        for serving in SERVING:
            slowest, mean, plan = [], [], None
            for n in tqdm(counts, desc=f"{law_name}, {serving}", unit="N", leave=False):
                got, plan = goodputs(serving, law, n, args.seconds, plan)
                slowest.append(float(got.min()))
                mean.append(float(got.mean()))
                if mean[-1] < args.rate / 2:  # far below: the rest only falls
                    break
            curves[law_name][serving] = {"slowest": slowest, "mean": mean}
            capacity[law_name][serving] = {
                which: _capacity(counts, values, args.rate)
                for which, values in curves[law_name][serving].items()}
            cap = capacity[law_name][serving]
            print(f"{law_name:>15} {serving:>13}: every device >= {args.rate:g} tok/s up to "
                  f"{cap['slowest']:>3} devices; the mean device up to {cap['mean']:>3}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rate": args.rate, "counts": counts,
                                         "curves": curves, "capacity": capacity}, indent=2))
    plot(curves, counts, args.rate, args.plot)
    return 0


def _capacity(counts: list[int], values: list[float], rate: float) -> int:
    """The largest N before the first that falls below ``rate`` (0 if the first does)."""
    capacity = 0
    for n, value in zip(counts, values, strict=False):
        if value < rate:
            break
        capacity = n
    return capacity


def plot(curves: dict, counts: list[int], rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(11, 4), sharey=False)
    for ax, (law_name, by_serving) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        for i, (serving, points) in enumerate(by_serving.items()):
            color = f"C{i}"
            ax.plot(counts[: len(points["slowest"])], points["slowest"], marker="o", ms=3,
                    color=color, label=f"{serving}: slowest device")
            ax.plot(counts[: len(points["mean"])], points["mean"], ls=":", color=color,
                    label=f"{serving}: mean device")
        ax.axhline(rate, color="k", ls="--", lw=0.8, label=f"{rate:g} tok/s")
        ax.set(title=f"verifier: {law_name}", xlabel="devices (the hetero-3 mix, repeated)",
               ylabel="goodput per device (tok/s)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Capacity of one verifier, simulated (heterogeneous plans for each serving"
                 + (f"; boards drafting {DRAFT_SPEEDUP:g}x the trial's pace)"
                    if DRAFT_SPEEDUP != 1 else ")"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
