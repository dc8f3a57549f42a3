"""Online estimates of the system model's inputs, from what the controller observes.

Pure numpy, no clocks: callers pass observations in. Each estimator forgets the past
geometrically (``forget`` per observation, an effective window of ``1 / (1 - forget)``
observations) so estimates follow a device whose task, board or link changes.

* acceptance (DESIGN.md section 2), per draft position: position i was *tried* in a
  round that accepted the i - 1 before it and drafted at least i; it was accepted or it
  ended the round. A round that accepts all L tokens says nothing about token L + 1 (it is
  censored there), so ``accepted / drafted`` would be biased low. Pooled over positions,
  ``accepted / tried`` is the geometric rate ``a_k`` (a Beta posterior mean); per position
  it is the empirical curve ``p_i``, shrunk towards the pooled rate where few rounds
  reached position i, so it is usable after a few rounds.
* confidence (confidence stopping, control/confidence.py): how often each bin of the
  draft's top-1 probability is evaluated, at every position (how long drafts run: a
  stopped draft's unreached positions would not have been drafted, so the shares stay
  unbiased) and after an accepted prefix (what the verifier judges: positions after a
  rejection are surer of nothing and would skew it), and per bin the acceptance of
  drafted tokens whose prefix was accepted, shrunk towards the bin's midpoint (a
  calibrated draft's acceptance) where few were; bins below a device's threshold are no
  longer drafted, and keep what was learnt.
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

from edge_controller.control.confidence import BINS, confidence_bins


@dataclass
class AcceptanceEstimate:
    """Per-position acceptance counts with forgetting: a geometric rate and a curve.

    ``tried[i]`` and ``accepted[i]`` count (forgetting-weighted) rounds that reached draft
    position i + 1 and those that accepted it. Pooled, with a Beta(prior) it is the
    posterior mean of the geometric model; per position, ``prior_strength`` pseudo-rounds
    at the pooled rate shrink positions few rounds reached towards it (beyond ``depth``
    the last position's counts are used, a deep draft's tail being alike).
    """

    forget: float = 0.97
    prior_accepted: float = 1.0  # Beta(1 + accepted, 1 + rejections): a uniform prior
    prior_rejections: float = 1.0
    prior_strength: float = 4.0  # pseudo-rounds at the pooled rate, per position
    depth: int = 16
    tried: np.ndarray = field(init=False, repr=False)
    accepted: np.ndarray = field(init=False, repr=False)
    judged: int = 0  # draft positions tried in all, never forgotten: how much data exists

    def __post_init__(self) -> None:
        self.tried = np.zeros(self.depth)
        self.accepted = np.zeros(self.depth)

    def update(self, accepted: int, drafted: int) -> None:
        self.tried *= self.forget
        self.accepted *= self.forget
        reached = min(accepted + 1, drafted, self.depth)  # positions tried this round
        self.judged += min(accepted + 1, drafted)
        self.tried[:reached] += 1.0
        self.accepted[: min(accepted, self.depth)] += 1.0
        if drafted > self.depth:  # deeper positions pool into the last one
            self.tried[-1] += min(accepted + 1, drafted) - reached
            self.accepted[-1] += max(accepted - self.depth, 0)

    @property
    def mean(self) -> float:
        """The geometric rate: accepted / tried over all positions, with the Beta prior."""
        a = self.prior_accepted + self.accepted.sum()
        return float(a / (a + self.prior_rejections + self.tried.sum() - self.accepted.sum()))

    def curve(self) -> np.ndarray:
        """(depth,) p_i = P(position i accepted | positions before it were)."""
        pooled = self.mean
        return (self.accepted + self.prior_strength * pooled) / (self.tried + self.prior_strength)


@dataclass
class ConfidenceEstimate:
    """Per bin of the top-1 probability, forgotten per draft (module docstring):
    ``seen``, positions evaluated (how long drafts run); ``reached``, positions evaluated
    after an accepted prefix, the declined one too where every drafted token was accepted
    (what the verifier gets to judge); ``tried`` and ``accepted``, drafted tokens after an
    accepted prefix and those accepted."""

    forget: float = 0.99
    prior_strength: float = 2.0  # pseudo-tokens at the bin's midpoint
    seen: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    reached: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    tried: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    accepted: np.ndarray = field(default_factory=lambda: np.zeros(BINS))
    drafts: int = 0  # drafts reported, never forgotten: how much data exists

    def update(self, confidence: bytes, drafted: int, accepted: int,
               stop_confidence: float = 0.0) -> None:
        """One verified draft of ``drafted`` tokens, ``accepted`` of them, whose
        ``draft.confidence`` holds a byte per token and one for a declined token, drafted
        while the device stopped below ``stop_confidence``: the acceptance of bins below
        it is not observed, so not forgotten either."""
        if len(confidence) not in (drafted, drafted + 1) or not 0 <= accepted <= drafted:
            return
        bins = confidence_bins(confidence)
        tried = min(accepted + 1, drafted)
        observed = np.arange(BINS) >= round(stop_confidence * BINS)
        self.seen *= self.forget
        self.reached *= self.forget
        self.tried[observed] *= self.forget
        self.accepted[observed] *= self.forget
        self.seen += np.bincount(bins, minlength=BINS)
        self.reached += np.bincount(bins[:accepted + 1], minlength=BINS)
        self.tried += np.bincount(bins[:tried], minlength=BINS)
        self.accepted += np.bincount(bins[:accepted], minlength=BINS)
        self.drafts += 1

    def accept_rate(self) -> np.ndarray:
        """(BINS,) alpha_j, shrunk towards the bin's midpoint."""
        midpoint = (np.arange(BINS) + 0.5) / BINS
        return ((self.accepted + self.prior_strength * midpoint)
                / (self.tried + self.prior_strength))


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
