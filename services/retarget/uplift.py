"""Uplift targeting: whom a coupon (or an e-mail) persuades, learnt from a past randomised campaign.

"Clicked but did not buy" picks people likely to buy; many would buy anyway ("sure things") and a
coupon only costs margin there. An uplift model estimates the *difference* a treatment makes,
``P(buy | treated, x) - P(buy | control, x)``, from a randomised campaign (arms against the
holdout), so the next campaign can spend its coupon budget where the difference is largest.

Two estimators, both scikit-learn (no uplift library earned its place: causalml and scikit-uplift
pull large dependency trees for what is, here, two classifiers and a curve):

* ``two-model``: one classifier on the treated, one on the controls; uplift = the difference;
* ``class-transformation`` (Jaskowski and Jaroszewicz 2012): a member is positive (``z = 1``) when
  treated and converted or untreated and not; with the groups weighted to a 50/50 split,
  ``uplift = 2 P(z = 1 | x) - 1``.

Evaluation (``qini``): the Qini curve ranks members by score and, at each share targeted, counts
the extra conversions ``Y_t - Y_c N_t / N_c``; the Qini coefficient is the area between that curve
and the random-targeting line, as a share of all members. ``uplift_at`` gives the conversion
difference inside the top ``k``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

Method = Literal["two-model", "class-transformation"]


def _classifier(seed: int) -> HistGradientBoostingClassifier:
    # Shallow and regularised: uplift signals are small and noisy, and overfitting shows as noise.
    return HistGradientBoostingClassifier(
        max_depth=3,
        learning_rate=0.05,
        max_iter=150,
        min_samples_leaf=200,
        l2_regularization=1.0,
        random_state=seed,
    )


@dataclass
class UpliftModel:
    method: Method
    treated_share: float
    models: tuple[HistGradientBoostingClassifier, ...]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Estimated uplift (conversion difference) per row."""
        if self.method == "two-model":
            treated, control = self.models
            return treated.predict_proba(features)[:, 1] - control.predict_proba(features)[:, 1]
        (model,) = self.models
        # P(z=1) = (P(y|t) + 1 - P(y|c)) / 2 under the 50/50 weights of the fit
        return 2.0 * model.predict_proba(features)[:, 1] - 1.0


def fit_uplift(
    features: np.ndarray,
    treated: np.ndarray,
    converted: np.ndarray,
    *,
    method: Method = "two-model",
    seed: int = 0,
) -> UpliftModel:
    """Fit on a randomised campaign: ``treated`` and ``converted`` are 0/1 per row of ``features``."""
    t, y = np.asarray(treated).astype(bool), np.asarray(converted).astype(int)
    if len(t) != len(features) or len(y) != len(features):
        raise ValueError("features, treated and converted must have one row each per member")
    if t.all() or not t.any():
        raise ValueError("an uplift model needs treated and control members (a holdout)")
    share = float(t.mean())
    if method == "two-model":
        treated_model = _classifier(seed).fit(features[t], y[t])
        control_model = _classifier(seed + 1).fit(features[~t], y[~t])
        return UpliftModel(method, share, (treated_model, control_model))
    z = np.where(t, y, 1 - y)
    weights = np.where(t, 0.5 / share, 0.5 / (1 - share))  # make the classes as if split 50/50
    model = _classifier(seed).fit(features, z, sample_weight=weights)
    return UpliftModel(method, share, (model,))


def fit_response(
    features: np.ndarray, treated: np.ndarray, converted: np.ndarray, *, seed: int = 0
) -> HistGradientBoostingClassifier:
    """The usual alternative: a response model (who buys when treated), for comparison."""
    t = np.asarray(treated).astype(bool)
    return _classifier(seed).fit(features[t], np.asarray(converted)[t])


@dataclass(frozen=True)
class Qini:
    #: Share of members targeted (0..1) and the extra conversions at that share, per member.
    shares: np.ndarray
    gains: np.ndarray
    #: Area between the curve and the random line (per member): > 0 beats random targeting.
    coefficient: float


def qini(score: np.ndarray, treated: np.ndarray, converted: np.ndarray, *, points: int = 100) -> Qini:
    order = np.argsort(-np.asarray(score, dtype=float), kind="stable")
    t = np.asarray(treated).astype(bool)[order]
    y = np.asarray(converted).astype(float)[order]
    n = len(order)
    nt, nc = np.cumsum(t), np.cumsum(~t)
    yt, yc = np.cumsum(y * t), np.cumsum(y * ~t)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(nc > 0, yt - yc * nt / np.maximum(nc, 1), yt) / n
    cut = np.linspace(0, n, points + 1).astype(int)
    shares = cut / n
    gains = np.concatenate([[0.0], gain[np.maximum(cut[1:] - 1, 0)]])
    random = shares * gains[-1]
    coefficient = float(np.trapezoid(gains - random, shares))
    return Qini(shares, gains, coefficient)


def uplift_at(score: np.ndarray, treated: np.ndarray, converted: np.ndarray, share: float) -> float:
    """Conversion rate of the treated minus the controls among the top ``share`` by score."""
    order = np.argsort(-np.asarray(score, dtype=float), kind="stable")[: max(1, int(len(score) * share))]
    t = np.asarray(treated).astype(bool)[order]
    y = np.asarray(converted).astype(float)[order]
    if not t.any() or t.all():
        return 0.0
    return float(y[t].mean() - y[~t].mean())


def select_within_budget(
    user_ids: Sequence[int], uplift: np.ndarray, *, cost_per_member_fen: int, budget_fen: int
) -> list[int]:
    """Members with the largest positive uplift whose coupons fit in the budget (each costs
    ``cost_per_member_fen`` at most); members a coupon would not persuade are never picked."""
    if cost_per_member_fen <= 0:
        raise ValueError("cost_per_member_fen must be greater than 0")
    if budget_fen < 0:
        raise ValueError("budget_fen must not be negative")
    order = np.argsort(-np.asarray(uplift, dtype=float), kind="stable")
    room = budget_fen // cost_per_member_fen
    picked = [int(user_ids[i]) for i in order[:room] if uplift[i] > 0]
    return picked


__all__ = ["Qini", "UpliftModel", "fit_response", "fit_uplift", "qini", "select_within_budget", "uplift_at"]
