"""Uplift targeting on a world where the obvious choice is wrong: "sure things" buy anyway (high
base rate, no effect), "persuadables" buy only with a coupon. A response model ranks the sure things
first; an uplift model must rank the persuadables first, and the Qini curve must say so."""

from __future__ import annotations

import numpy as np
import pytest

from services.retarget import uplift


def _world(seed: int, n: int = 16_000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, n)  # 0 sure thing, 1 persuadable, 2 lost cause
    features = np.column_stack([kind == 0, kind == 1, rng.normal(size=n), rng.normal(size=n)]).astype(float)
    treated = rng.random(n) < 0.5
    base = np.choose(kind, [0.6, 0.05, 0.02])
    effect = np.choose(kind, [0.0, 0.35, 0.0])
    converted = rng.random(n) < base + effect * treated
    true_uplift = effect
    return features, treated.astype(int), converted.astype(int), true_uplift


@pytest.mark.parametrize("method", ["two-model", "class-transformation"])
def test_uplift_beats_the_response_model_and_random_on_held_out_members(method: str) -> None:
    features, treated, converted, truth = _world(1)
    train = np.arange(len(treated)) % 2 == 0
    model = uplift.fit_uplift(features[train], treated[train], converted[train], method=method)
    scores = model.predict(features[~train])
    response = uplift.fit_response(features[train], treated[train], converted[train]).predict_proba(
        features[~train]
    )[:, 1]
    held_t, held_y = treated[~train], converted[~train]
    ours = uplift.qini(scores, held_t, held_y).coefficient
    theirs = uplift.qini(response, held_t, held_y).coefficient
    random = uplift.qini(np.random.default_rng(2).random(len(scores)), held_t, held_y).coefficient
    assert ours > theirs + 0.01 and ours > random + 0.01, (ours, theirs, random)
    assert (
        uplift.uplift_at(scores, held_t, held_y, 1 / 3)
        > uplift.uplift_at(response, held_t, held_y, 1 / 3) + 0.15
    )
    # the estimates themselves: persuadables near +0.35, the others near 0
    assert np.mean(scores[truth[~train] > 0]) == pytest.approx(0.35, abs=0.07)
    assert abs(np.mean(scores[truth[~train] == 0])) < 0.05


def test_qini_of_a_perfect_ranking_is_the_largest_and_random_is_near_zero() -> None:
    _, treated, converted, truth = _world(3)
    perfect = uplift.qini(truth + 1e-6 * np.arange(len(truth)), treated, converted)
    assert perfect.gains[0] == 0 and perfect.shares[-1] == 1
    random = [
        uplift.qini(np.random.default_rng(s).random(len(truth)), treated, converted).coefficient
        for s in range(5)
    ]
    assert max(abs(r) for r in random) < perfect.coefficient / 3


def test_select_within_budget_takes_the_most_persuadable_and_never_the_negative() -> None:
    users = [10, 11, 12, 13, 14]
    scores = np.array([0.1, -0.2, 0.3, 0.05, 0.0])
    assert uplift.select_within_budget(users, scores, cost_per_member_fen=500, budget_fen=1_000) == [12, 10]
    assert uplift.select_within_budget(users, scores, cost_per_member_fen=500, budget_fen=10_000) == [
        12,
        10,
        13,
    ]
    with pytest.raises(ValueError, match="cost_per_member_fen"):
        uplift.select_within_budget(users, scores, cost_per_member_fen=0, budget_fen=1)


def test_fitting_without_a_holdout_is_refused() -> None:
    features, _, converted, _ = _world(4, n=500)
    with pytest.raises(ValueError, match="holdout"):
        uplift.fit_uplift(features, np.ones(500, dtype=int), converted)
