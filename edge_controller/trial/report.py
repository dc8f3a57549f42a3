"""Trial reports: report.json, report.md and plots from a trial's results and timelines."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot_goodput(report, out / "goodput.png")
    for policy, summary in report["policies"].items():
        timeline = out / policy / "timeline.jsonl"
        if timeline.exists():
            plot_timeline(policy, timeline, out / f"timeline-{policy}.png")
            if "chaos" in summary:
                plot_chaos(policy, summary["chaos"], timeline, out / f"chaos-{policy}.png")


def gains(report: dict) -> dict[str, float]:
    """Measured and predicted gain of heterogeneous over agnostic, where both ran."""
    policies = report["policies"]
    if not {"heterogeneous", "agnostic"} <= set(policies):
        return {}
    het, agn = policies["heterogeneous"], policies["agnostic"]
    out = {"measured": het["goodput_tok_s"] / agn["goodput_tok_s"] - 1}
    if het["predicted_goodput_tok_s"] and agn["predicted_goodput_tok_s"]:
        out["predicted"] = het["predicted_goodput_tok_s"] / agn["predicted_goodput_tok_s"] - 1
    return out


def markdown(report: dict) -> str:
    lines = [f"# Trial `{report['trial']}`", "", report.get("description", ""), "",
             f"Uplink band B = {report['bandwidth_hz'] / 1e6:g} MHz.", "",
             "Goodput is the sum over devices while all of them were generating (the model's "
             "G), from the controller's timeline; predicted is what the controller's plans "
             "said (time-weighted, synchronous-round model), simulated the simulator on the "
             "last plan's estimates. An entry POLICY@SCHEDULER ran under that scheduler "
             "(docs/scheduling.md), the others under synchronous rounds; server-decode: "
             "every device without a drafter, the controller decoding (continuous); "
             "target-alone: the target serving the same requests one after another (its "
             "goodput: all tokens / all the time). Whole run: every committed token over "
             "the time from the first forward to the last (tails where some devices are "
             "done included). Busy: the verifier's time in forwards over that time.", "",
             "| entry | measured (tok/s) | predicted (tok/s) | measured / predicted | "
             "simulated (tok/s) | window (s) | rounds | whole run (tok/s) | verifier busy |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, p in report["policies"].items():
        pred, sim = p["predicted_goodput_tok_s"], p["simulated_goodput_tok_s"]
        cells = f"{pred:.2f} | {p['goodput_tok_s'] / pred:.2f}" if pred else "- | -"
        busy, run = p.get("verifier_busy"), p.get("run_goodput_tok_s")
        lines.append(f"| {name} | {p['goodput_tok_s']:.2f} | {cells} | "
                     f"{f'{sim:.2f}' if sim else '-'} | {p['window_s'] or 0:.1f} | "
                     f"{p['rounds']} | {f'{run:.2f}' if run else '-'} | "
                     f"{f'{busy:.0%}' if busy is not None else '-'} |")
    idle = {name: p["verifier_idle_s"] for name, p in report["policies"].items()
            if p.get("verifier_idle_s")}
    if idle:
        lines += ["", "Where the verifier's idle time went (seconds between forwards, each "
                  "gap charged to the draft that ended it):", ""]
        lines += [f"- {name}: " + ", ".join(f"{who} {s:.1f}" for who, s in by.items())
                  for name, by in idle.items()]
    g = gains(report)
    if g:
        lines += ["", f"Heterogeneous over agnostic: measured {g['measured']:+.1%}"
                  + (f", predicted {g['predicted']:+.1%}." if "predicted" in g else ".")]
    lines += phase_lines(report["policies"])
    for name, p in report["policies"].items():
        lines += ["", f"## {name}", "", "| device | draft | tokens | goodput tok/s | acceptance |"
                  " mean L | mean share | draft tok/s | s/token p50 | s/token p95 |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for u in p["users"]:
            p50, p95 = u.get("time_per_token_p50_s"), u.get("time_per_token_p95_s")
            lines.append(f"| {u['name']} | {u['draft']} | {u['tokens']} | "
                         f"{u['goodput_tok_s']:.2f} | {u['acceptance_rate']:.2f} | "
                         f"{u['mean_draft_len']:.1f} | {u['mean_share']:.3f} | "
                         f"{u['draft_tokens_per_s']:.1f} | "
                         f"{f'{p50:.3f}' if p50 is not None else '-'} | "
                         f"{f'{p95:.3f}' if p95 is not None else '-'} |")
        if any("predraft" in u for u in p["users"]):
            lines += predraft_lines(p["users"])
        if all("lossless" in u for u in p["users"]):
            bad = [f"{u['name']} ({u['lossless_problem']})" for u in p["users"]
                   if not u["lossless"]]
            lines += ["", "Output against the target alone (greedy): "
                      + (f"**differs** for {', '.join(bad)}." if bad
                         else "identical for every device and request.")]
        if "chaos" in p:
            lines += chaos_lines(name, p["chaos"])
    entries = list(next(iter(report["interference"].values()), {}).get("by_entry_tok_s", {}))
    lines += ["", "## Interference", "",
              "Draft speed of each drafter alone on its cores vs during the trial (the "
              "verifier and the other drafters share the host), over all entries and per "
              "entry (pre-drafting adds drafting work while others draft):", "",
              "| device | alone tok/s | in trial tok/s | slowdown | "
              + " | ".join(entries) + " |",
              "| --- | ---: | ---: | ---: |" + " ---: |" * len(entries)]
    for name, row in report["interference"].items():
        by = row.get("by_entry_tok_s", {})
        lines.append(f"| {name} | {row['alone_tok_s']:.1f} | {row['in_trial_tok_s']:.1f} | "
                     f"{row['slowdown']:.2f}x | "
                     + " | ".join(f"{by[e]:.1f}" if e in by else "-" for e in entries) + " |")
    return "\n".join(lines) + "\n"


def predraft_lines(users: list[dict]) -> list[str]:
    """Proactive drafting per device: how often the guess paid, the draft work wasted."""
    lines = ["", "Proactive drafting: rounds drafted through, of them cut short by the verdict "
             "and paid (the verdict confirmed the guess: all of the draft accepted, the bonus "
             "token the one guessed); tokens drafted past uploads (guesses included), used "
             "in the next draft, and dropped:", "",
             "| device | rounds | cut | paid | pay rate | pre-drafted | used | wasted | "
             "wasted share |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for u in users:
        if "predraft" in u:
            q = u["predraft"]
            lines.append(f"| {u['name']} | {q['rounds']} | {q.get('cut', '-')} | {q['paid']} | "
                         f"{q['pay_rate']:.2f} | "
                         f"{q['drafted']} | {q['used']} | {q['wasted']} | "
                         f"{q['wasted_share']:.2f} |")
    return lines


def chaos_lines(policy: str, chaos: dict) -> list[str]:
    lines = ["", f"### Faults ({policy})", "",
             "Seconds since the devices started. Longest gap: the longest stretch without a "
             "commit for that device that overlaps the fault; recovered after: from the "
             f"fault's end to its next commit (plot: chaos-{policy}.png).", "",
             "| fault | from (s) | to (s) |", "| --- | ---: | ---: |"]
    lines += [f"| {f['label']} | {f['at_s']:.1f} | {f.get('ended_s', f['at_s']):.1f} |"
              for f in chaos["faults"]]
    lines += ["", "| fault | device | longest gap (s) | recovered after (s) |",
              "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['fault']} | {r['device']} | {r['longest_gap_s']:.2f} | "
              f"{r['recovered_after_s']:.2f} |" for r in chaos["recovery"]]
    return lines


def phase_lines(policies: dict[str, dict]) -> list[str]:
    """Goodput of every entry between the faults' starts (all devices), side by side:
    before and after a delay step, say."""
    phases = {name: p["chaos"]["phases"] for name, p in policies.items()
              if p.get("chaos", {}).get("phases")}
    if not phases:
        return []
    width = max(len(v) for v in phases.values())
    lines = ["", "Committed tokens per second, all devices, between the faults' starts "
             "(phase k: from the k-th start on; times differ a little per entry):", "",
             "| entry | " + " | ".join(f"phase {k}" for k in range(width)) + " | whole |",
             "| --- |" + " ---: |" * (width + 1)]
    for name, rows in phases.items():
        cells = [f"{r['goodput_tok_s']:.2f} ({r['start_s']:.0f}-{r['end_s']:.0f} s)"
                 for r in rows] + ["-"] * (width - len(rows))
        span = rows[-1]["end_s"] - rows[0]["start_s"]
        whole = sum(r["goodput_tok_s"] * (r["end_s"] - r["start_s"]) for r in rows) / span
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {whole:.2f} |")
    return lines


def plot_chaos(policy: str, chaos: dict, timeline: Path, path: Path, bin_s: float = 1.0) -> None:
    """Per device, on one time axis: committed tokens per second (``bin_s`` bins), with
    the faults shaded (a restart as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge_controller.trial.runner import commits

    events = [json.loads(line) for line in timeline.read_text().splitlines()]
    series = commits(events, chaos["started_wall"])
    devices = sorted(series)
    end = max((t for s in series.values() for t, _ in s), default=1.0)
    bins = int(end / bin_s) + 1
    fig, axes = plt.subplots(len(devices), 1, figsize=(8, 1.8 * len(devices) + 1),
                             sharex=True, squeeze=False)
    for ax, device in zip(axes[:, 0], devices, strict=True):
        rate = [0.0] * bins
        for t, committed in series[device]:
            rate[min(max(int(t / bin_s), 0), bins - 1)] += committed / bin_s
        ax.step([i * bin_s for i in range(bins)], rate, where="post", color="tab:blue")
        ax.set_ylabel(f"{device}\ntok/s")
        for fault in chaos["faults"]:
            start, stop = fault["at_s"], fault.get("ended_s", fault["at_s"])
            if fault["kind"] == "restart_controller":
                ax.axvspan(start, stop, color="tab:red", alpha=0.25)
            elif fault["device"] == device:
                ax.axvspan(start, stop, color="tab:orange", alpha=0.3)
    for i, fault in enumerate(chaos["faults"]):  # staggered: faults may start close
        axes[0, 0].annotate(fault["label"], (fault["at_s"], 1.02 + 0.14 * (i % 3)),
                            fontsize="small", xycoords=("data", "axes fraction"), va="bottom")
    axes[-1, 0].set_xlabel("seconds since the devices started")
    fig.suptitle(f"policy {policy}: committed tokens per second, faults shaded "
                 "(red: controller restart)", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_goodput(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["policies"])  # every entry, baselines included
    measured = [report["policies"][n]["goodput_tok_s"] for n in names]
    predicted = [report["policies"][n]["predicted_goodput_tok_s"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], measured, 0.4, label="measured")
    ax.bar([i + 0.2 for i in x], predicted, 0.4, label="predicted (last plan)")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel("sum goodput (tok/s)")
    ax.set_title(f"trial {report['trial']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(policy: str, timeline: Path, path: Path) -> None:
    """Per device: draft length and share per round, and the acceptance estimate per plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [json.loads(line) for line in timeline.read_text().splitlines()]
    fig, axes = plt.subplots(3, 1, figsize=(7, 6), sharex=True)
    devices = sorted({d["device"] for e in events if "devices" in e for d in e["devices"]})
    for device in devices:
        rounds = [(e["t"], d) for e in events if "devices" in e for d in e["devices"]
                  if d["device"] == device]
        axes[0].step([t for t, _ in rounds], [d["draft_len"] for _, d in rounds],
                     where="post", label=device)
        axes[1].step([t for t, _ in rounds], [d["share"] or 0.0 for _, d in rounds],
                     where="post", label=device)
        plans = [(e["t"], e["estimates"][device]["acceptance"]) for e in events
                 if "estimates" in e and device in e["estimates"]
                 and e["estimates"][device]["acceptance"] is not None]
        axes[2].plot([t for t, _ in plans], [a for _, a in plans], marker=".", label=device)
    for ax, label in zip(axes, ("draft length", "uplink share", "acceptance est."), strict=True):
        ax.set_ylabel(label)
    axes[-1].set_xlabel("seconds since the controller started")
    axes[0].legend(fontsize="small", ncol=2)
    axes[0].set_title(f"policy {policy}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
