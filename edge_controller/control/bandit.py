"""Online draft-length control without an acceptance model: a bandit per device over its
draft lengths (seed 003's UCB-SpecStop, rederived for our shared round in
docs/system-model.md, "Online control").

Credit. In a synchronous round the goodput G = sum_k N_k / T is shared: device k's length
raises its own tokens N_k and may stretch the round for everyone. Linearised at the
current goodput G (Dinkelbach), device k's share of a round is worth

    r_k = N_k - G * dT_k,    dT_k = max(tau_-k, a_k) - max(tau_-k, a_k^0) + v1 L_k,

where a_k is when its draft arrived (since the round began), a_k^0 when it would have
arrived with nothing drafted (a_k less its drafting and per-token upload time), tau_-k the
others' latest arrival and v1 the verifier's time per token. Maximising E[r_k] over L_k
with the others held is the best response for the round's goodput, and every term is
measured: the tokens the verdict committed, the arrival times, the drafting time the
draft reports, the paced rate. The naive variant credits N_k / T, the device's own
per-round ratio (seed 003's naive UCB), which ignores what its length costs the others.

Ratio of sums (seed 003's estimate): per arm the bandit keeps the sums of N_k and of dT_k
and prices them at the current G, (sum N - G sum dT) / n_L, so rounds credited while G
was still wrong are re-priced rather than frozen into a mean.

Index: mean reward + c * scale * sqrt(ln n / n_L), scale the largest |mean| seen; arms are
explored outward from the best one (an untried neighbour of the best is played first), so
a device never jumps to a 16-token draft just to learn it is bad. With discount gamma < 1
every sum decays per round (drift).

Coordinated exploration: in a shared round one device's exploration moves everyone's
credit (it stretches the round, it moves G), so the devices take turns: in each round one
device (round robin) plays its UCB choice, the others their best mean. Pure numpy, no
clocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_controller.control.model import latest_of_others

# Policies that learn lengths online (DraftController): the round-credit bandit; the naive
# per-round ratio; discounted for drift; one bandit per delay bucket (contextual).
ONLINE_POLICIES = ("online", "online-naive", "online-discounted", "online-contextual")


@dataclass
class LengthBandit:
    """Per arm, the (discounted) sums of a device's tokens N and of the round time dT its
    length cost: an arm's mean reward at goodput G is (sum N - G sum dT) / plays, the
    ratio of sums linearised at the *current* G (rounds credited while G was still
    wrong are re-priced, not frozen). With G = 0 and no costs it is a plain mean (the
    naive variant's per-round ratios)."""

    arms: int  # L_max + 1
    first: int  # the arm played first (the configured length)
    exploration: float = 0.3  # c
    discount: float = 1.0  # gamma: 1 keeps everything
    tokens: np.ndarray = field(init=False, repr=False)
    costs: np.ndarray = field(init=False, repr=False)
    plays: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tokens, self.costs, self.plays = (np.zeros(self.arms) for _ in range(3))

    def update(self, arm: int, tokens: float, cost_s: float = 0.0) -> None:
        if not (0 <= arm < self.arms and np.isfinite(tokens) and np.isfinite(cost_s)):
            return
        for sums in (self.tokens, self.costs, self.plays):
            sums *= self.discount
        self.tokens[arm] += tokens
        self.costs[arm] += cost_s
        self.plays[arm] += 1.0

    def means(self, goodput_tok_s: float = 0.0) -> np.ndarray:
        """(arms,) mean reward of each arm at goodput G; -inf where never played."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.plays > 0,
                            (self.tokens - goodput_tok_s * self.costs) / self.plays, -np.inf)

    def choose(self, goodput_tok_s: float = 0.0, explore: bool = True) -> int:
        """The arm to play next: the UCB choice, or (``explore`` False) the best mean."""
        means = self.means(goodput_tok_s)
        if not np.isfinite(means).any():
            return min(self.first, self.arms - 1)
        best = int(np.argmax(means))
        if not explore:
            return best
        for arm in (best - 1, best + 1):  # explore outward from the best
            if 0 <= arm < self.arms and self.plays[arm] <= 0:
                return arm
        played = self.plays > 0
        scale = max(float(np.abs(means[played]).max()), 1e-9)
        with np.errstate(divide="ignore", invalid="ignore"):
            bonus = self.exploration * scale * np.sqrt(
                np.log(max(self.plays.sum(), 1.0)) / self.plays)
            return int(np.argmax(np.where(played, means + bonus, -np.inf)))


def round_cost(arrived_s: np.ndarray, free_arrival_s: np.ndarray, draft_len: np.ndarray,
               verify_per_token_s: float) -> np.ndarray:
    """(K,) dT_k for one synchronous round (module docstring): arrival times since the
    round began, ``free_arrival_s`` with nothing drafted."""
    arrived = np.asarray(arrived_s, dtype=float)
    others = latest_of_others(arrived)
    stretch = np.maximum(others, arrived) - np.maximum(others, free_arrival_s)
    return np.maximum(stretch, 0.0) + verify_per_token_s * np.asarray(draft_len)


def delay_bucket(delay_s: float | None, edges_s: tuple[float, ...]) -> int:
    """Index of the delay bucket (edges ascending) a measured delay falls in; 0 if unknown."""
    return 0 if delay_s is None else int(np.searchsorted(edges_s, delay_s, side="right"))
