"""Seed expansion: rank the population by likeness to a seed and take exactly the requested reach.

The ranking is ``ranking.rank_population`` (cluster density over the model's fit ensemble, blended
with a positive-unlabelled classifier and activity, the blend chosen on held-out halves of the
seed); this module resolves the reach, applies the exclusions, selects, and reports:

* **reach**: ``reach_fraction`` in [1%, 20%] of the model's population (Meta allows 1-20%), or
  ``reach_size`` users;
  the selection is the top of a total order (score, then distance to the nearest centres, then
  user id), so the reach is honoured exactly and equal inputs select equal members;
* **exclusions**: the seed (unless ``include_seed``), ``exclude`` ids and anything outside
  ``allowed`` (profile constraints) are never selected;
* **report**: seed members found, clusters covered and concentration (the model's first fit),
  the chosen blend and its held-out AUC, and the expected lift per reach step with its interval,
  or withheld with the reason (``lift.py``); steps are distinct in users and include the request;
* **tiers**: the members in rank order cut at 1/2/5/10/20% of the population (``TIER_BOUNDS``, only
  the bounds below the reach; the last tier ends at the reach), so a caller can target the best
  1% and widen without another expansion.

Everything runs shard by shard over the feature snapshot; standardised features are cached in
memory when they fit in ``cache_bytes`` (else each pass re-reads the shards).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.audience.lookalike.features import FeatureSnapshot, activity_from_raw
from services.audience.lookalike.lift import LiftEstimate, heldout_lift, reach_steps, top_indices
from services.audience.lookalike.model import LookalikeModel
from services.audience.lookalike.ranking import Ranking, RankingParams, rank_population

__all__ = [
    "DEFAULT_MIN_SEED",
    "LIFT_STEPS",
    "TIER_BOUNDS",
    "ExpandError",
    "ExpandResult",
    "NotEnoughCandidates",
    "RankingParams",
    "Tier",
    "expand",
    "resolve_reach",
]

#: Smallest seed (members found in the model's population) we expand; Meta states 100.
DEFAULT_MIN_SEED = 100
MIN_REACH_FRACTION = 0.01
MAX_REACH_FRACTION = 0.20
#: Reported lift steps; those above ``ALWAYS_REPORTED`` only when the reach gets there.
LIFT_STEPS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.10, 0.20)
ALWAYS_REPORTED = 0.10
#: Upper bounds (share of the population) of the ranked tiers of an expansion.
TIER_BOUNDS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.10, 0.20)


class ExpandError(ValueError):
    """A request field is wrong given the model (maps to INVALID_ARGUMENT with the field named)."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description


class NotEnoughCandidates(ValueError):
    """Fewer eligible users than the reach asks for (exclusions/profile constraints too tight)."""

    def __init__(self, requested: int, eligible: int) -> None:
        super().__init__(
            f"reach asks for {requested:,} users but only {eligible:,} are eligible after excluding the "
            "seed, the excluded packs and the profile constraints"
        )
        self.requested = requested
        self.eligible = eligible


def resolve_reach(
    population: int,
    *,
    fraction: float | None = None,
    size: int | None = None,
    min_fraction: float = MIN_REACH_FRACTION,
    max_fraction: float = MAX_REACH_FRACTION,
) -> int:
    """Users to select; ``ExpandError`` naming ``reach_fraction``/``reach_size`` when out of range."""
    if (fraction is None) == (size is None):
        raise ExpandError("reach", "set exactly one of reach_fraction or reach_size")
    largest = math.floor(max_fraction * population + 1e-9)
    if fraction is not None:
        if not (min_fraction - 1e-12 <= fraction <= max_fraction + 1e-12) or math.isnan(fraction):
            raise ExpandError(
                "reach_fraction",
                f"{fraction:g} is outside [{min_fraction:g}, {max_fraction:g}] of the population "
                f"({population:,} users)",
            )
        return max(1, round(fraction * population))
    assert size is not None
    if not 1 <= size <= largest:
        raise ExpandError(
            "reach_size",
            f"{size:,} is outside [1, {largest:,}] ({max_fraction:.0%} of the model's population of "
            f"{population:,} users)",
        )
    return int(size)


@dataclass(frozen=True)
class Tier:
    """Members ranked from ``start`` to ``end`` (shares of the population; ``end`` <= the reach)."""

    start_fraction: float
    end_fraction: float
    size: int

    def to_json(self) -> dict[str, float | int]:
        return {"start_fraction": self.start_fraction, "end_fraction": self.end_fraction, "size": self.size}


