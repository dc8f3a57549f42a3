"""The fuzzer's bounded CI sample, and the regression corpus of frames that once broke
something (tests/fuzz_corpus/), both against a live controller."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.link import ControllerLink
from edge_controller import fuzzing
from edge_controller import protocol as P

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "tests" / "fuzz_corpus").glob("*.bin"))


def test_the_regression_corpus_is_answered_and_breaks_nothing(
    run_controller, target_info, lab_keys, caplog
):
    assert len(CORPUS) >= 10
    hello = P.encode(P.Hello("", "replay", target_info.fingerprint, target_info.vocab_size))
    with caplog.at_level(logging.WARNING), run_controller(control__policy="fixed") as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("replay")) as link:
        for i, path in enumerate(CORPUS):
            link.send_raw([hello])  # registered: the frames reach the registered paths
            assert fuzzing.answers_before_pong(link, -1.0) is not None
            frame = path.read_bytes()
            link.send_raw([frame])
            answers = fuzzing.answers_before_pong(link, float(i))
            assert answers is not None, f"{path.name}: the controller stopped answering"
            expected = fuzzing.expected_answer(frame)
            if expected:
                assert any(isinstance(a, expected) for a in answers), (path.name, answers)
        assert controller.verifier.slots_in_use == 0
    assert not [r for r in caplog.records if r.exc_info], "an unhandled exception was logged"


def test_the_fuzzer_sample_finds_nothing_and_the_agent_stays_exact():
    """A bounded sample of scripts/fuzz_controller.py (docs/benchmarks.md holds the long
    run): a real controller, a real agent, Hypothesis frames of every type at a fixed rate."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz_controller.py"), "--frames", "6000",
         "--baseline-frames", "2000", "--rate", "600", "--seed", "7", "--json"],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads(proc.stdout)
    assert result["frames"] == 6000
    assert result["crashes"] == 0 and result["controller_alive"] and result["agent_lossless"]
    assert result["agent_requests"] >= 2
