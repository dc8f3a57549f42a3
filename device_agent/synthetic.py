"""The synthetic device: the real agent, drafting by replaying recorded real drafts.

A soak or a capacity study needs hundreds of devices on one host, where hundreds of
llama.cpp drafters would leave no CPU to the controller they measure. A synthetic device
is a real :class:`~device_agent.agent.DeviceAgent` (the real protocol, link, CURVE,
resume) whose drafter is a :class:`ReplayDrafter`: it answers ``draft(n)`` with what the
real draft model drafted after that very prefix, recorded once by
``scripts/record_traces.py``, and sleeps for the time the real model took (sleeping costs
no CPU). Greedy only: a greedy draft depends on its prefix alone (up to the last bits of
llama.cpp's kernels, docs/soak.md).

A trace (one prompt, one draft model) holds the target's greedy output for the prompt
(the truth every run must reproduce) and, for every position ``p`` of it, the draft
model's greedy continuation after ``prompt + truth[:p]``, ``MAX_DRAFT`` tokens long. While
the device's output follows the truth (it must: verification is lossless) every draft is
the real one. Traces live in ``models/traces/`` (docs/soak.md says how they were made).
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from device_agent.drafter import DraftResult

TRACE_FORMAT = 1
MAX_DRAFT = 16  # the controller's default max_draft_len: the longest draft ever asked
TRACES_DIR = Path(__file__).resolve().parent.parent / "models" / "traces"


@dataclass(frozen=True)
class Trace:
    draft: str  # the draft model's id (the hello's draft_model)
    prompt_ids: list[int]
    truth: list[int]  # the target's greedy output for the prompt (max_new_tokens of it)
    drafts: list[list[int]]  # drafts[p]: the draft's greedy continuation after truth[:p]
    draft_s_per_token: float  # the real draft model's speed where it was recorded

    def __post_init__(self) -> None:
        if len(self.drafts) != len(self.truth) or not self.prompt_ids:
            raise ValueError(f"trace of {self.draft}: one draft per position of the truth")


@dataclass(frozen=True)
class TraceSet:
    """Traces of one target and its drafts, with what a hello needs to say about them."""

    target: str
    fingerprint: str  # the drafts' tokenizer fingerprint (that of the target's tokenizer)
    vocab_size: int
    eos_token_ids: list[int]
    recorded: dict  # how: models and their checksums, host, date, command
    traces: list[Trace]

    def save(self, path: Path) -> None:
        body = {"format": TRACE_FORMAT, **asdict(self)}
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(body, f, separators=(",", ":"))

    @classmethod
    def load(cls, path: Path) -> TraceSet:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            body = json.load(f)
        if body.pop("format", None) != TRACE_FORMAT:
            raise ValueError(f"{path}: not a trace file of format {TRACE_FORMAT}")
        body["traces"] = [Trace(**t) for t in body["traces"]]
        return cls(**body)

    def of_draft(self, draft: str) -> list[Trace]:
        return [t for t in self.traces if t.draft == draft]


def default_traces() -> TraceSet:
    """The traces shipped with the repository (models/traces/)."""
    return TraceSet.load(TRACES_DIR / "smollm2-135m.json.gz")


class ReplayDrafter:
    """The :class:`~device_agent.drafter.Drafter` interface, drafting from ``traces`` (all
    of one draft model) at ``speed`` times the recorded speed."""

    def __init__(self, traces: TraceSet, draft: str, speed: float = 1.0):
        self.traces = {tuple(t.prompt_ids): t for t in traces.of_draft(draft)}
        if not self.traces:
            raise ValueError(f"no traces of draft {draft!r}")
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.model_id = draft
        self.fingerprint = traces.fingerprint
        self.vocab_size = traces.vocab_size
        self.eos_token_ids = list(traces.eos_token_ids)
        self.speed = speed
        self.sequence: list[int] = []
        self._trace: Trace | None = None

    @property
    def prompts(self) -> list[list[int]]:
        return [list(p) for p in self.traces]

    def truth(self, prompt_ids: list[int]) -> list[int]:
        return list(self.traces[tuple(prompt_ids)].truth)

    def detokenize(self, ids: list[int]) -> bytes:
        return " ".join(map(str, ids)).encode()  # no tokenizer here: the ids themselves

    def begin(self, prompt_ids: list[int]) -> None:
        trace = self.traces.get(tuple(prompt_ids))
        if trace is None:
            raise ValueError("no trace was recorded for this prompt")
        self._trace, self.sequence = trace, list(prompt_ids)

    def draft(self, n: int, *, temperature: float = 0.0, top_k: int = 32,
              seed: int = 0) -> DraftResult:
        """The recorded draft after the committed output, ``n`` tokens of it; past the end
        of the recording, or once the output left the truth, the draft is empty."""
        if self._trace is None:
            raise RuntimeError("draft() before begin()")
        if temperature != 0:
            raise ValueError("synthetic devices replay greedy drafts only")
        trace = self._trace
        output = self.sequence[len(trace.prompt_ids):]
        p = len(output)
        follows = p < len(trace.drafts) and output == trace.truth[:p]
        tokens = trace.drafts[p][:n] if follows else []
        seconds = len(tokens) * trace.draft_s_per_token / self.speed
        time.sleep(seconds)
        return DraftResult(tokens=list(tokens), seconds=seconds)

    def accept(self, committed: list[int]) -> None:
        self.sequence.extend(committed)


def count_errors(output: list[int], truth: list[int]) -> tuple[int, int]:
    """(lost, duplicated) tokens of ``output`` against ``truth``: from the first position
    where they differ, what the truth still had is lost and what the output had instead
    is duplicated (a commit repeated, or a wrong one). (0, 0) when they are equal."""
    same = next((i for i, (a, b) in enumerate(zip(output, truth, strict=False)) if a != b),
                min(len(output), len(truth)))
    return len(truth) - same, len(output) - same


@dataclass
class DeviceTally:
    """What one synthetic device did, counted against the recorded truth."""

    device: str
    requests: int = 0
    tokens: int = 0
    rounds: int = 0
    lost_tokens: int = 0
    duplicated_tokens: int = 0
    errors: int = 0
    first_error: str = ""


def run_device(name: str, endpoint: str, curve, traces: TraceSet, draft: str, until: float,
               speed: float = 1.0, spectral_efficiency: float = 3.0) -> DeviceTally:
    """One synthetic device: register, then run requests (the recorded prompts in turn)
    until the wall clock passes ``until``; a failed request counts as an error and the
    device goes on with the next one."""
    from device_agent.agent import DeviceAgent, TelemetryOptions, partial_result
    from device_agent.link import ControllerLink

    drafter = ReplayDrafter(traces, draft, speed)
    tally = DeviceTally(name)
    prompts = drafter.prompts
    offset = sum(map(ord, name))  # devices start at different prompts
    with ControllerLink(endpoint, curve=curve, timeout_s=30.0) as link:
        agent = DeviceAgent(drafter, link, name if curve is None else None,
                            TelemetryOptions(spectral_efficiency), resume_timeout_s=120.0)
        try:
            agent.register(measure=False)
        except Exception as exc:  # the whole device failed: one error, said
            tally.errors, tally.first_error = 1, f"register: {exc!r}"
            return tally
        while time.time() < until:
            prompt = prompts[(offset + tally.requests) % len(prompts)]
            truth = drafter.truth(prompt)
            tally.requests += 1
            try:
                result = agent.generate(prompt, len(truth))
            except Exception as exc:  # counted; the committed part is checked too
                tally.errors += 1
                tally.first_error = tally.first_error or repr(exc)
                result = partial_result(exc)
                if result is None:
                    continue
                truth = truth[: len(result.tokens)]  # what it had is checked, not its end
            lost, duplicated = count_errors(result.tokens, truth)
            tally.tokens += len(result.tokens)
            tally.rounds += result.stats.rounds
            tally.lost_tokens += lost
            tally.duplicated_tokens += duplicated
        agent.close()
    return tally


def main(argv: list[str] | None = None) -> int:
    """``python -m device_agent.synthetic``: run synthetic devices (threads) against a
    controller until a wall-clock time; print one JSON object per device."""
    import argparse
    from concurrent.futures import ThreadPoolExecutor

    from edge_controller import keys as K

    parser = argparse.ArgumentParser(prog="python -m device_agent.synthetic",
                                     description=main.__doc__)
    parser.add_argument("--controller", required=True, metavar="tcp://HOST:PORT")
    parser.add_argument("--names", required=True, help="comma-separated device names")
    parser.add_argument("--keys-root", type=Path,
                        help="a directory holding one keys directory per name (LabKeys)")
    parser.add_argument("--controller-key", default="", help="the controller's public key")
    parser.add_argument("--traces", type=Path, default=TRACES_DIR / "smollm2-135m.json.gz")
    parser.add_argument("--until", type=float, required=True, help="wall-clock end (epoch s)")
    parser.add_argument("--speed", type=float, default=1.0, help="drafting speed factor")
    args = parser.parse_args(argv)
    traces = TraceSet.load(args.traces)
    drafts = sorted({t.draft for t in traces.traces})
    names = args.names.split(",")

    def one(index: int) -> DeviceTally:
        name = names[index]
        curve = (K.device_client(args.keys_root / name, args.controller_key)
                 if args.keys_root else None)
        return run_device(name, args.controller, curve, traces, drafts[index % len(drafts)],
                          args.until, args.speed)

    with ThreadPoolExecutor(len(names)) as pool:
        for tally in pool.map(one, range(len(names))):
            print(json.dumps(asdict(tally)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
