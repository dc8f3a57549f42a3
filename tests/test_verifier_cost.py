"""The T_v model the controller reads: fitting, form selection, the file format."""

import json
import random

import pytest

from edge_controller.verifier.cost import FORMAT, VerifyCost, features, fit_best


def synthetic_rounds(truth: VerifyCost, noise: float = 0.02):
    rng = random.Random(5)
    rounds = []
    for users in (1, 2, 4, 8, 16, 32):
        for context in (128, 1024, 4096):
            for lens in ([4] * users, [rng.randint(0, 8) for _ in range(users)]):
                contexts = [context + rng.randint(0, 64) for _ in range(users)]
                seconds = truth.predict(lens, contexts) * (1 + rng.uniform(-noise, noise))
                rounds.append((lens, contexts, seconds))
    return rounds


def test_features_of_padded_and_packed_rounds():
    assert features("packed", [1, 3], [100, 200]) == (6.0, 2 * 100 + 4 * 200)
    assert features("padded", [1, 3], [100, 200]) == (8.0, 8 * 200)
    with pytest.raises(ValueError, match="unknown form"):
        features("ragged", [1], [1])


@pytest.mark.parametrize("form", ["packed", "padded"])
def test_fit_recovers_the_form_and_coefficients_of_the_data(form):
    truth = VerifyCost(form, base_s=0.02, per_token_s=4e-4, per_token_ctx_s=2e-8)

    best, candidates = fit_best(synthetic_rounds(truth))

    assert best.form == form
    assert best.base_s == pytest.approx(truth.base_s, rel=0.1)
    assert best.per_token_s == pytest.approx(truth.per_token_s, rel=0.1)
    assert best.per_token_ctx_s == pytest.approx(truth.per_token_ctx_s, rel=0.2)
    other = "padded" if form == "packed" else "packed"
    assert candidates[form]["rel_rmse"] < 0.02 < candidates[other]["rel_rmse"]


def test_cost_file_round_trip(tmp_path):
    model = VerifyCost("packed", base_s=0.01, per_token_s=1e-3)
    path = tmp_path / "verify_cost.json"
    path.write_text(json.dumps({"format": FORMAT, "form": model.form, "coef": model.coef}))

    loaded = VerifyCost.load(path)

    assert loaded == model
    assert loaded.predict([4, 4], [100, 100]) == pytest.approx(0.01 + 10e-3)
    assert loaded.predict([], []) == 0.0
    path.write_text(json.dumps({"format": "other", "form": "packed", "coef": model.coef}))
    with pytest.raises(ValueError, match="multispin-verify-cost/1"):
        VerifyCost.load(path)
