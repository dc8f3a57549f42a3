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

Index: mean reward + c * scale * sqrt(ln n / n_L), scale the largest |mean| seen; arms are
explored outward from the best one (an untried neighbour of the best is played first), so
a device never jumps to a 16-token draft just to learn it is bad. With discount gamma < 1
every sum decays per round (drift). Pure numpy, no clocks.
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
    arms: int  # L_max + 1
    first: int  # the arm played first (the configured length)
    exploration: float = 0.3  # c
    discount: float = 1.0  # gamma: 1 keeps everything
    rewards: np.ndarray = field(init=False, repr=False)
    plays: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rewards, self.plays = np.zeros(self.arms), np.zeros(self.arms)

    def update(self, arm: int, reward: float) -> None:
        if not (0 <= arm < self.arms and np.isfinite(reward)):
            return
        self.rewards *= self.discount
        self.plays *= self.discount
        self.rewards[arm] += reward
        self.plays[arm] += 1.0

    def means(self) -> np.ndarray:
        """(arms,) mean reward of each arm; -inf where never played."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.plays > 0, self.rewards / self.plays, -np.inf)

    def choose(self) -> int:
        means = self.means()
        if not np.isfinite(means).any():
            return min(self.first, self.arms - 1)
        best = int(np.argmax(means))
        for arm in (best - 1, best + 1):  # explore outward from the best
            if 0 <= arm < self.arms and self.plays[arm] <= 0:
                return arm
        played = self.plays > 0
        scale = max(float(np.abs(means[played]).max()), 1e-9)
        with np.errstate(divide="ignore", invalid="ignore"):
            bonus = self.exploration * scale * np.sqrt(
                np.log(max(self.plays.sum(), 1.0)) / self.plays)
            return int(np.argmax(np.where(played, means + bonus, -np.inf)))


def round_credit(tokens: np.ndarray, arrived_s: np.ndarray, free_arrival_s: np.ndarray,
                 draft_len: np.ndarray, goodput_tok_s: float,
                 verify_per_token_s: float) -> np.ndarray:
    """(K,) r_k = N_k - G dT_k for one synchronous round (module docstring); arrival
    times since the round began, ``free_arrival_s`` with nothing drafted."""
    arrived = np.asarray(arrived_s, dtype=float)
    others = latest_of_others(arrived)
    stretch = np.maximum(others, arrived) - np.maximum(others, free_arrival_s)
    cost = np.maximum(stretch, 0.0) + verify_per_token_s * np.asarray(draft_len)
    return np.asarray(tokens, dtype=float) - goodput_tok_s * cost


def delay_bucket(delay_s: float | None, edges_s: tuple[float, ...]) -> int:
    """Index of the delay bucket (edges ascending) a measured delay falls in; 0 if unknown."""
    return 0 if delay_s is None else int(np.searchsorted(edges_s, delay_s, side="right"))
