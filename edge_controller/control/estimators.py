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
* verification time ``T_v = base_s + per_token_s * sum_k (L_k + 1)``: weighted least
  squares over the rounds seen (sufficient statistics with forgetting), seeded by a
  start-up calibration on the controller's own hardware.
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

    @property
    def evidence(self) -> float:
        """Effective number of Bernoulli observations behind the estimate."""
        return self.accepted + self.rejections


@dataclass
class RunningMean:
    """Exponentially weighted mean; ``value`` is None until the first observation."""

    forget: float = 0.9
    value: float | None = None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.forget * self.value + (1 - self.forget) * x
        return self.value


@dataclass
class VerifyTimeFit:
    """Weighted least squares of ``T_v = base_s + per_token_s * n`` with n = sum (L_k + 1).

    Keeps the forgetting-weighted sums (S_w, S_n, S_nn, S_t, S_nt) so an update is O(1)::

        per_token_s = (S_w S_nt - S_n S_t) / (S_w S_nn - S_n^2)
        base_s = (S_t - per_token_s S_n) / S_w

    Both coefficients are clipped at >= 0 (time cannot shrink with more tokens).
    """

    forget: float = 0.99
    sums: np.ndarray = field(default_factory=lambda: np.zeros(5))  # S_w, S_n, S_nn, S_t, S_nt

    def update(self, tokens: int, seconds: float) -> None:
        n, t = float(tokens), float(seconds)
        self.sums = self.forget * self.sums + np.array([1.0, n, n * n, t, n * t])

    def coefficients(self) -> tuple[float, float]:
        """(base_s, per_token_s); raises ValueError before two distinct batch sizes were seen."""
        s_w, s_n, s_nn, s_t, s_nt = self.sums
        det = s_w * s_nn - s_n * s_n
        if s_w == 0 or det <= 1e-9 * max(s_w * s_nn, 1e-300):
            raise ValueError("verification time needs rounds of at least two batch sizes")
        per_token = max((s_w * s_nt - s_n * s_t) / det, 0.0)
        return max((s_t - per_token * s_n) / s_w, 0.0), per_token
