"""Lossless end to end: four real device agents, one real controller, greedy.

Real ZeroMQ sockets on loopback, real drafting in separate processes (three llama.cpp
draft quantizations and the ONNX Runtime draft, four prompts), real transformers
verification; every device's output must equal the target alone (transformers
``generate``, fp32) token for token.
"""

from __future__ import annotations

import pytest

import models
from edge_controller.launch import AgentSpec, run_agents
from models.target import greedy_mismatch

pytestmark = pytest.mark.slow

NEW_TOKENS = 48
DEVICES = [
    ("q8_0", "The three most important inventions of the last century are"),
    ("q5_0", "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"),
    ("q4_0", "Translate to French: The weather is lovely today, so we will walk"),
    ("onnx", "The three laws of motion state that"),
]


def compare_to_reference(target, result: dict, new_tokens: int) -> list[str]:
    """Assert equality with the target alone; return the near-tie mismatches it tolerated."""
    problem, note = greedy_mismatch(target, result["prompt_tokens"], result["tokens"],
                                    new_tokens)
    assert problem is None, problem
    return [note] if note else []


def test_four_devices_two_engines_get_exactly_the_targets_greedy_output(
    run_controller, target, lab_keys
):
    drafts = models.ensure(include=["onnx"]).drafts
    with run_controller() as controller:
        results = [runs[0] for runs in run_agents(controller.endpoint, [
            AgentSpec(f"dev-{draft}", drafts[draft], prompt, NEW_TOKENS)
            for draft, prompt in DEVICES
        ], lab_keys)]
        largest_batch = controller.largest_batch
    assert largest_batch >= 2, "the devices never shared a verification round"
    ties = []
    for result in results:
        assert len(result["tokens"]) == NEW_TOKENS
        assert result["stats"]["drafted"] > 0
        ties += compare_to_reference(target, result, NEW_TOKENS)
    if ties:
        print("tolerated:", ties)
    assert all(0 < r["stats"]["acceptance_rate"] <= 1 for r in results)
