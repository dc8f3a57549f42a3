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
        (f"{DEVICE}[[chaos]]\nat_s = 1\n", "chaos[0] needs exactly one of"),
        (f"{DEVICE}[[chaos]]\nrestart_controller = true\nlink_down = {{device = 'a', "
         "seconds = 1}\n", "exactly one"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\nrestart_controller = false\n", "must be true"),
        (f"{DEVICE}[[chaos]]\nrestart_controller = true\n", "chaos[0] needs at_s"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\nlink_down = {{device = 'b', seconds = 1}}\n",
         "device 'b' is not one of"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\nlink_down = {{device = 'a'}}\n", "needs seconds"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\nlink_down = {{device = 'a', seconds = 0}}\n",
         "seconds must"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\nlink_down = {{device = 'a', seconds = '5'}}\n",
         "must be a number"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\nloss_burst = {{device = 'a', seconds = 2, "
         "percent = 100}\n",
         "percent must be in"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\nloss_burst = {{device = 'a', seconds = 2, pct = 5}}\n",
         "chaos[0].loss_burst.pct"),
        (f"{DEVICE}[[chaos]]\nat_s = -1\nrestart_controller = true\n", "at_s must be"),
        (f"{DEVICE}[[chaos]]\nat_s = 'soon'\nrestart_controller = true\n",
         "chaos[0].at_s must be a float"),
        (f"chaos = 5\n{DEVICE}", "chaos must be"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\ndelay_step = {{device = 'a', seconds = 5}}\n",
         "needs delay_ms"),
        (f"{DEVICE}[[chaos]]\nat_s = 1\ndelay_step = {{device = 'a', seconds = 5, "
         "delay_ms = -1}\n", "delay_ms must be in"),
        (f"draft_len = 99\n{DEVICE}", "draft_len"),
    ],
)
def test_bad_trials_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(TrialError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_trial(path)


def test_chaos_entries_load_in_order_of_the_file(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(f"{DEVICE}[[chaos]]\nat_s = 9\nrestart_controller = true\n"
                    "[[chaos]]\nat_s = 2\nloss_burst = {device = 'a', percent = 20, "
                    "seconds = 3}\n")
    first, second = load_trial(path).chaos
    assert (first.kind, first.at_s, first.label) == ("restart_controller", 9.0,
                                                     "controller restart")
    assert (second.kind, second.device, second.percent, second.seconds) == (
        "loss_burst", "a", 20.0, 3.0)


def test_a_delay_step_loads_and_phases_split_at_the_faults_starts(tmp_path):
    from edge_controller.trial.runner import phase_goodput

    path = tmp_path / "drift.toml"
    path.write_text(f"policies = ['online', 'confidence']\ndraft_len = 2\n{DEVICE}"
                    "[[chaos]]\nat_s = 20\ndelay_step = {device = 'a', delay_ms = 50, "
                    "seconds = 600}\n")
    spec = load_trial(path)
    (step,) = spec.chaos
    assert (step.kind, step.delay_ms, step.seconds, spec.draft_len) == ("delay_step", 50, 600, 2)
    assert step.label == "a delay 50 ms 600 s"
    # 10 tokens a second for 20 s, then 5: one phase each side of the steps (which started
    # within a second of each other: one phase)
    commits = {"a": [(t / 10, 1) for t in range(1, 201)] + [(20 + t / 5, 1)
                                                            for t in range(1, 101)],
               "b": [(5.0, 1), (30.0, 1)]}  # b joins at 5 s and is done at 30 s
    faults = [{"at_s": 20.0}, {"at_s": 20.3}]
    before, after = phase_goodput(commits, faults)
    assert (before["start_s"], before["end_s"], after["end_s"]) == (5.0, 20.0, 30.0)
    assert before["goodput_tok_s"] == pytest.approx(10.0, rel=0.01)
    assert after["goodput_tok_s"] == pytest.approx(5.0 + 0.1, rel=0.01)