@dataclass
class ExpandResult:
    members: np.ndarray  # uint32, sorted ascending
    population: int
    seed_size: int
    seed_matched: int
    eligible: int
    clusters_covered: int
    seed_concentration: float
    lift_curve: list[LiftEstimate]
    cluster_count: int
    timings: dict[str, float]
    requested: int
    blend: dict[str, float] = field(default_factory=dict)  # component -> weight
    heldout_auc: float = float("nan")  # of the chosen blend, on held-out seed halves
    component_auc: dict[str, float] = field(default_factory=dict)  # held-out AUC of each component alone
    blend_rule: str = ""
    fits: int = 1
    tiers: list[Tier] = field(default_factory=list)
    member_tiers: np.ndarray | None = None  # uint8 per member (aligned with ``members``): tier index
    ranked: np.ndarray | None = None  # members in rank order (best first)
    ranked_tiers: np.ndarray | None = None  # uint8 tier index per rank (aligned with ``ranked``)
    ranked_scores: np.ndarray | None = None  # the score per rank (aligned with ``ranked``)
    negative_matched: int = 0  # negative-seed users found in the population
    weighted: bool = False  # seed members were weighted

    def stats(self) -> dict[str, Any]:
        return {
            "population": self.population,
            "seed_size": self.seed_size,
            "seed_matched": self.seed_matched,
            "eligible": self.eligible,
            "clusters_covered": self.clusters_covered,
            "cluster_count": self.cluster_count,
            "fits": self.fits,
            "seed_concentration": round(self.seed_concentration, 6),
            "lift_curve": [step.to_json() for step in self.lift_curve],
            "blend": {k: round(v, 4) for k, v in self.blend.items()},
            "blend_rule": self.blend_rule,
            "heldout_auc": None if math.isnan(self.heldout_auc) else round(self.heldout_auc, 4),
            "component_auc": {k: round(v, 4) for k, v in self.component_auc.items()},
            "tiers": [t.to_json() for t in self.tiers],
            "negative_matched": self.negative_matched,
            "weighted_seed": self.weighted,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


def _isin(ids: np.ndarray, sorted_values: np.ndarray | None) -> np.ndarray:
    if sorted_values is None or len(sorted_values) == 0:
        return np.zeros(len(ids), bool)
    pos = np.searchsorted(sorted_values, ids)
    pos = np.minimum(pos, len(sorted_values) - 1)
    return sorted_values[pos] == ids


def _as_sorted(values: Iterable[int] | np.ndarray | None) -> np.ndarray | None:
    if values is None:
        return None
    if isinstance(values, np.ndarray):
        arr = values.astype(np.uint32, copy=False)
    elif hasattr(values, "to_array"):  # pyroaring BitMap
        arr = np.asarray(values.to_array(), dtype=np.uint32)
    else:
        arr = np.fromiter(values, dtype=np.uint32)
    return np.unique(arr)


def _tiers(population: int, requested: int) -> list[tuple[float, float, int, int]]:
    """``(start fraction, end fraction, first rank, end rank)`` of each tier of a reach."""
    out, start = [], 0
    for bound in TIER_BOUNDS:
        end = min(requested, max(1, round(bound * population)))
        if end > start:
            out.append((start / population, end / population, start, end))
            start = end
        if end >= requested:
            break
    if start < requested:
        out.append((start / population, requested / population, start, requested))
    return out


def rank_snapshot(
    model: LookalikeModel,
    snapshot: FeatureSnapshot,
    seed_ids: np.ndarray,
    params: RankingParams | None = None,
    *,
    cache_bytes: int = 1 << 30,
    min_seed: int = 0,
    on_small_seed: Callable[[int], None] | None = None,
    progress: Callable[[str, float], None] | None = None,
    seed_weights: np.ndarray | None = None,
    negative_ids: np.ndarray | None = None,
) -> Ranking:
    """The model's ranking of the snapshot's population for a seed (shard by shard)."""
    d = model.ensemble.shape[2]
    cache_ok = snapshot.population * d * 4 <= cache_bytes
    cache: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if cache:
            yield from cache
            return
        for ids, raw in snapshot.iter_shards():
            item = (ids, model.transform(raw), activity_from_raw(model.schema, raw))
            if cache_ok:
                cache.append(item)
            yield item

    try:
        return rank_population(
            model.ensemble, chunks, seed_ids, params, median_d2=model.median_d2, min_seed=min_seed,
            on_small_seed=on_small_seed, progress=progress, seed_weights=seed_weights,
            negative_ids=negative_ids,
        )  # fmt: skip
    finally:
        cache.clear()


def expand(
    model: LookalikeModel,
    snapshot: FeatureSnapshot,
    seed: Iterable[int] | np.ndarray,
    *,
    reach_fraction: float | None = None,
    reach_size: int | None = None,
    include_seed: bool = False,
    exclude: Iterable[int] | np.ndarray | None = None,
    allowed: Iterable[int] | np.ndarray | None = None,
    min_seed: int = DEFAULT_MIN_SEED,
    params: RankingParams | None = None,
    lift_steps: Sequence[float] = LIFT_STEPS,
    cache_bytes: int = 1 << 30,
    seed_field: str = "seed_pack",
    progress: Callable[[str, float], None] | None = None,
    seed_weights: np.ndarray | None = None,
    negative: Iterable[int] | np.ndarray | None = None,
) -> ExpandResult:
    """Expand ``seed`` over the model's population; see the module doc.

    ``exclude`` (user ids) are never selected; ``allowed`` (user ids passing the profile
    constraints), when given, is the only users that may be selected. ``seed_weights`` (aligned
    with ``seed``) weigh its members; ``negative`` users are moved away from and never selected.
    Raises ``ExpandError`` for a seed below ``min_seed`` or a reach out of range,
    ``NotEnoughCandidates`` when the eligible users are fewer than the reach.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    population = snapshot.population
    requested = resolve_reach(population, fraction=reach_fraction, size=reach_size)
    seed_ids = _as_sorted(seed)
    assert seed_ids is not None
    if seed_weights is not None:  # align the weights with the sorted unique seed
        raw = np.asarray(seed, np.uint32) if not isinstance(seed, np.ndarray) else seed.astype(np.uint32)
        order = np.argsort(raw, kind="stable")
        _, first = np.unique(raw[order], return_index=True)
        seed_weights = np.asarray(seed_weights, np.float64)[order][first]
    exclude_ids = _as_sorted(exclude)
    allowed_ids = _as_sorted(allowed)
    negative_ids = _as_sorted(negative)

    def too_small(matched: int) -> None:
        raise ExpandError(
            seed_field,
            f"seed has {len(seed_ids):,} members, {matched:,} of them in the model's population of "
            f"{population:,} users; the minimum is {min_seed:,}",
        )

    ranking = rank_snapshot(
        model, snapshot, seed_ids, params, cache_bytes=cache_bytes, min_seed=min_seed,
        on_small_seed=too_small, progress=progress, seed_weights=seed_weights,
        negative_ids=negative_ids,
    )  # fmt: skip
    ids, score, tie = ranking.ids, ranking.scores["all"], ranking.tie
    timings["score_seconds"] = time.perf_counter() - started

    # Selection.
    if progress is not None:
        progress("select", 0.9)
    t3 = time.perf_counter()
    seed_mask = ranking.seed_mask
    eligible = np.ones(len(ids), bool)
    if not include_seed:
        eligible &= ~seed_mask
    if exclude_ids is not None:
        eligible &= ~_isin(ids, exclude_ids)
    if negative_ids is not None:
        eligible &= ~_isin(ids, negative_ids)
    if allowed_ids is not None:
        eligible &= _isin(ids, allowed_ids)
    n_eligible = int(eligible.sum())
    if n_eligible < requested:
        raise NotEnoughCandidates(requested, n_eligible)
    idx = np.flatnonzero(eligible)
    top = idx[top_indices(score[idx], tie[idx], ids[idx], requested)]  # best first
    ranked = ids[top].astype(np.uint32)
    ranked_scores = score[top].astype(np.float64)
    order = np.argsort(ranked, kind="stable")
    members = ranked[order]
    tiers, rank_tier = [], np.zeros(requested, np.uint8)
    for i, (lo_f, hi_f, lo, hi) in enumerate(_tiers(population, requested)):
        tiers.append(Tier(round(lo_f, 6), round(hi_f, 6), hi - lo))
        rank_tier[lo:hi] = i
    timings["select_seconds"] = time.perf_counter() - t3

    # Reporting: coverage, concentration, expected lift from the held-out halves.
    t4 = time.perf_counter()
    k = model.cluster_count
    counts = ranking.seed_counts
    covered = int((counts > 0).sum())
    top_clusters = np.argsort(-ranking.cluster_lift, kind="stable")[: max(1, math.ceil(0.1 * k))]
    concentration = float(counts[top_clusters].sum()) / max(ranking.seed_matched, 1)
    steps = reach_steps(
        population,
        [f for f in lift_steps if f <= ALWAYS_REPORTED or round(f * population) <= requested],
        requested,
    )
    curve = heldout_lift(
        [ranking.scores["fold0"], ranking.scores["fold1"]], tie, ids, seed_mask, ranking.folds, steps
    )
    timings["report_seconds"] = time.perf_counter() - t4
    timings["total_seconds"] = time.perf_counter() - started
    return ExpandResult(
        members=members,
        population=population,
        seed_size=len(seed_ids),
        seed_matched=ranking.seed_matched,
        eligible=n_eligible,
        clusters_covered=covered,
        seed_concentration=concentration,
        lift_curve=curve,
        cluster_count=k,
        timings=timings,
        requested=requested,
        blend=ranking.weights,
        heldout_auc=ranking.heldout_auc,
        component_auc=ranking.component_auc,
        blend_rule=ranking.blend.rule,
        fits=model.fits,
        tiers=tiers,
        member_tiers=rank_tier[order],
        ranked=ranked,
        ranked_tiers=rank_tier,
        ranked_scores=ranked_scores,
        negative_matched=int(ranking.negative_mask.sum()) if ranking.negative_mask is not None else 0,
        weighted=seed_weights is not None,
    )
