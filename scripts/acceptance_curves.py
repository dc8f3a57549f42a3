"""Which acceptance model predicts tokens per round better on our real drafts: one geometric
rate, or the measured per-position curve?

Data: the recorded traces of the default models (models/traces/, scripts/record_traces.py):
at every position of the target's greedy output for each recorded prompt (11), each
draft's (q8_0, q5_0, q4_0) greedy 16-token continuation. A "round" at position p accepts
the leading drafts that match the target's output. Prompts are grouped by task: code
(2 prompts), translation (1), chat (8: explanations, lists, stories, summaries).

Per (draft, task): each model is fitted by the controller's own estimator
(AcceptanceEstimate: censored counts, its prior) on all prompts but one and predicts
E[N(L)] = accepted + 1 on the one left out (a new request); with a single prompt, on
alternating 16-position blocks of its output instead. The error is |predicted - observed
mean| per L = 1..16, averaged over folds. Also: the same at L = 8 after only n training
rounds (how fast each model is usable). Prints tables, writes a plot and a JSON summary.

    .venv/bin/python scripts/acceptance_curves.py [--out docs/img/acceptance-curves.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_controller.control.estimators import AcceptanceEstimate  # noqa: E402
from edge_controller.control.model import GeometricAcceptance, PositionAcceptance  # noqa: E402
from models.traces import MAX_DRAFT, TRACES_DIR, TraceSet  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (backend first)

BLOCK = 16  # positions per fold block: neighbouring rounds share most of their drafts
FEW_ROUNDS = (5, 10, 20, 50, 100)


def task_of(prompt: str) -> str:
    if prompt.startswith("def "):
        return "code"
    if prompt.startswith("Translate"):
        return "translation"
    return "chat"


def fitted(runs: np.ndarray) -> AcceptanceEstimate:
    est = AcceptanceEstimate(forget=1.0, depth=MAX_DRAFT)
    for run in runs:
        est.update(int(run), MAX_DRAFT)
    return est


def predictions(est: AcceptanceEstimate, lengths: np.ndarray) -> dict[str, np.ndarray]:
    col = lengths[:, None]
    return {
        "geometric": GeometricAcceptance(np.array([est.mean])).expected_tokens(col)[:, 0],
        "curve": PositionAcceptance(est.curve()[:, None]).expected_tokens(col)[:, 0],
    }


def observed(runs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return np.array([np.mean(np.minimum(runs, n) + 1) for n in lengths])


def folds(per_prompt: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) rounds: leave one prompt out, or alternating blocks of a lone one."""
    if len(per_prompt) > 1:
        return [(np.concatenate(per_prompt[:i] + per_prompt[i + 1:]), held)
                for i, held in enumerate(per_prompt)]
    runs = per_prompt[0]
    block = (np.arange(runs.size) // BLOCK) % 2
    return [(runs[block == side], runs[block != side]) for side in (0, 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=Path, default=TRACES_DIR / "smollm2-135m.json.gz")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/img/acceptance-curves.png")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)

    traces = TraceSet.load(args.traces)
    prompts = traces.recorded["prompts"]
    order = list(dict.fromkeys(tuple(t.prompt_ids) for t in traces.traces))
    cells: dict[tuple[str, str], list[np.ndarray]] = {}
    for trace in traces.traces:
        task = task_of(prompts[order.index(tuple(trace.prompt_ids))])
        cells.setdefault((trace.draft, task), []).append(trace.runs(MAX_DRAFT))

    lengths = np.arange(1, MAX_DRAFT + 1)
    errors = {"geometric": [], "curve": []}
    few = {"geometric": {n: [] for n in FEW_ROUNDS}, "curve": {n: [] for n in FEW_ROUNDS}}
    summary = {}
    fig, (ax_err, ax_curve) = plt.subplots(1, 2, figsize=(11, 4))
    for (draft, task), per_prompt in sorted(cells.items()):
        runs = np.concatenate(per_prompt)
        cell_err = {"geometric": np.zeros(lengths.size), "curve": np.zeros(lengths.size)}
        splits = folds(per_prompt)
        for i, (train, test) in enumerate(splits):
            truth = observed(test, lengths)
            for model, pred in predictions(fitted(train), lengths).items():
                cell_err[model] += np.abs(pred - truth) / len(splits)
            rng = np.random.default_rng(i)
            truth8 = observed(test, np.array([8]))[0]
            for n in FEW_ROUNDS:
                for _ in range(20):  # n training rounds drawn at random from the fold
                    sample = rng.choice(train, n)
                    for model, pred in predictions(fitted(sample), np.array([8])).items():
                        few[model][n].append(abs(pred[0] - truth8))
        for model in errors:
            errors[model].append(cell_err[model])
        full = fitted(runs)
        summary[f"{draft}/{task}"] = {
            "rounds": int(runs.size), "prompts": len(per_prompt),
            "geometric_rate": round(full.mean, 4),
            "curve": [round(float(p), 4) for p in full.curve()],
            "mae_geometric": round(float(cell_err["geometric"].mean()), 4),
            "mae_curve": round(float(cell_err["curve"].mean()), 4),
        }
        ax_curve.plot(np.arange(1, MAX_DRAFT + 1), full.curve(), marker=".",
                      label=f"{draft.rsplit('-', 1)[-1]}/{task}")
    mae = {model: np.mean(errors[model], axis=0) for model in errors}
    print(f"{'L':>3} {'geometric':>10} {'curve':>8}   mean abs error of E[N(L)], held out")
    for i, n in enumerate(lengths):
        print(f"{n:>3} {mae['geometric'][i]:>10.3f} {mae['curve'][i]:>8.3f}")
    print(f"all {mae['geometric'].mean():>10.3f} {mae['curve'].mean():>8.3f}")
    weights = np.array([row["rounds"] for row in summary.values()], dtype=float)
    weighted = {m: float(np.average(np.mean(errors[m], axis=1), weights=weights))
                for m in errors}
    print(f"all, cells weighted by rounds: {weighted['geometric']:.3f} {weighted['curve']:.3f}")
    print(f"\n{'cell':<40} {'prompts':>7} {'rounds':>6} {'rate':>6} {'geo MAE':>8} "
          f"{'curve MAE':>9}")
    for cell, row in summary.items():
        print(f"{cell:<40} {row['prompts']:>7} {row['rounds']:>6} {row['geometric_rate']:>6.3f} "
              f"{row['mae_geometric']:>8.3f} {row['mae_curve']:>9.3f}")
    print(f"\nat L = 8 after n training rounds: {'n':>4} {'geometric':>10} {'curve':>8}")
    for n in FEW_ROUNDS:
        print(f"{'':>34}{n:>4} {np.mean(few['geometric'][n]):>10.3f} "
              f"{np.mean(few['curve'][n]):>8.3f}")

    ax_err.plot(lengths, mae["geometric"], marker="o", label="geometric rate")
    ax_err.plot(lengths, mae["curve"], marker="s", label="per-position curve")
    ax_err.set(xlabel="draft length L", ylabel="held-out |E[N(L)] error| (tokens/round)",
               title=f"Predicting tokens per round ({len(cells)} draft x task cells)")
    ax_err.legend()
    ax_curve.set(xlabel="draft position i", ylabel="P(i accepted | 1..i-1 accepted)",
                 title="Measured curves (all rounds)", ylim=(0, 1))
    ax_curve.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"\nplot -> {args.out}")
    result = {"mae_per_L": {m: [round(float(x), 4) for x in v] for m, v in mae.items()},
              "mae_weighted_by_rounds": weighted,
              "few_rounds_L8": {m: {n: round(float(np.mean(v[n])), 4) for n in FEW_ROUNDS}
                                for m, v in few.items()},
              "cells": summary}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
