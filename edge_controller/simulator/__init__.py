"""The project's one discrete-event simulator (docs/simulator.md): synchronous rounds today,
driven by a fixed plan, the oracle, or the live controller's draft control."""

from edge_controller.simulator.deciders import Controlled, FixedPlan, Oracle
from edge_controller.simulator.engine import AcceptanceTrace, SimulationResult, SyncSimulation
from edge_controller.simulator.runs import SIMULATED_POLICIES, simulate_plan, simulate_scenario

__all__ = [
    "SIMULATED_POLICIES",
    "AcceptanceTrace",
    "Controlled",
    "FixedPlan",
    "Oracle",
    "SimulationResult",
    "SyncSimulation",
    "simulate_plan",
    "simulate_scenario",
]
