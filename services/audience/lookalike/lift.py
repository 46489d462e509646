"""Expected lift per reach step, measured on held-out halves of the seed, with an interval.

The seed is split in two halves by a hash of the user id (``ranking.fold_of``). For each half
*s*, the scores computed from half *s* alone rank every user outside it; at a reach of ``m`` users,
``hits_s`` members of the *other* half are among the top ``m``. Pooled over both directions, the
recall ``p = (hits_0 + hits_1) / (H_0 + H_1)`` (``H`` = size of the held-out half) over the share
of users taken ``m / N`` (``N`` = users outside the shown half) is the expected lift: how much more
seed-like the expansion is than a random draw of the same size. The interval is Wilson's 95%
interval of ``p`` (each held-out member found or not), scaled the same way.

Withheld, with the reason, when the smaller held-out half has fewer than ``min_heldout`` (50)
members: below that, a 1% reach expects under one held-out member at random and the figure is
noise (a 15-member seed showed 0.00x where the observed lift was 3.7x, a 13-member one 8.4x where
it was 0). Read the figure as seed-likeness, not as a conversion promise (README, "Figures").

Steps are distinct in users: the requested reach is one of them (``requested``) and never listed
twice, even when it rounds to the same number of users as a standard step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_HELDOUT", "LiftEstimate", "heldout_lift", "reach_steps", "top_indices", "wilson"]

#: Smallest held-out half with which a lift is reported.
MIN_HELDOUT = 50


@dataclass(frozen=True)
class LiftEstimate:
    """One reach step: users, expected lift and its 95% interval, or the reason it is withheld."""

    reach_fraction: float
    size: int
    lift: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")
    withheld: str = ""
    requested: bool = False

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"reach_fraction": self.reach_fraction, "size": self.size}
        if self.withheld:
            doc["withheld"] = self.withheld
        else:
            doc.update(
                expected_lift=round(self.lift, 4), lift_low=round(self.low, 4), lift_high=round(self.high, 4)
            )
        if self.requested:
            doc["requested"] = True
        return doc


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if trials <= 0:
        return float("nan"), float("nan")
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def reach_steps(population: int, steps: Sequence[float], requested: int) -> list[tuple[float, int, bool]]:
    """``(reach fraction, users, is the requested step)``, distinct in users, ascending."""
    by_size: dict[int, tuple[float, bool]] = {}
    for f in steps:
        by_size.setdefault(max(1, round(f * population)), (round(f, 6), False))
    by_size[requested] = (round(requested / population, 6) if population else 0.0, True)
    return [(f, m, req) for m, (f, req) in sorted(by_size.items())]


def top_indices(score: np.ndarray, tie: np.ndarray, ids: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` best rows: score desc, then ``tie`` asc, then id asc (a total order)."""
    if m >= len(score):
        return np.lexsort((ids, tie, -score))[:m]
    kth = np.partition(-score, m - 1)[m - 1]
    cand = np.flatnonzero(-score <= kth)  # every row tied with the m-th score
    order = np.lexsort((ids[cand], tie[cand], -score[cand]))
    return cand[order[:m]]


def heldout_lift(
    fold_scores: Sequence[np.ndarray],
    tie: np.ndarray,
    ids: np.ndarray,
    seed_mask: np.ndarray,
    folds: np.ndarray,
    steps: Sequence[tuple[float, int, bool]],
    *,
    min_heldout: int = MIN_HELDOUT,
) -> list[LiftEstimate]:
    """The lift curve of ``steps`` (see the module doc); ``fold_scores[s]`` = scores from half ``s``."""
    halves = [int((seed_mask & (folds != s)).sum()) for s in (0, 1)]
    if min(halves) < min_heldout:
        reason = (
            f"the held-out half of the seed has {min(halves):,} members; at least {min_heldout:,} are "
            "needed to estimate lift"
        )
        return [LiftEstimate(f, m, withheld=reason, requested=req) for f, m, req in steps]
    pools = []
    for s in (0, 1):
        keep = ~(seed_mask & (folds == s))
        idx = np.flatnonzero(keep)
        hidden = (seed_mask & (folds != s))[idx]
        pools.append((idx, hidden))
    out = []
    for f, m, req in steps:
        hits, held, share = 0, 0, []
        for s, (idx, hidden) in enumerate(pools):
            take = min(m, len(idx))
            top = top_indices(fold_scores[s][idx], tie[idx], ids[idx], take)
            hits += int(hidden[top].sum())
            held += int(hidden.sum())
            share.append(take / len(idx))
        base = float(np.mean(share))
        lo, hi = wilson(hits, held)
        lift = (hits / held) / base
        out.append(LiftEstimate(f, m, lift, min(lo / base, lift), max(hi / base, lift), requested=req))
    return out
