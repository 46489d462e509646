"""How an expansion weighs its ranking components, chosen on held-out halves of the seed.

The components (``ranking.COMPONENTS``) are z-scored over the population and added with weights
from a simplex grid of step ``1/steps`` (15 points for 3 components and step 1/4). For each grid
point and each seed half ("fold") *f*, the scores computed from fold *f* alone rank every user
outside fold *f*; the held-out AUC is how well they put the *other* half above the non-seed users.
The point's figure is the mean over both folds.

Choice (a standard-error rule towards a prior): among the points whose mean held-out AUC is
within ``z`` standard errors of the best point's, take the one closest (L1) to ``default``; ties
go to the higher AUC. The standard error is DeLong's for the *paired* difference of two AUCs on the
same users (averaged over the two folds). Why not simply the best point: when the held-out half is
small, or when the seed is most of the population, every point's held-out AUC is noise around the
same value, and the argmax then flips between very different blends from one fit (or one seed) to
the next. The default (cluster 1/4, classifier 1/4, activity 1/2) is what won on average where the
held-out halves could not tell (the seed-holdout evaluation); a clear held-out winner always
overrides it. ``z = 2`` (``RankingParams.select_z``): the best of 15 noisy figures is biased
upwards, so with 1.0 it beat the default "by one s.e." often enough to flip MovieLens Romance
(positives = 95% of the users) between blends across fit seeds (AUC range 0.037), and on pure
noise the default survived only 40% of the time with 1.5; with 2 it survives 90% of pure-noise
cases, every MovieLens range stays below 0.01 and the mean AUCs are within 0.002 of 1.5's.

Invariants: deterministic for equal inputs; the chosen point's held-out AUC is reported as the
expansion's ``heldout_auc`` (it is chosen on the same halves, so read it as slightly optimistic
by the selection among 15 points — at most a few thousandths where the rule picks the default).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["BlendChoice", "choose_blend", "delong_placements", "simplex_grid"]


def simplex_grid(parts: int, steps: int) -> list[tuple[float, ...]]:
    """Weights ``(i_1/steps, ..., i_p/steps)`` with integer ``i`` summing to ``steps``, in grid order."""
    return [
        tuple(i / steps for i in w)
        for w in itertools.product(range(steps + 1), repeat=parts)
        if sum(w) == steps
    ]


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    new = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(values))
    ranks = np.empty(len(values), np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[group]
    return ranks


def delong_placements(positive: np.ndarray, score: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``(AUC, V10, V01)``: the AUC and DeLong's placement values of positives and negatives.

    ``V10_i`` is the share of negatives below positive ``i`` (ties half), ``V01_j`` the share of
    positives above negative ``j``; ``AUC = mean(V10) = mean(V01)``.
    """
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    r = _ranks(score)
    v10 = (r[pos] - _ranks(score[pos])) / n_neg
    v01 = 1.0 - (r[~pos] - _ranks(score[~pos])) / n_pos
    return float(v10.mean()), v10, v01


def _paired_variance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    d10, d01 = a[0] - b[0], a[1] - b[1]
    v = 0.0
    if len(d10) > 1:
        v += float(d10.var(ddof=1)) / len(d10)
    if len(d01) > 1:
        v += float(d01.var(ddof=1)) / len(d01)
    return v


@dataclass
class BlendChoice:
    """The chosen weights, the held-out AUC of every grid point, and why."""

    weights: tuple[float, ...]
    heldout_auc: float  # of the chosen point (nan when no fold could be evaluated)
    table: dict[tuple[float, ...], float] = field(default_factory=dict)
    best: tuple[float, ...] | None = None
    rule: str = ""


def choose_blend(
    folds: Sequence[tuple[np.ndarray, Sequence[np.ndarray]]],
    grid: Sequence[tuple[float, ...]],
    default: tuple[float, ...],
    *,
    z: float = 2.0,
    fixed: tuple[float, ...] | None = None,
) -> BlendChoice:
    """``folds``: per seed half, ``(positive, components)`` over that half's evaluation users.

    A fold whose positives or negatives are empty is skipped; with no usable fold the ``fixed``
    or ``default`` weights are returned with a nan AUC.
    """
    usable = [(y, comps) for y, comps in folds if 0 < int(np.sum(y)) < len(y)]
    candidates = [fixed] if fixed is not None else list(grid)
    if not usable:
        return BlendChoice(fixed or default, float("nan"), {}, None, "no usable held-out half")
    placements: dict[tuple[float, ...], list[tuple[float, np.ndarray, np.ndarray]]] = {}
    for w in candidates:
        placements[w] = []
        for y, comps in usable:
            score = np.zeros(len(y), np.float64)
            for weight, comp in zip(w, comps, strict=True):
                if weight:
                    score += weight * comp
            placements[w].append(delong_placements(y, score))
    table = {w: float(np.mean([p[0] for p in ps])) for w, ps in placements.items()}
    best = max(candidates, key=lambda w: table[w])  # first of equals: grid order
    if fixed is not None:
        return BlendChoice(fixed, table[fixed], table, best, "fixed by the caller")
    eligible = []
    for w in candidates:
        diffs = [pb[0] - pw[0] for pb, pw in zip(placements[best], placements[w], strict=True)]
        var = sum(
            _paired_variance((pb[1], pb[2]), (pw[1], pw[2]))
            for pb, pw in zip(placements[best], placements[w], strict=True)
        )
        se = np.sqrt(var) / len(diffs)
        if w == best or float(np.mean(diffs)) <= z * se:
            eligible.append(w)
    chosen = min(
        eligible, key=lambda w: (sum(abs(a - b) for a, b in zip(w, default, strict=True)), -table[w])
    )
    rule = "best held-out AUC" if chosen == best else f"closest to the default within {z:g} s.e. of the best"
    return BlendChoice(chosen, table[chosen], table, best, rule)
