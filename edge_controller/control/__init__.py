"""Multi-access draft control: the system model, solvers and scenarios.

Pure numpy/scipy: no sockets, clocks or torch. The live controller calls
``solve(policy, system, users)`` by name with per-device arrays it estimates online.
"""

from edge_controller.control.model import (
    Acceptance,
    GeometricAcceptance,
    Plan,
    PositionAcceptance,
    SystemParams,
    UserParams,
    VerifyTime,
    evaluate,
)
from edge_controller.control.solvers import POLICIES, solve

__all__ = [
    "POLICIES",
    "Acceptance",
    "GeometricAcceptance",
    "Plan",
    "PositionAcceptance",
    "SystemParams",
    "UserParams",
    "VerifyTime",
    "evaluate",
    "solve",
]
