"""Trial files: the shipped ones load; bad values get errors naming the key."""

from pathlib import Path

import pytest

from edge_controller.trial.spec import TrialError, load_trial

TRIALS = sorted((Path(__file__).resolve().parent.parent / "configs" / "trials").glob("*.toml"))
DEVICE = '[[devices]]\nname = "a"\n'


@pytest.mark.parametrize("path", TRIALS, ids=lambda p: p.stem)
def test_shipped_trials_load(path):
    spec = load_trial(path)
    assert spec.devices and spec.policies
    # The pacer emulates the shares: a tbf cap must never be what limits an upload.
    assert all(d.rate_mbit == 0 or d.rate_mbit * 1e6 > spec.bandwidth_hz * d.spectral_efficiency
               for d in spec.devices)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("policies = ['heterogeneous']", "needs at least one"),
        (f"policies = []\n{DEVICE}", "at least one policy"),
        (f"policies = ['best']\n{DEVICE}", "policies"),
        (f"bandwidth_hz = 0\n{DEVICE}", "bandwidth_hz"),
        (f"requests = 0\n{DEVICE}", "requests"),
        (f"colour = 'red'\n{DEVICE}", "trial.colour"),
        (f"requests = true\n{DEVICE}", "trial.requests must be a int"),
        (f"verifier_cpus = 0\n{DEVICE}", "trial.verifier_cpus must be a list"),
        (f"{DEVICE}delay_ms = -5\n", "must be >= 0"),
        (f"{DEVICE}loss_pct = 100\n", "loss_pct"),
        (f"{DEVICE}spectral_efficiency = 'high'\n", "spectral_efficiency"),
        (f"{DEVICE}wheels = 4\n", "devices[0].wheels"),
        (f"bandwidth_hz = 1e6\n{DEVICE}spectral_efficiency = 4.0\nrate_mbit = 2\n",
         "rate_mbit must exceed"),
        (f"{DEVICE}{DEVICE}", "distinct"),
        ('[[devices]]\nname = "a b"\n', "device names"),
    ],
)
def test_bad_trials_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(TrialError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_trial(path)
