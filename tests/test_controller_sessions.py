"""Controller bookkeeping over real sockets: slots are never leaked, and live draft control
is never frozen by one device."""

from __future__ import annotations

import pytest

from device_agent.link import ControllerLink
from edge_controller import protocol as P
from edge_controller.config import ControlConfig
from edge_controller.control.estimators import AffineFit
from edge_controller.draft_control import DraftController

pytestmark = pytest.mark.slow


def hello(link: ControllerLink, device_id: str, target_info) -> P.Welcome:
    link.send(P.Hello(device_id, "handmade", target_info.fingerprint, target_info.vocab_size))
    welcome = link.receive()
    assert isinstance(welcome, P.Welcome), welcome
    return welcome


def holds_the_only_slot(link: ControllerLink, request_id: str) -> None:
    link.send(P.Start(request_id, [1, 2, 3], 8))
    reply = link.receive()
    assert isinstance(reply, P.Control), f"the old slot leaked: {reply}"


def test_a_new_hello_with_the_same_key_frees_the_old_session(
    run_controller, target_info, lab_keys
):
    with run_controller(control__policy="fixed", limits__max_sessions=1) as controller:
        with ControllerLink(controller.endpoint, curve=lab_keys.client("dev")) as first:
            assert hello(first, "", target_info).device_id == "dev"  # named by its key
            holds_the_only_slot(first, "r1")
            # The same key from a new connection (a restarted agent) takes its own
            # registration over; the old request's slot is freed for the new one.
            with ControllerLink(controller.endpoint, curve=lab_keys.client("dev")) as second:
                hello(second, "dev", target_info)
                holds_the_only_slot(second, "r2")
        assert [s.device_id for s in controller.sessions] == ["dev"]
        assert set(controller.draft_control.devices) == {"dev"}


def test_re_registering_from_the_same_socket_without_keys_frees_the_old_session(
    run_controller, target_info
):
    with run_controller(insecure=True, control__policy="fixed",
                        limits__max_sessions=1) as controller, \
            ControllerLink(controller.endpoint, timeout_s=60) as link:
        hello(link, "first-name", target_info)
        holds_the_only_slot(link, "r1")
        hello(link, "second-name", target_info)  # same socket, new name
        holds_the_only_slot(link, "r2")
        assert [s.device_id for s in controller.sessions] == ["second-name"]
        assert set(controller.draft_control.devices) == {"second-name"}


def test_a_device_that_left_mid_round_does_not_close_the_next_round_early(
    run_controller, target_info, lab_keys
):
    with run_controller(control__policy="fixed") as controller, \
            ControllerLink(controller.endpoint, curve=lab_keys.client("a")) as a:
        hello(a, "a", target_info)
        a.send(P.Start("r", [1, 2, 3], 8))
        a.receive()
        with ControllerLink(controller.endpoint, curve=lab_keys.client("b")) as b:
            hello(b, "b", target_info)
            b.send(P.Start("r", [1, 2, 3], 8))
            b.receive()
            b.send(P.Draft("r", 0, 3, [42]))  # b's draft opens a round that waits for a
            b.send(P.Bye())  # b leaves before the round closes
            b.send(P.Ping(0.0))
            assert isinstance(b.receive(), P.Pong)  # the controller has handled the bye
        assert controller.scheduler.opened_at is None


def estimates_for(dc: DraftController, device: str) -> None:
    for _ in range(3):
        dc.on_draft(device, 4, 0.08, 60, gap_s=0.15)
        dc.on_verdict(device, 3, 4, 4, now=0.0)


def test_draft_control_plans_without_a_device_that_has_no_measurements():
    fit = AffineFit()
    fit.update(1, 0.05)
    fit.update(20, 0.25)
    dc = DraftController(ControlConfig(policy="heterogeneous", resolve_interval_s=0), fit)
    for device in ("measured", "new", "idle"):
        dc.join(device)
    dc.on_request_start("measured")
    estimates_for(dc, "measured")
    dc.on_request_start("new")  # in a request, but not one draft measured yet
    first = dc.decisions["new"]
    assert first.bandwidth_share == 0.5  # of the two in rounds; "idle" takes none
    estimates_for(dc, "idle")  # measured earlier, no request in flight now
    changed = dc.maybe_resolve(now=10.0)
    assert set(changed) == {"measured"}
    assert dc.decisions["new"] == first  # kept until it has measurements


def test_first_shares_of_devices_in_rounds_never_add_up_beyond_the_band():
    dc = DraftController(ControlConfig(policy="heterogeneous"), AffineFit())
    for device in ("a", "b", "c", "idle"):
        dc.join(device)
    pushed = {}
    for device in ("a", "b", "c"):
        pushed.update(dc.on_request_start(device))
        assert sum(dc.decisions[d].bandwidth_share for d in dc.active) <= 1 + 1e-12
    assert set(pushed) == {"a", "b"}  # the earlier ones were told their smaller share
    assert dc.decisions["a"].bandwidth_share == 1 / 3


def test_draft_control_plans_with_measured_curves_when_configured():
    """acceptance = "curve": the plan's model is each device's measured per-position curve
    (a device whose first position fails half the time but never later drafts longer than
    the pooled rate would suggest); geometric: one rate per device."""
    fit = AffineFit()
    fit.update(1, 0.05)
    fit.update(20, 0.25)
    plans = {}
    for model in ("geometric", "curve"):
        dc = DraftController(ControlConfig(policy="heterogeneous", resolve_interval_s=0,
                                           acceptance=model), fit)
        dc.join("dev")
        dc.on_request_start("dev")
        for i in range(60):
            dc.on_draft("dev", 8, 0.16, 60, gap_s=0.25)
            accepted = 0 if i % 2 else 8  # all or nothing: heavy-headed
            dc.on_verdict("dev", accepted, 8, accepted + 1, now=float(i))
        snapshot = dc.snapshot()["dev"]
        assert ("acceptance_curve" in snapshot) == (model == "curve")
        dc.maybe_resolve(now=100.0)
        plans[model] = dc.decisions["dev"].draft_len
    assert plans["curve"] > plans["geometric"]
