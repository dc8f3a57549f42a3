"""The synthetic device: the real agent, drafting by replaying recorded real drafts.

A soak or a capacity study needs hundreds of devices on one host, where hundreds of
llama.cpp drafters would leave no CPU to the controller they measure. A synthetic device
is a real :class:`~device_agent.agent.DeviceAgent` (the real protocol, link, CURVE,
resume) whose drafter is a :class:`ReplayDrafter`: it answers ``draft(n)`` with what the
real draft model drafted after that very prefix (models/traces.py, recorded by
``scripts/record_traces.py``) and sleeps for the time the real model took (sleeping costs
no CPU). Greedy only: a greedy draft depends on its prefix alone (up to the last bits of
llama.cpp's kernels, docs/soak.md), so while the device's output follows the recorded
truth (it must: verification is lossless) every draft is a real one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.draft_engine import DraftResult
from edge_controller.protocol import MAX_PROMPT_TOKENS
from edge_controller.verifier.slots import NEAR_TIE_MARGIN
from models.traces import TRACES_DIR, Trace, TraceSet

if TYPE_CHECKING:
    from edge_controller.keys import CurveClient

DEVICES_PER_PROCESS = 50  # threads of one ``python -m device_agent.synthetic``


class ReplayDrafter:
    """A :class:`~device_agent.draft_engine.DraftEngine` drafting from ``traces`` (all of one
    draft model) at ``speed`` times the recorded speed; with ``drafts=False`` it drafts
    nothing and the controller decodes its requests (as ``--draft none``)."""

    def __init__(self, traces: TraceSet, draft: str, speed: float = 1.0, drafts: bool = True):
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
        self.drafts = drafts
        self.n_ctx = MAX_PROMPT_TOKENS + 1  # no context of its own: the wire's limit
        self.chat_format = None  # it replays token ids: no text
        self.sequence: list[int] = []
        self._trace: Trace | None = None

    @property
    def prompts(self) -> list[list[int]]:
        return [list(p) for p in self.traces]

    def trace(self, prompt_ids: list[int]) -> Trace:
        return self.traces[tuple(prompt_ids)]

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        raise NotImplementedError("a synthetic device has no tokenizer: it replays token ids")

    def detokenize(self, ids: list[int]) -> bytes:
        return " ".join(map(str, ids)).encode()  # no tokenizer here: the ids themselves

    def begin(self, prompt_ids: list[int]) -> None:
        trace = self.traces.get(tuple(prompt_ids))
        if trace is None:
            raise ValueError("no trace was recorded for this prompt")
        self._trace, self.sequence = trace, list(prompt_ids)

    def draft(self, n: int, *, temperature: float = 0.0, top_k: int = 32, seed: int = 0,
              after: Sequence[int] = (), stop: Callable[[], bool] | None = None,
              min_confidence: float = 0.0) -> DraftResult:
        """The recorded draft after the committed output and ``after`` (pre-drafting past
        an upload), ``n`` tokens of it, each taking its recorded time; ``stop()``, asked
        after each token, ends it early, and so does a recorded confidence below
        ``min_confidence`` (before that token). Past the end of the recording, or once the
        output left the truth, the draft is empty."""
        if self._trace is None:
            raise RuntimeError("draft() before begin()")
        if temperature != 0:
            raise ValueError("synthetic devices replay greedy drafts only")
        trace = self._trace
        output = self.sequence[len(trace.prompt_ids):] + list(after)
        p = len(output)
        follows = p < len(trace.drafts) and output == trace.truth[:p]
        recorded = trace.drafts[p][:n] if follows else []
        confidences = trace.confidences[p] if follows else []
        per_token = trace.draft_s_per_token / self.speed
        result = DraftResult(tokens=[])
        for i, (token, top1) in enumerate(zip(recorded, confidences, strict=False)):
            time.sleep(per_token)
            if top1 < min_confidence:
                result.declined = top1
                break
            result.tokens.append(token)
            result.top1.append(top1)
            if stop is not None and i + 1 < len(recorded) and stop():
                result.stopped = True
                break
        result.seconds = (len(result.tokens) + (result.declined is not None)) * per_token
        return result

    def accept(self, committed: list[int]) -> None:
        self.sequence.extend(committed)


def count_errors(output: list[int], truth: list[int],
                 margins: list[float] | None = None) -> tuple[int, int, bool]:
    """(lost, duplicated, near_tie) of ``output`` against ``truth``, aligned as a diff:
    truth tokens missing from the output are lost, output tokens the truth does not have
    are duplicated (a commit repeated), a wrong token is one of each. A difference that
    starts where the target chose at a near tie (``margins`` below NEAR_TIE_MARGIN, which
    DESIGN.md tolerates) counts as neither: ``near_tie`` is True then."""
    first = next((i for i, (a, b) in enumerate(zip(output, truth, strict=False)) if a != b),
                 None)
    if first is not None and margins is not None and margins[first] < NEAR_TIE_MARGIN:
        return 0, 0, True
    lost = duplicated = 0
    for tag, i1, i2, j1, j2 in SequenceMatcher(a=truth, b=output, autojunk=False).get_opcodes():
        if tag in ("delete", "replace"):
            lost += i2 - i1
        if tag in ("insert", "replace"):
            duplicated += j2 - j1
    return lost, duplicated, False


@dataclass
class DeviceTally:
    """What one synthetic device did, counted against the recorded truth."""

    device: str
    requests: int = 0
    tokens: int = 0
    rounds: int = 0
    lost_tokens: int = 0
    duplicated_tokens: int = 0
    near_ties: int = 0  # requests that left the truth at a tolerated near tie
    errors: int = 0
    first_error: str = ""

    def failed(self, what: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or what


def run_device(name: str, endpoint: str, curve: CurveClient | None, traces: TraceSet,
               draft: str, until: float, speed: float = 1.0,
               spectral_efficiency: float = 3.0, drafts: bool = True) -> DeviceTally:
    """One synthetic device: register, then run requests (the recorded prompts in turn)
    until the wall clock passes ``until``. A failed request counts as an error and the
    device goes on with the next; whatever else fails ends the device, counted too."""
    tally = DeviceTally(name)
    try:
        _run(tally, endpoint, curve, ReplayDrafter(traces, draft, speed, drafts), until,
             spectral_efficiency)
    except Exception as exc:  # the device itself failed: one error, said
        tally.failed(f"{name}: {exc!r}")
    return tally


def _run(tally: DeviceTally, endpoint: str, curve: CurveClient | None,
         drafter: ReplayDrafter, until: float, spectral_efficiency: float) -> None:
    from device_agent.agent import DeviceAgent, TelemetryOptions, partial_result
    from device_agent.link import ControllerLink

    prompts = drafter.prompts
    offset = sum(map(ord, tally.device))  # devices start at different prompts
    with ControllerLink(endpoint, curve=curve, timeout_s=30.0) as link:
        agent = DeviceAgent(drafter, link, tally.device if curve is None else None,
                            TelemetryOptions(spectral_efficiency), resume_timeout_s=120.0)
        agent.register(measure=False)
        while time.time() < until:
            prompt = prompts[(offset + tally.requests) % len(prompts)]
            trace = drafter.trace(prompt)
            truth = trace.truth
            tally.requests += 1
            try:
                result = agent.generate(prompt, len(truth))
            except Exception as exc:  # counted; what it had committed is checked too
                tally.failed(repr(exc))
                result = partial_result(exc)
                if result is None:
                    continue
                truth = truth[: len(result.tokens)]  # what it had is checked, not its end
            lost, duplicated, near_tie = count_errors(result.tokens, truth, trace.margins)
            tally.tokens += len(result.tokens)
            tally.rounds += result.stats.rounds
            tally.lost_tokens += lost
            tally.duplicated_tokens += duplicated
            tally.near_ties += near_tie
        agent.close()


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
    parser.add_argument("--server-decode", action="store_true",
                        help="draft nothing: the controller decodes every request")
    args = parser.parse_args(argv)
    traces = TraceSet.load(args.traces)
    drafts = sorted({t.draft for t in traces.traces})
    names = args.names.split(",")

    def one(index: int) -> DeviceTally:
        name = names[index]
        try:
            curve = (K.device_client(args.keys_root / name, args.controller_key)
                     if args.keys_root else None)
        except Exception as exc:  # this device cannot start; the others go on
            tally = DeviceTally(name)
            tally.failed(f"{name}: keys: {exc!r}")
            return tally
        return run_device(name, args.controller, curve, traces, drafts[index % len(drafts)],
                          args.until, args.speed, drafts=not args.server_decode)

    with ThreadPoolExecutor(len(names)) as pool:
        for tally in pool.map(one, range(len(names))):
            print(json.dumps(asdict(tally)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
