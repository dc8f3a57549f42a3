"""Goodput study: every policy over users, bandwidth, heterogeneity spread and payload.

    .venv/bin/python scripts/goodput_study.py [--out out/goodput_study] [--seeds 2]

Writes study.csv and plots to --out and the headline figures between the markers in
docs/results.md. Parameters stay inside DESIGN.md section 2's realistic ranges: a spread
of 0 puts every device at the middle of a range, 1 spreads them uniformly over all of it.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from tqdm import tqdm

from edge_controller.control import POLICIES, SystemParams, UserParams, VerifyTime, solve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (backend first)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results.md"
BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"

# Realistic ranges (DESIGN.md section 2).
DRAFT_S = (0.010, 0.080)
ACCEPTANCE = (0.40, 0.95)
SPECTRAL = (0.5, 7.0)
DELAY_S = (0.005, 0.050)
VERIFY = VerifyTime(base_s=0.025, per_token_s=0.0004)
OVERHEAD_BITS = 800
PAYLOADS = {  # bits per draft token, 49152-token vocabulary
    "greedy": 17,
    "sparse-top8": 8 * (17 + 16),
    "full-distribution": 16 * 49152,
}
USERS = (2, 4, 8, 16, 32, 64)
BANDWIDTH_MHZ = (5, 10, 20, 40)
SPREADS = (0.0, 0.5, 1.0)
BASELINES = ("agnostic", "equal-best-L", "fixed-L", "per-user-L")
POLICY_NAMES = [name for name in POLICIES if name != "brute-force"]


@dataclass(frozen=True)
class Case:
    payload: str
    num_users: int
    bandwidth_mhz: int
    spread_compute: float
    spread_link: float
    spread_acceptance: float
    seed: int

    def label(self) -> str:
        return (
            f"K={self.num_users}, B={self.bandwidth_mhz} MHz, spread compute/link/acceptance "
            f"{self.spread_compute}/{self.spread_link}/{self.spread_acceptance}, seed {self.seed}"
        )


def spread_draw(rng: np.random.Generator, bounds: tuple[float, float], spread: float, k: int):
    lo, hi = bounds
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return mid + spread * half * rng.uniform(-1.0, 1.0, k)


def build(case: Case) -> tuple[SystemParams, UserParams]:
    rng = np.random.default_rng(case.seed)
    k = case.num_users
    system = SystemParams(
        bandwidth_hz=case.bandwidth_mhz * 1e6,
        bits_per_token=PAYLOADS[case.payload],
        verify_time=VERIFY,
        overhead_bits=OVERHEAD_BITS,
        max_draft_len=16,
    )
    users = UserParams(
        spread_draw(rng, DRAFT_S, case.spread_compute, k),
        spread_draw(rng, ACCEPTANCE, case.spread_acceptance, k),
        spread_draw(rng, SPECTRAL, case.spread_link, k),
        spread_draw(rng, DELAY_S, case.spread_link, k),
    )
    return system, users


def run_study(seeds: int) -> list[dict]:
    cases = [
        Case(payload, k, b, sc, sl, sa, seed)
        for payload, k, b, sc, sl, sa, seed in itertools.product(
            PAYLOADS, USERS, BANDWIDTH_MHZ, SPREADS, SPREADS, SPREADS, range(seeds)
        )
    ]
    rows = []
    for case in tqdm(cases, desc="goodput study", unit="case"):
        system, users = build(case)
        for policy in POLICY_NAMES:
            plan = solve(policy, system, users)
            rows.append(
                {
                    **vars(case),
                    "bits_per_token": PAYLOADS[case.payload],
                    "policy": policy,
                    "goodput_tok_s": plan.goodput_tok_s,
                    "mean_draft_len": float(plan.draft_len.mean()),
                    "drafting_off": float(np.mean(plan.draft_len == 0)),
                    "case": case.label(),
                }
            )
    return rows


def gains(rows: list[dict], policy: str, baseline: str, payload: str) -> list[tuple[float, str]]:
    by_case = {}
    for row in rows:
        if row["payload"] == payload and row["policy"] in (policy, baseline):
            by_case.setdefault(row["case"], {})[row["policy"]] = row["goodput_tok_s"]
    return [(v[policy] / v[baseline] - 1.0, case) for case, v in by_case.items()]


def headline(rows: list[dict]) -> str:
    lines = []
    for payload, bits in PAYLOADS.items():
        lines += [
            f"### {payload} uploads ({bits} bits per draft token)",
            "",
            "| policy | over | median gain | max gain | scenario of the max |",
            "|---|---|---:|---:|---|",
        ]
        for policy in ("heterogeneous", "homogeneous"):
            for baseline in BASELINES:
                values = gains(rows, policy, baseline, payload)
                best, case = max(values)
                median = float(np.median([v for v, _ in values]))
                lines.append(f"| {policy} | {baseline} | {median:+.1%} | {best:+.1%} | {case} |")
        het = [r for r in rows if r["payload"] == payload and r["policy"] == "heterogeneous"]
        off = np.mean([r["drafting_off"] for r in het])
        lines += [
            "",
            f"Heterogeneous plans switch drafting off for {off:.0%} of devices on average "
            f"(mean L {np.mean([r['mean_draft_len'] for r in het]):.1f}).",
            "",
        ]
    return "\n".join(lines)


def median_gain_by(rows: list[dict], key: str, payload: str, policy: str, baseline: str):
    by_value: dict = {}
    for value, case in gains(rows, policy, baseline, payload):
        row = next(r for r in rows if r["case"] == case)
        by_value.setdefault(row[key], []).append(value)
    values = sorted(by_value)
    return values, [float(np.median(by_value[v])) for v in values]


def plot(rows: list[dict], out: Path) -> list[Path]:
    paths = []
    for key, xlabel in [
        ("num_users", "users K"),
        ("bandwidth_mhz", "bandwidth (MHz)"),
        ("spread_acceptance", "acceptance spread"),
        ("spread_compute", "compute spread"),
        ("spread_link", "link spread"),
    ]:
        fig, axes = plt.subplots(1, len(PAYLOADS), figsize=(13, 3.6), sharey=True)
        for ax, payload in zip(axes, PAYLOADS, strict=True):
            for policy, baseline, style in [
                ("heterogeneous", "agnostic", "o-"),
                ("homogeneous", "agnostic", "s--"),
                ("heterogeneous", "homogeneous", "^:"),
            ]:
                x, y = median_gain_by(rows, key, payload, policy, baseline)
                ax.plot(x, 100 * np.array(y), style, label=f"{policy} vs {baseline}")
            ax.set_title(payload)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("median goodput gain (%)")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"gain_vs_{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(text: str) -> None:
    doc = RESULTS.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{RESULTS} lacks the {BEGIN} ... {END} markers")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    RESULTS.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "goodput_study")
    parser.add_argument("--seeds", type=int, default=2, help="random instances per grid point")
    parser.add_argument("--no-results", action="store_true", help="leave docs/results.md")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run_study(args.seeds)
    with open(args.out / "study.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plots = plot(rows, args.out)
    text = headline(rows)
    print(text)
    print(f"wrote {args.out / 'study.csv'} and {len(plots)} plots")
    if not args.no_results:
        write_results(text)
        print(f"updated {RESULTS}")


if __name__ == "__main__":
    main()
