"""``edge-controller status`` renders the controller's real Prometheus exposition."""

from prometheus_client import generate_latest

from edge_controller.cli.status import render
from edge_controller.control.bandit import LengthBandit
from edge_controller.control.estimators import AcceptanceEstimate
from edge_controller.draft_control import Decision, DeviceEstimates
from edge_controller.metrics import ControllerMetrics


def test_status_table_shows_each_device_with_its_values():
    metrics = ControllerMetrics()
    metrics.draft_len.labels("orin").set(6)
    metrics.share.labels("orin").set(0.25)
    metrics.acceptance.labels("orin").set(0.9)
    metrics.draft_s.labels("orin").set(0.012)
    metrics.rtt.labels("orin").set(0.0415)
    metrics.goodput.labels("orin").set(33.5)
    metrics.draft_len.labels("phone").set(0)
    metrics.round_s.observe(0.2)
    metrics.plan_goodput.set(40.0)
    table = render(generate_latest(metrics.registry).decode())
    lines = table.splitlines()
    orin = next(line for line in lines if line.startswith("orin"))
    assert "0.250" in orin and "0.90" in orin and "12.0" in orin and "41.5" in orin
    assert "33.50" in orin
    assert any(line.startswith("phone") for line in lines)
    assert "2 devices, 1 rounds, plan predicts 40.00 tok/s" in table


def test_forgotten_device_leaves_the_table():
    metrics = ControllerMetrics()
    metrics.draft_len.labels("gone").set(3)
    metrics.forget_device("gone")
    assert "gone" not in render(generate_latest(metrics.registry).decode())


def test_online_policies_show_how_often_each_length_was_played():
    estimates = DeviceEstimates(3.0, AcceptanceEstimate())
    estimates.bandits[0] = LengthBandit(arms=17, first=4)
    for arm in (4, 4, 4, 5, 3):
        estimates.bandits[0].update(arm, 1.0)
    metrics = ControllerMetrics()
    metrics.show_device("orin", estimates, Decision(4, 0.5, 1e6))
    table = render(generate_latest(metrics.registry).decode())
    assert "online: rounds per draft length" in table and "3x1 4x3 5x1" in table
    metrics.forget_device("orin")
    assert "orin" not in render(generate_latest(metrics.registry).decode())
