"""The threshold policy's phase transitions: predicted vs simulated vs live.

Runs `configs/trials/delay-sweep.toml` (one device, as in seed 003) once per added
round-trip delay (one trial each, policy `threshold`, a real agent in a network namespace:
root), then:

* live: the swept device's draft length in the trial's rounds once every estimate was
  measured (median and counts), with the controller's own delay estimate d_k;
* predicted: the threshold rule on the parameters measured at the point that judged the
  most drafts (its trial's last plan: t_k, a_k, b0 + L b, T_v fit), with the delay set to
  each point's measured d_k; and the critical delays at which that rule's L steps up
  (closed form, checked on a 1 ms grid);
* simulated: the same parameters as a scenario whose swept delay drifts through the
  points (40 simulated seconds each), run through the live DraftController in the
  simulator (edge_controller/simulator/); its L at the end of each step.

    sudo .venv/bin/python scripts/threshold_sweep.py [--out out/threshold-sweep]
        [--delays-ms 0,25,50,75,100,150,200]

Writes sweep.json and sweep.png to --out and prints a markdown table (docs/results.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_controller.config import ControlConfig  # noqa: E402
from edge_controller.control import SystemParams, UserParams, solve  # noqa: E402
from edge_controller.control.scenario import parse_scenario  # noqa: E402
from edge_controller.control.solvers import critical_delays, stopping_costs  # noqa: E402
from edge_controller.draft_control import MODEL_INPUTS, problem_from_snapshot  # noqa: E402
from edge_controller.simulator import Controlled, SyncSimulation  # noqa: E402
from edge_controller.trial.report import write_report  # noqa: E402
from edge_controller.trial.runner import run_trial  # noqa: E402
from edge_controller.trial.spec import TrialSpec, load_trial  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (backend first)

SWEPT = "laptop-chat"
STEP_S = 40.0  # simulated seconds per delay point
DESIGN_MAX_DELAY_S = 0.050  # above: seed 003's edge-cloud regime


def live_point(spec: TrialSpec, added_ms: float, out: Path, reuse: bool) -> dict:
    """One trial with the swept device's link delay raised by ``added_ms`` round trip
    (``reuse``: read the one already in ``out``)."""
    devices = tuple(dataclasses.replace(d, delay_ms=d.delay_ms + added_ms / 2)
                    if d.name == SWEPT else d for d in spec.devices)
    point = dataclasses.replace(spec, devices=devices, name=f"{spec.name}-{added_ms:g}ms")
    if not reuse:
        write_report(run_trial(point, out), out)
    entry = json.loads((out / "report.json").read_text())["policies"]["threshold"]
    events = [json.loads(line) for line in
              (out / "threshold" / "timeline.jsonl").read_text().splitlines()]
    measured = [e for e in events if "estimates" in e and SWEPT in e["estimates"]
                and all(e["estimates"][SWEPT][k] is not None for k in MODEL_INPUTS)]
    if not measured:
        raise RuntimeError(f"{added_ms} ms: no plan with {SWEPT}'s estimates measured")
    since = measured[0]["t"]
    lengths = [d["draft_len"] for e in events if "devices" in e and e["t"] > since
               for d in e["devices"] if d["device"] == SWEPT]
    last = measured[-1]
    return {"added_ms": added_ms, "measured_delay_s": last["estimates"][SWEPT]["delay_s"],
            "judged": sum(min(d["accepted"] + 1, d["draft_len"]) for e in events
                          if "devices" in e for d in e["devices"]
                          if d["device"] == SWEPT and d.get("accepted") is not None),
            "live_median_L": statistics.median(lengths) if lengths else None,
            "live_L_counts": dict(sorted(Counter(lengths).items())),
            "estimates": last["estimates"], "verify_time": last["verify_time"],
            # the trial's goodput while both generated, the plans' prediction, the simulator
            # on the last plan (edge_controller/trial/runner.py: steady_state)
            "measured_tok_s": entry["goodput_tok_s"],
            "predicted_tok_s": entry["predicted_goodput_tok_s"],
            "simulated_tok_s": entry["simulated_goodput_tok_s"]}


def base_problem(base: dict, bandwidth_hz: float) -> tuple[SystemParams, UserParams]:
    return problem_from_snapshot(base["estimates"], base["verify_time"], bandwidth_hz)


def predicted_length(base: dict, bandwidth_hz: float, delay_s: float) -> int:
    system, users = base_problem(base, bandwidth_hz)
    k = users.names.index(SWEPT)
    delays = users.delay_s.copy()
    delays[k] = delay_s
    users = dataclasses.replace(users, delay_s=delays)
    return int(solve("threshold", system, users).draft_len[k])


def predicted_steps(base: dict, bandwidth_hz: float, max_delay_s: float) -> list[dict]:
    grid = np.arange(0.0, max_delay_s + 1e-9, 0.001)
    lengths = [predicted_length(base, bandwidth_hz, d) for d in grid]
    return [{"delay_s": float(grid[i]), "from_L": lengths[i - 1], "to_L": lengths[i]}
            for i in range(1, grid.size) if lengths[i] != lengths[i - 1]]


def closed_form_delays(base: dict, bandwidth_hz: float) -> list[float]:
    """d_L of the swept device where it is the round's last finisher, shares and any
    other device held as planned at the base point (``critical_delays``)."""
    system, users = base_problem(base, bandwidth_hz)
    plan = solve("threshold", system, users)
    k = users.names.index(SWEPT)
    tokens = users.acceptance.expected_tokens(
        np.broadcast_to(np.arange(system.max_draft_len + 1)[:, None],
                        (system.max_draft_len + 1, users.num_users)))
    others = tokens[plan.draft_len, np.arange(users.num_users)]
    fixed, per_token = stopping_costs(system, users, plan.draft_len, plan.bandwidth_share)
    delays = critical_delays(tokens, others.sum() - others, fixed, per_token, users.delay_s)
    return [float(d) for d in delays[:, k]]


def simulated_lengths(base: dict, bandwidth_hz: float, delays_s: list[float]) -> list[float]:
    system, users = base_problem(base, bandwidth_hz)
    scenario = parse_scenario({
        "system": {"bandwidth_hz": bandwidth_hz,
                   "bits_per_token": float(np.mean(system.bits_per_token)),
                   "overhead_bits": float(np.mean(system.overhead_bits)),
                   "max_draft_len": system.max_draft_len,
                   "verify_time": {"base_s": system.verify_time.base_s,
                                   "per_token_s": system.verify_time.per_token_s}},
        "users": [{"name": name, "draft_s_per_token": float(users.draft_s_per_token[i]),
                   "acceptance": base["estimates"][name].get("acceptance_curve")
                   or base["estimates"][name]["acceptance"],
                   "spectral_efficiency": float(users.spectral_efficiency[i]),
                   "delay_s": float(users.delay_s[i])} for i, name in enumerate(users.names)],
        "drift": [{"at_s": STEP_S * i, "user": SWEPT, "delay_s": d}
                  for i, d in enumerate(delays_s) if i > 0],
    }, "delay-sweep")
    k = users.names.index(SWEPT)  # the first point is the scenario's own (measured) delay
    result = SyncSimulation(scenario.system, scenario.users_at,
                            Controlled(ControlConfig(policy="threshold")),
                            scenario.change_times()).run(STEP_S * len(delays_s))
    times = np.array([t for t, _ in result.draft_len_changes])
    swept = np.array([lengths[k] for _, lengths in result.draft_len_changes])
    medians = []
    for i in range(len(delays_s)):  # the median L in force over the step's second half
        samples = np.arange(STEP_S * (i + 0.5), STEP_S * (i + 1), 0.1)
        medians.append(float(np.median(swept[np.searchsorted(times, samples, "right") - 1])))
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trial", type=Path, default=ROOT / "configs/trials/delay-sweep.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "out/threshold-sweep")
    parser.add_argument("--delays-ms", default="0,25,50,75,100,150,200",
                        help="added round-trip delays of the swept device (ms)")
    parser.add_argument("--reuse", action="store_true",
                        help="analyse the trials already in --out instead of running them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = load_trial(args.trial)
    added = [float(x) for x in args.delays_ms.split(",")]
    points = [live_point(spec, ms, args.out / f"{ms:g}ms", args.reuse) for ms in added]
    # The model's inputs from the point that judged the most drafts: at a small delay the
    # device drafts little or nothing, and its acceptance is hardly measured there.
    base = max(points, key=lambda p: (p["judged"], p["added_ms"]))
    delays = [p["measured_delay_s"] for p in points]
    steps = predicted_steps(base, spec.bandwidth_hz, max(delays) * 1.1)
    simulated = simulated_lengths(base, spec.bandwidth_hz, delays)
    print("| added RTT (ms) | measured d_k (ms) | predicted L | simulated L "
          "| live L (median; counts) | tok/s measured / predicted / simulated |")
    print("|---:|---:|---:|---:|---|---|")
    for point, sim in zip(points, simulated, strict=True):
        d = point["measured_delay_s"]
        point["predicted_L"] = predicted_length(base, spec.bandwidth_hz, d)
        point["simulated_L"] = sim
        regime = "" if d <= DESIGN_MAX_DELAY_S else " (edge-cloud)"
        counts = ", ".join(f"{k}: {v}" for k, v in point["live_L_counts"].items())
        rates = " / ".join("n/a" if point[k] is None else f"{point[k]:.1f}" for k in
                           ("measured_tok_s", "predicted_tok_s", "simulated_tok_s"))
        print(f"| {point['added_ms']:g} | {d * 1e3:.0f}{regime} | {point['predicted_L']} | "
              f"{sim:g} | {point['live_median_L']} ({counts}) | {rates} |")
    print(f"\npredicted steps of L (threshold rule on the {base['added_ms']:g} ms point's "
          "measurements):")
    for step in steps:
        print(f"  d_k = {step['delay_s'] * 1e3:.0f} ms: L {step['from_L']} -> {step['to_L']}")
    closed = closed_form_delays(base, spec.bandwidth_hz)
    print("closed form, shares held (critical_delays): "
          + ", ".join(f"L > {i} above {d * 1e3:.0f} ms" for i, d in enumerate(closed)
                      if 0 < d <= max(delays) * 1.1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(
        {"points": points, "steps": steps, "closed_form_delays_s": closed}, indent=2))
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    grid = np.arange(0.0, max(delays) * 1.1, 0.001)
    ax.step(grid * 1e3, [predicted_length(base, spec.bandwidth_hz, d) for d in grid],
            where="post", label="predicted (threshold rule)")
    ax.plot([d * 1e3 for d in delays], simulated, "s", label="simulated")
    ax.plot([d * 1e3 for d in delays], [p["live_median_L"] for p in points], "o",
            label="live trial (median)")
    ax.axvspan(DESIGN_MAX_DELAY_S * 1e3, grid[-1] * 1e3, color="0.92",
               label="edge-cloud regime (seed 003)")
    ax.set(xlabel=f"{SWEPT}'s delay d_k (ms, measured)", ylabel="draft length L",
           title="Threshold policy: where L steps up")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.out / "sweep.png", dpi=120)
    print(f"\n-> {args.out / 'sweep.json'}, {args.out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
