"""Who chooses draft lengths and shares in a simulation.

* ``FixedPlan``: one plan for the whole run (validating the model, a trial's last plan);
* ``Oracle``: knows the true parameters at every moment and re-solves when they change;
* ``Controlled``: the live controller's own DraftController, fed what the live controller
  observes (draft sizes and timing, verdicts, verification times, device telemetry) on
  the simulated clock: every policy of ``edge-controller plan`` and ``threshold`` run
  through the same estimators and re-solve rules as in the field.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edge_controller.config import ControlConfig
from edge_controller.control import Plan, SystemParams, UserParams
from edge_controller.control.estimators import AffineFit
from edge_controller.control.serving import DEFAULT_PREDRAFT_LEN, plan_for
from edge_controller.draft_control import DraftController, seed_from_law
from edge_controller.simulator.engine import Decisions, RoundRecord


class FixedPlan:
    def __init__(self, plan: Plan) -> None:
        self.decisions = Decisions(plan.draft_len, plan.bandwidth_share)

    def start(self, system: SystemParams, users: UserParams) -> Decisions:
        return self.decisions

    def after_round(self, now: float, record: RoundRecord) -> None:
        return None

    def on_drift(self, now: float, users: UserParams) -> None:
        return None


class Oracle:
    """Solves ``policy`` on the true parameters at the start and at every change, for
    ``scheduler``'s serving (continuous and proactive: control/serving.py)."""

    def __init__(self, policy: str = "heterogeneous", scheduler: str = "sync",
                 predraft_len: int = DEFAULT_PREDRAFT_LEN) -> None:
        self.policy = policy
        self.scheduler = scheduler
        self.predraft_len = predraft_len
        self.system: SystemParams | None = None

    def _solve(self, users: UserParams) -> Decisions:
        plan = plan_for(self.scheduler, self.policy, self.system, users, self.predraft_len)
        return Decisions(plan.draft_len, plan.bandwidth_share)

    def start(self, system: SystemParams, users: UserParams) -> Decisions:
        self.system = system
        return self._solve(users)

    def after_round(self, now: float, record: RoundRecord) -> None:
        return None

    def on_drift(self, now: float, users: UserParams) -> Decisions:
        return self._solve(users)


class Controlled:
    """The live DraftController on the simulated clock. It starts as in the field: the
    configured first length and equal shares, the verification law calibrated (here: the
    true one), spectral efficiency and a first drafting speed from device telemetry.

    A plan made after round r's verification is one round late in the field: round r's
    verdicts are answered before the re-solve, the new decisions travel with round r+1's
    verdicts, and a device drafts by them from round r+2 (the pacer's rate changes during
    r+1; here, with the length at r+2)."""

    def __init__(self, config: ControlConfig) -> None:
        self.config = config
        self.controller: DraftController | None = None
        self.ids: list[str] = []
        self._sent: Decisions | None = None  # with the next verdicts: in force a round later

    def start(self, system: SystemParams, users: UserParams) -> Decisions:
        if np.ndim(system.bits_per_token) or np.ndim(system.overhead_bits):
            raise ValueError("a simulated controller needs one upload law for all devices")
        config = replace(self.config, bandwidth_hz=system.bandwidth_hz,
                         max_draft_len=system.max_draft_len,
                         bits_per_token=float(system.bits_per_token),
                         overhead_bits=float(system.overhead_bits))
        verify = system.verify_time
        fit = AffineFit()
        seed_from_law(fit, lambda lens, _: verify.of_tokens(sum(n + 1 for n in lens)), 0)
        self.controller = DraftController(config, fit)
        self.ids = list(users.names)
        for i, device in enumerate(self.ids):
            self.controller.join(device)
            self.controller.on_telemetry(device, float(users.spectral_efficiency[i]),
                                         float(users.draft_s_per_token[i]))
            self.controller.on_request_start(device)
        return self._decisions()

    def _decisions(self) -> Decisions:
        decisions = [self.controller.decisions[d] for d in self.ids]
        return Decisions(np.array([d.draft_len for d in decisions]),
                         np.array([d.bandwidth_share for d in decisions]),
                         np.array([d.stop_confidence for d in decisions])
                         if any(d.report_confidence for d in decisions) else None)

    def after_round(self, now: float, record: RoundRecord) -> Decisions | None:
        controller = self.controller
        for i, device in enumerate(self.ids):
            declined = bool(record.confidence) and len(record.confidence[i]) > record.draft_len[i]
            controller.on_draft(device, int(record.draft_len[i]), float(record.draft_s[i]),
                                int(np.ceil(record.upload_bits[i] / 8)),
                                float(record.arrived[i] - record.started), declined=declined)
            accepted = int(record.accepted[i])
            controller.on_verdict(device, accepted, int(record.draft_len[i]), accepted + 1, now,
                                  record.confidence[i] if record.confidence else b"")
        controller.on_round(int(np.sum(record.draft_len + 1)), record.verify_s)
        learnt = controller.on_round_result(
            {device: (int(record.draft_len[i]), int(record.accepted[i]) + 1,
                      float(record.arrived[i])) for i, device in enumerate(self.ids)}, now)
        in_force, self._sent = self._sent, None
        if controller.maybe_resolve(now) or learnt:
            self._sent = self._decisions()
        return in_force

    def on_drift(self, now: float, users: UserParams) -> None:
        # Devices report their radio (and a bench speed, used only before the first
        # draft) in telemetry; acceptance, delay and drafting speed it must measure.
        for i, device in enumerate(self.ids):
            self.controller.on_telemetry(device, float(users.spectral_efficiency[i]),
                                         float(users.draft_s_per_token[i]))
        return None
