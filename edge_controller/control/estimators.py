"""Online estimates of the system model's inputs, from what the controller observes.

Pure numpy, no clocks: callers pass observations in. Each estimator forgets the past
geometrically (``forget`` per observation, an effective window of ``1 / (1 - forget)``
observations) so estimates follow a device whose task, board or link changes.

* acceptance ``a_k`` (DESIGN.md section 2): the censored estimate
  ``accepted / (accepted + rounds that ended in a rejection)``: a round that accepts all
  L tokens says nothing about token L+1, so ``accepted / drafted`` would be biased low.
  With a Beta(prior) it is the posterior mean of a geometric acceptance model.
* scalar quantities (draft time per token, round trip, bits per token): exponentially
  weighted means.
* affine laws by weighted least squares (sufficient statistics with forgetting): the
  verification time ``T_v = base_s + per_token_s * sum_k (L_k + 1)``, seeded by a start-up
  calibration on the controller's own hardware, and a device's upload size
  ``bits = b0 + L b``, from the draft frames it sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class AcceptanceEstimate:
    """Beta posterior on the per-token acceptance probability, with forgetting."""

    forget: float = 0.97
    prior_accepted: float = 1.0  # Beta(1 + accepted, 1 + rejections): a uniform prior
    prior_rejections: float = 1.0
    accepted: float = 0.0
    rejections: float = 0.0

    def update(self, accepted: int, drafted: int) -> None:
        self.accepted = self.forget * self.accepted + accepted
        self.rejections = self.forget * self.rejections + (accepted < drafted)

    @property
    def mean(self) -> float:
        a = self.prior_accepted + self.accepted
        return a / (a + self.prior_rejections + self.rejections)


@dataclass
class RunningMean:
    """Exponentially weighted mean; ``value`` is None until the first observation."""

    forget: float = 0.9
    value: float | None = None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.forget * self.value + (1 - self.forget) * x
        return self.value


@dataclass
class AffineFit:
    """Weighted least squares of ``y = base + slope * x`` with forgetting.

    Keeps the forgetting-weighted sums (S_w, S_x, S_xx, S_y, S_xy) so an update is O(1)::

        slope = (S_w S_xy - S_x S_y) / (S_w S_xx - S_x^2)
        base  = (S_y - slope S_x) / S_w

    Both coefficients are clipped at >= 0: time and size never shrink as x grows.
    """

    forget: float = 0.99
    sums: np.ndarray = field(default_factory=lambda: np.zeros(5))  # S_w, S_x, S_xx, S_y, S_xy

    def update(self, x: float, y: float) -> None:
        x, y = float(x), float(y)
        self.sums = self.forget * self.sums + np.array([1.0, x, x * x, y, x * y])

    @property
    def ready(self) -> bool:
        s_w, s_x, s_xx = self.sums[:3]
        return s_w > 0 and s_w * s_xx - s_x * s_x > 1e-9 * max(s_w * s_xx, 1e-300)

    def coefficients(self) -> tuple[float, float]:
        """(base, slope); raises ValueError until two distinct x were seen."""
        if not self.ready:
            raise ValueError("an affine fit needs observations at two distinct x at least")
        s_w, s_x, s_xx, s_y, s_xy = self.sums
        slope = max((s_w * s_xy - s_x * s_y) / (s_w * s_xx - s_x * s_x), 0.0)
        base = (s_y - slope * s_x) / s_w
        # An intercept at rounding-noise level of the data is zero (a device can steer its
        # own frames' sizes to put it there; the solvers must not see 1e-11 for 0).
        return (base if base > 1e-9 * abs(s_y / s_w) else 0.0), slope
