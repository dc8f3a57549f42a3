"""The verification-time model T_v that the controller plans with (pure numpy, no torch).

``scripts/bench_verify.py --sweep`` measures batched verification rounds and fits both
forms of DESIGN.md section 2, each with a per-token and an attention term::

    packed:  T_v = base_s + per_token_s * sum_k (L_k + 1)
                          + per_token_ctx_s * sum_k (L_k + 1) * C_k
    padded:  T_v = base_s + per_token_s * K * max_k (L_k + 1)
                          + per_token_ctx_s * K * max_k (L_k + 1) * max_k C_k

with ``L_k`` the draft length and ``C_k`` the context (tokens already in the session's
sequence) of each of the K sessions in the round. The form with the smaller relative RMS
error is kept. With ``per_token_ctx_s = 0`` the packed form is the scenario files' first
version ``base_s + per_token_s * sum_k (L_k + 1)``.

File format (JSON, written by the bench, read by :meth:`VerifyCost.load`)::

    {
      "format": "multispin-verify-cost/1",
      "form": "packed" | "padded",            # the chosen form
      "coef": {"base_s": ..., "per_token_s": ..., "per_token_ctx_s": ...},
      "rel_rmse": ...,                        # of the chosen form over the sweep's points
      "candidates": {"packed": {"coef": {...}, "rel_rmse": ...}, "padded": {...}},
      "measured_on": {"device": ..., "device_name": ..., "model": ..., "dtype": ...,
                      "mode": "greedy" | "sampling", "threads": ...},
      "grid": {"users": [...], "draft_len": [...], "context": [...]},
      "n_points": ...
    }
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

FORMAT = "multispin-verify-cost/1"
FORMS = ("packed", "padded")


@dataclass(frozen=True)
class VerifyCost:
    form: str
    base_s: float
    per_token_s: float
    per_token_ctx_s: float = 0.0

    def predict(self, draft_lens: Sequence[int], contexts: Sequence[int]) -> float:
        """Seconds for one batched round; one draft length and one context per session."""
        if not draft_lens:
            return 0.0
        tokens, attention = features(self.form, draft_lens, contexts)
        return self.base_s + self.per_token_s * tokens + self.per_token_ctx_s * attention

    @property
    def coef(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "form"}

    @classmethod
    def load(cls, path: str | Path) -> VerifyCost:
        data = json.loads(Path(path).read_text())
        if data.get("format") != FORMAT or data.get("form") not in FORMS:
            raise ValueError(f"{path}: not a {FORMAT} file with a known form")
        return cls(form=data["form"], **data["coef"])


def features(form: str, draft_lens: Sequence[int], contexts: Sequence[int]) -> tuple[float, float]:
    """(token term, attention term) of one round under ``form``."""
    fed = np.asarray(draft_lens, dtype=float) + 1
    ctx = np.asarray(contexts, dtype=float)
    if form == "packed":
        return float(fed.sum()), float((fed * ctx).sum())
    if form == "padded":
        width = len(fed) * fed.max()
        return float(width), float(width * ctx.max())
    raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")


def fit(
    rounds: Sequence[tuple[Sequence[int], Sequence[int], float]],  # (draft_lens, contexts, s)
    form: str,
) -> tuple[VerifyCost, float]:
    """Non-negative least squares on relative error; returns the model and its rel. RMSE."""
    seconds = np.array([s for _, _, s in rounds])
    design = np.array([[1.0, *features(form, lens, ctx)] for lens, ctx, _ in rounds])
    weights = 1.0 / seconds
    coef, _ = nnls(design * weights[:, None], np.ones_like(seconds))
    rel_rmse = float(np.sqrt(np.mean((design @ coef * weights - 1.0) ** 2)))
    return VerifyCost(form, *map(float, coef)), rel_rmse


def fit_best(
    rounds: Sequence[tuple[Sequence[int], Sequence[int], float]],
) -> tuple[VerifyCost, dict[str, dict]]:
    """Fit every form; keep the one with the smallest relative RMSE."""
    fits = {form: fit(rounds, form) for form in FORMS}
    best = min(fits.values(), key=lambda pair: pair[1])[0]
    return best, {f: {"coef": m.coef, "rel_rmse": e} for f, (m, e) in fits.items()}
