"""Ranking metrics of the seed-holdout evaluation: AUC, bootstrap intervals, paired differences, lift.

Invariants:

* ``auc`` is the Mann-Whitney statistic with ties counted half (equal to scikit-learn's
  ``roc_auc_score``); it is ``nan`` when either class is empty.
* Bootstrap resamples are **stratified**: positives and negatives are each drawn with replacement
  at their own count, so every resample has the original class sizes (an AUC is defined on every
  resample, and the interval reflects the sampling error of both classes).
* Paired bootstraps draw *one* set of indices per resample and apply it to every method, so the
  interval of a difference accounts for the correlation between the methods' scores of the same
  users (two unpaired intervals that overlap say much less).
* Everything is deterministic given ``rng_seed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interval",
    "auc",
    "bootstrap_aucs",
    "lift_at",
    "percentile_interval",
]


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile interval."""

    estimate: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based average ranks (ties share their mean rank)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    new = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(values))
    ranks = np.empty(len(values), np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[group]
    return ranks


def auc(positive: np.ndarray, score: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties half."""
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(np.asarray(score, np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_aucs(
    positive: np.ndarray,
    scores: Mapping[str, np.ndarray],
    *,
    resamples: int = 1000,
    rng_seed: int = 0,
) -> dict[str, np.ndarray]:
    """AUC of every method on the same stratified resamples: ``{method: array of resamples}``."""
    positive = np.asarray(positive, bool)
    pos_idx, neg_idx = np.flatnonzero(positive), np.flatnonzero(~positive)
    out = {name: np.full(resamples, np.nan) for name in scores}
    if len(pos_idx) == 0 or len(neg_idx) == 0:
        return out
    rng = np.random.default_rng(rng_seed)
    labels = np.concatenate([np.ones(len(pos_idx), bool), np.zeros(len(neg_idx), bool)])
    for b in range(resamples):
        idx = np.concatenate(
            [rng.choice(pos_idx, len(pos_idx), replace=True), rng.choice(neg_idx, len(neg_idx), replace=True)]
        )
        for name, score in scores.items():
            out[name][b] = auc(labels, score[idx])
    return out


def percentile_interval(estimate: float, samples: np.ndarray, level: float = 0.95) -> Interval:
    """``estimate`` with the ``level`` percentile interval of ``samples`` (nan-aware)."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return Interval(estimate, float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def lift_at(positive: np.ndarray, score: np.ndarray, size: int, tie_break: np.ndarray | None = None) -> float:
    """Share of positives among the ``size`` best-scored users, over their share among all users.

    Ties are broken by ``tie_break`` (ascending) when given, else by position: deterministic.
    """
    positive = np.asarray(positive, bool)
    n = len(positive)
    base = positive.mean() if n else float("nan")
    if n == 0 or size <= 0 or base == 0:
        return float("nan")
    size = min(size, n)
    keys = (np.arange(n),) if tie_break is None else (np.arange(n), tie_break)
    order = np.lexsort((*keys, -np.asarray(score, np.float64)))
    return float(positive[order[:size]].mean() / base)
