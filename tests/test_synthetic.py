"""The synthetic device and the replay verifier: the recording is the real thing, replays
follow it, and a real controller serving synthetic devices loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from device_agent.synthetic import ReplayDrafter, count_errors, run_device
from edge_controller.verifier.replay import ReplayVerifier, affine_law
from edge_controller.verifier.slots import CapacityError, SamplingParams, VerifyItem
from models.traces import Trace, TraceSet, default_traces

ROOT = Path(__file__).resolve().parent.parent


def tiny_traces(speed_s: float = 0.0) -> TraceSet:
    truth = [10, 11, 12, 13, 14]
    drafts = [[10, 11, 99], [11, 12, 13], [12, 98, 97], [13, 14], [14]]
    margins = [1.0] * len(truth)
    confidences = [[0.9, 0.8, 0.2], [0.9, 0.9, 0.9], [0.9, 0.3, 0.3], [0.9, 0.9], [0.9]]
    return TraceSet("t", "fp", 128, [2], {},
                    [Trace("d", [1, 5, 6], truth, margins, drafts, speed_s, confidences)])


@pytest.mark.parametrize(("output", "truth", "expected"), [
    ([1, 2, 3], [1, 2, 3], (0, 0, False)),
    ([1, 2], [1, 2, 3], (1, 0, False)),  # a token lost
    ([1, 3], [1, 2, 3], (1, 0, False)),  # ...in the middle
    ([1, 2, 2, 3], [1, 2, 3], (0, 1, False)),  # a commit repeated
    ([1, 2, 3, 4], [1, 2, 3], (0, 1, False)),
    ([1, 9, 3], [1, 2, 3], (1, 1, False)),  # a wrong token: one of each
    ([], [1], (1, 0, False)),
])
def test_lost_and_duplicated_tokens_are_counted_as_a_diff(output, truth, expected):
    assert count_errors(output, truth, [1.0] * len(truth)) == expected


def test_a_difference_at_a_near_tie_is_tolerated_as_design_says():
    assert count_errors([1, 9, 8], [1, 2, 3], [1.0, 5e-5, 1.0]) == (0, 0, True)
    assert count_errors([1, 9, 8], [1, 2, 3], [1.0, 5e-3, 1.0]) == (2, 2, False)


def test_the_replay_drafter_drafts_what_was_recorded_while_the_output_follows_the_truth():
    drafter = ReplayDrafter(tiny_traces(speed_s=0.01), "d")
    drafter.begin([1, 5, 6])
    started = time.perf_counter()
    first = drafter.draft(2)
    assert first.tokens == [10, 11] and time.perf_counter() - started >= 0.02
    drafter.accept([10, 11, 12])
    assert drafter.draft(3).tokens == [13, 14]  # recorded shorter near the end
    drafter.accept([13, 99])  # left the truth: nothing recorded fits any more
    assert drafter.draft(3).tokens == []
    drafter.begin([1, 5, 6])  # confidence stopping: before the first recorded below h
    stopped = drafter.draft(3, min_confidence=0.5)
    assert stopped.tokens == [10, 11] and stopped.declined == 0.2
    assert stopped.confidence_bytes() == bytes([225, 200, 50])  # floor(250 p)
    with pytest.raises(ValueError, match="no trace"):
        drafter.begin([7])
    with pytest.raises(ValueError, match="greedy"):
        drafter.begin([1, 5, 6])
        drafter.draft(1, temperature=0.7)


def test_the_replay_verifier_answers_as_the_recorded_target():
    traces = tiny_traces()
    verifier = ReplayVerifier({(1, 5, 6): traces.traces[0].truth}, vocab_size=128,
                              max_sessions=2, max_len=32, verify_time=affine_law(0.0, 0.0),
                              end_token=2)
    slot = verifier.open([1, 5, 6])
    outcome, = verifier.verify([VerifyItem(slot, [10, 11, 50], SamplingParams())])
    assert (outcome.accepted, outcome.next_token) == (2, 12)
    assert verifier.tokens(slot) == [1, 5, 6, 10, 11, 12]
    # A resumed request opens with its output so far; the truth goes on from there.
    again = verifier.open([1, 5, 6, 10, 11])
    assert verifier.verify([VerifyItem(again, [], SamplingParams())])[0].next_token == 12
    with pytest.raises(CapacityError, match="recorded"):
        verifier.open([1, 2, 3])
    # To the end of the recording: then an end of sequence, never invented text.
    assert verifier.verify([VerifyItem(slot, [13, 14], SamplingParams())])[0].next_token == 2
    with pytest.raises(ValueError, match="recorded"):
        verifier.verify([VerifyItem(slot, [], SamplingParams())])


def test_the_shipped_traces_are_the_real_models_output(target, default_models):
    """Spot checks of the recording against the real target (exactly) and the real draft
    model. llama.cpp's kernels differ in the last bits with how a prefix was evaluated
    (the recorder went position by position, a fresh drafter takes it at once), so near
    ties can go the other way: most drafts agree, a wrong model's would not."""
    from device_agent.drafter import Drafter
    from models.target import reference_greedy

    traces = default_traces()
    assert traces.fingerprint == default_models.target.fingerprint
    trace = traces.traces[len(traces.traces) // 2]
    assert reference_greedy(target, trace.prompt_ids, len(trace.truth))[0] == trace.truth
    path = next(p for p in default_models.drafts.values() if p.stem == trace.draft)
    drafter = Drafter(path, n_ctx=512)
    positions = range(0, len(trace.truth), 8)
    agreed = 0
    for p in positions:
        drafter.begin(trace.prompt_ids + trace.truth[:p])
        got = drafter.draft(len(trace.drafts[p])).tokens
        agreed += got[0] == trace.drafts[p][0]
    assert agreed >= 0.75 * len(positions), f"{agreed} of {len(positions)} first tokens agree"


@pytest.mark.slow
def test_synthetic_devices_against_a_replaying_controller_lose_nothing(lab_keys):
    from edge_controller.cli.start import replay_controller
    from edge_controller.config import load_config
    from edge_controller.verifier.replay import ReplayVerifier as Replay

    traces = default_traces()
    config = load_config(None, server__bind="tcp://127.0.0.1:*", target__replay=str(
        ROOT / "models" / "traces" / "smollm2-135m.json.gz"), limits__max_len=256,
        limits__max_new_tokens=128,
        **lab_keys.config_overrides())
    controller = replay_controller(config)
    assert isinstance(controller.verifier, Replay)
    drafts = sorted({t.draft for t in traces.traces})
    clients = [lab_keys.client(f"syn-{i}") for i in range(4)]
    with controller.running(), ThreadPoolExecutor(4) as pool:
        until = time.time() + 8.0
        tallies = list(pool.map(  # the fourth drafts nothing: the controller decodes it
            lambda i: run_device(f"syn-{i}", controller.endpoint, clients[i], traces,
                                 drafts[i % len(drafts)], until, speed=4.0, drafts=i < 3),
            range(4)))
    for tally in tallies:
        assert tally.requests >= 1 and tally.tokens > 0, tally
        assert (tally.lost_tokens, tally.duplicated_tokens, tally.errors) == (0, 0, 0), tally
    assert tallies[3].rounds == tallies[3].tokens  # decoded here: one token per verdict
    assert all(t.rounds < t.tokens for t in tallies[:3])  # drafts got accepted


@pytest.mark.slow
def test_the_soak_script_runs_a_short_sample(tmp_path):
    """CI's sample of the soak (docs/soak.md has the long runs): a few devices, 30 s,
    under proactive drafting (the synthetic devices pre-draft from their recordings)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "load_test.py"), "--devices", "6",
         "--minutes", "0.5", "--verifier", "stub", "--scheduler", "proactive", "--json",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["scheduler"] == "proactive"
    assert 0 < result["device_tok_s_min"] <= result["device_tok_s_mean"]
    assert result["devices_finished"] == 6 and result["rounds"] > 50 and result["tokens"] > 0
    assert (result["lost_tokens"], result["duplicated_tokens"], result["errors"]) == (0, 0, 0)
    assert result["rss_mib_end"] > 0 and result["round_p99_ms"] >= result["round_p50_ms"] > 0
    assert (tmp_path / "rss.png").stat().st_size > 0
    assert 0 < result["verifier_busy"] <= 1 and result["tokens_per_forward"] >= 1
    assert len(result["forward_fit_ms"]) == 2 and result["forward_fit_ms"][0] > 0
