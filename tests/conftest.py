"""Shared fixtures: the default models (built once), the target, a live controller."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge_controller.launch import LabKeys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def default_models():
    import models

    return models.ensure()


@pytest.fixture(scope="session")
def target(default_models):
    """(model, tokenizer): the fp32 target, loaded once for the whole run."""
    import torch

    from models.target import load_target

    torch.manual_seed(0)
    return load_target(default_models.target_gguf)


@pytest.fixture(scope="session")
def target_info(target):
    from edge_controller.controller import TargetInfo

    model, tokenizer = target
    return TargetInfo.from_model("smollm2-135m", model, tokenizer)


@pytest.fixture
def lab_keys(tmp_path):
    """A controller keys directory with device keys made (and listed) on first use."""
    return LabKeys(tmp_path / "keys")


@pytest.fixture
def run_controller(target, target_info, lab_keys):
    """Start a real controller (real ROUTER socket on loopback, CURVE with ``lab_keys``) in
    a thread.

    Usage: ``with run_controller(**overrides) as controller: controller.endpoint``;
    ``insecure=True`` runs it without keys.
    """

    @contextmanager
    def start(insecure: bool = False, **overrides) -> Iterator:
        from edge_controller.config import load_config
        from edge_controller.controller import EdgeController
        from edge_controller.verifier.engine import Verifier

        keys = LabKeys(insecure=True) if insecure else lab_keys
        config = load_config(None, server__bind="tcp://127.0.0.1:*", **keys.config_overrides(),
                             **overrides)
        verifier = Verifier(target[0], max_sessions=config.limits.max_sessions,
                            max_len=config.limits.max_len)
        with EdgeController(config, verifier, target_info).running() as controller:
            yield controller

    return start
