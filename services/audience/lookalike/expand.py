"""Seed expansion: rank the population by similarity to a seed and take exactly the requested reach.

Scoring (per user ``u`` in cluster ``c``)::

    rate_c  = (seed_c + prior · r0) / (n_c + prior)        r0 = seed / population (smoothed rate)
    lift_c  = rate_c / r0                                  seed over-representation of the cluster
    d2_u    = |x_u - m_c|²                                 m_c = mean of the seed members in c
                                                           (the seed mean if c has none)
    w       = (S_w + λI)⁻¹ (μ_seed - μ_rest)               S_w = pooled within-cluster covariance
    t_u     = w · (x_u - x̄_c) / sd_w(w · x)                the seed direction, inside the cluster
    score_u = log(lift_c) + gamma · t_u - beta · d2_u / mean_{v in c} d2_v

The first term is the seed's over-representation in the user's cluster, shrunk towards 1 for
clusters with little evidence (``prior`` pseudo-members at the base rate, so one seed member in a
tiny cluster does not make it the best cluster). The other two refine *inside* the cluster (both
are zero on average over a cluster's members, so they reorder a cluster and let the edge of a good
cluster fall below the core of the next one, but never move a whole cluster):

* ``t_u`` is the Mahalanobis form of "closer to the seed than to the rest": with a metric ``M``,
  ``|x - μ_rest|²_M - |x - μ_seed|²_M = 2 (μ_seed - μ_rest)ᵀ M x + const``; with ``M`` the inverse
  within-cluster covariance (ridge ``λ`` = ``ridge`` × its mean variance) it weighs each feature
  by how much it separates the seed from the rest *given the others*. This is what the plain
  distance cannot express: when seed members are more active (or more recent) than the rest, the
  most active candidates are the most seed-like, not the ones at the seed's average activity.
* ``d2_u`` is the distance to the seed members of the same cluster, relative to its spread.

``gamma`` and ``beta`` are chosen per expansion from a small grid (``ScoringParams.gammas`` /
``betas``), by the AUC with which scores computed from one half of the seed find the other half
(on a deterministic sample of at most ``select_sample`` users): a diffuse seed leans on the
seed direction, a seed that lives in a few cells on the cells and the distance. Everything is
closed form from per-cluster sums and one d×d scatter matrix, so the cost is a few matrix
products per shard. Ties are broken by distance, then user id: the ranking is total and
deterministic, so the reach is honoured exactly.

Expected lift is measured, not assumed: the seed is split in two halves by a hash of the user id;
the scores computed from one half rank the population without it, and the lift at reach ``f`` is
the share of the *other* half found in the top ``f`` over ``f`` (both directions averaged). It is
the lift of "members of the seed we did not show the model", the best estimate of how much more
seed-like the expansion is than a random draw of the same size.

Everything runs shard by shard over the feature snapshot: pass 1 assigns clusters and accumulates
seed sums, pass 2 scores (from memory when the standardised features fit in ``cache_bytes``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from services.audience.lookalike.features import FeatureSnapshot
from services.audience.lookalike.model import LookalikeModel, assign

__all__ = [
    "DEFAULT_MIN_SEED",
    "LIFT_STEPS",
    "ExpandError",
    "ExpandResult",
    "NotEnoughCandidates",
    "ScoringParams",
    "SeedStats",
    "expand",
    "resolve_reach",
    "score_in_memory",
]

#: Smallest seed (members found in the model's population) we expand; Meta states 100.
DEFAULT_MIN_SEED = 100
MIN_REACH_FRACTION = 0.01
MAX_REACH_FRACTION = 0.10
LIFT_STEPS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.10)
_FOLD_HASH = 0x85EBCA6B


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


@dataclass(frozen=True)
class ScoringParams:
    """Tuning of the score (see the module doc); the defaults are what the eval chose."""

    prior: float = 2.0  # pseudo-seed-members (at the base rate) added to every cluster
    betas: tuple[float, ...] = (0.0, 0.25, 0.5)  # candidate weights of the in-cluster distance term
    gammas: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)  # candidate weights of the seed direction
    ridge: float = 0.1  # ridge of the within-cluster covariance, as a share of its mean variance
    min_dim_variance: float = 0.05  # columns whose candidate variance is below this share are dropped
    select_sample: int = 200_000  # users (at most) on which gamma/beta are chosen

    def __post_init__(self) -> None:
        if not self.betas or not self.gammas:
            raise ValueError("betas and gammas need at least one value each")


def fold_of(user_ids: np.ndarray) -> np.ndarray:
    """0/1 per user, from a hash independent of the shard bucket."""
    u = user_ids.astype(np.uint64)
    return (((u * np.uint64(_FOLD_HASH)) & np.uint64(0xFFFFFFFF)) >> np.uint64(31)).astype(np.int8)


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


# --------------------------------------------------------------------------------------------------
# Seed statistics: accumulated chunk by chunk, then used to score chunk by chunk.


@dataclass
class _Variant:
    """Seed statistics of one seed variant (the whole seed or one fold)."""

    k: int
    d: int
    counts: np.ndarray = field(init=False)
    sums: np.ndarray = field(init=False)
    lift: np.ndarray = field(init=False)
    centroids: np.ndarray = field(init=False)
    spread_sum: np.ndarray = field(init=False)
    spread_n: np.ndarray = field(init=False)
    direction: np.ndarray = field(init=False)  # w: the seed direction in the within-cluster metric
    t_center: np.ndarray = field(init=False)  # w · (cluster mean), per cluster
    t_scale: float = field(init=False)  # within-cluster standard deviation of w · x

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.k, np.int64)
        self.sums = np.zeros((self.k, self.d), np.float64)
        self.spread_sum = np.zeros(self.k, np.float64)
        self.spread_n = np.zeros(self.k, np.int64)
        self.direction = np.zeros(self.d, np.float64)
        self.t_center = np.zeros(self.k, np.float64)
        self.t_scale = 1.0

    def add(self, x: np.ndarray, labels: np.ndarray) -> None:
        if len(labels) == 0:
            return
        self.counts += np.bincount(labels, minlength=self.k)
        for j in range(self.d):  # one bincount per column: faster than np.add.at or a one-hot matmul
            self.sums[:, j] += np.bincount(labels, weights=x[:, j], minlength=self.k)

    def finalize(self, sizes: np.ndarray, params: ScoringParams, within: _Within) -> None:
        total = int(self.counts.sum())
        population = int(sizes.sum())
        r0 = total / population if population else 0.0
        if total == 0:
            self.lift = np.ones(self.k)
            self.centroids = np.zeros((self.k, self.d), np.float32)
            return
        rate = (self.counts + params.prior * r0) / (sizes + params.prior)
        self.lift = rate / r0
        seed_sum = self.sums.sum(axis=0)
        overall = seed_sum / total
        cent = np.where(
            self.counts[:, None] > 0, self.sums / np.maximum(self.counts, 1)[:, None], overall[None, :]
        )
        self.centroids = cent.astype(np.float32)
        rest = population - total
        if rest > 0:
            rest_mean = (within.total_sum - seed_sum) / rest
            self.direction = within.solve(overall - rest_mean)
            self.t_center = within.cluster_means @ self.direction
            sd = math.sqrt(max(float(self.direction @ within.cov @ self.direction), 0.0))
            self.t_scale = sd if sd > 1e-12 else 1.0

    def distances(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        diff = x - self.centroids[labels]
        return np.einsum("ij,ij->i", diff, diff)

    def add_spread(self, d2: np.ndarray, labels: np.ndarray) -> None:
        self.spread_sum += np.bincount(labels, weights=d2, minlength=self.k)
        self.spread_n += np.bincount(labels, minlength=self.k)

    def parts(self, d2: np.ndarray, t: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
        """``(log lift, t, relative d2)`` per user: the score is ``a + gamma·t - beta·d2``."""
        spread = self.spread_sum / np.maximum(self.spread_n, 1)
        spread = np.where(spread > 1e-9, spread, 1.0)
        a = np.log(self.lift)[labels]
        tt = (t.astype(np.float64) - self.t_center[labels]) / self.t_scale
        return a, tt, d2 / spread[labels]

    def score(
        self, d2: np.ndarray, t: np.ndarray, labels: np.ndarray, gamma: float, beta: float
    ) -> np.ndarray:
        a, tt, rel = self.parts(d2, t, labels)
        return (a + gamma * tt - beta * rel).astype(np.float64)


@dataclass
class _Within:
    """Population sums per cluster and the scatter matrix: the pooled within-cluster covariance."""

    k: int
    d: int
    ridge: float
    cluster_sums: np.ndarray = field(init=False)
    scatter: np.ndarray = field(init=False)
    cluster_means: np.ndarray = field(init=False)
    total_sum: np.ndarray = field(init=False)
    cov: np.ndarray = field(init=False)
    _inverse: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.cluster_sums = np.zeros((self.k, self.d), np.float64)
        self.scatter = np.zeros((self.d, self.d), np.float64)

    def add(self, x: np.ndarray, labels: np.ndarray) -> None:
        if len(labels) == 0:
            return
        onehot = sparse.csr_matrix(
            (np.ones(len(labels), np.float32), (labels, np.arange(len(labels)))), shape=(self.k, len(labels))
        )
        self.cluster_sums += np.asarray(onehot @ x, dtype=np.float64)
        self.scatter += (x.T @ x).astype(np.float64)  # one sgemm per chunk

    def finalize(self, sizes: np.ndarray, dims: np.ndarray) -> None:
        n = max(int(sizes.sum()), 1)
        self.total_sum = self.cluster_sums.sum(axis=0)
        self.cluster_means = self.cluster_sums / np.maximum(sizes, 1)[:, None]
        between = (self.cluster_means * sizes[:, None]).T @ self.cluster_means
        cov = (self.scatter - between) / n
        cov = (cov + cov.T) / 2
        keep = np.outer(dims, dims)
        self.cov = np.where(keep, cov, 0.0)
        used = max(int(dims.sum()), 1)
        mean_var = float(np.trace(self.cov)) / used
        lam = self.ridge * mean_var if mean_var > 1e-12 else 1.0
        self._inverse = np.linalg.pinv(self.cov + lam * np.diag(dims.astype(np.float64)) + np.diag(~dims))
        self._inverse[~dims, :] = 0.0
        self._inverse[:, ~dims] = 0.0

    def solve(self, v: np.ndarray) -> np.ndarray:
        return self._inverse @ v


class SeedStats:
    """The seed (and its two halves) against a model's clusters."""

    def __init__(self, k: int, d: int, params: ScoringParams) -> None:
        self.k, self.d, self.params = k, d, params
        self.sizes = np.zeros(k, np.int64)
        self.within = _Within(k, d, params.ridge)
        self.variants = {"all": _Variant(k, d), "fold0": _Variant(k, d), "fold1": _Variant(k, d)}
        self.gamma = params.gammas[0]
        self.beta = params.betas[0]

    def add_chunk(self, x: np.ndarray, labels: np.ndarray, seed_mask: np.ndarray, folds: np.ndarray) -> None:
        self.sizes += np.bincount(labels, minlength=self.k)
        self.within.add(x, labels)
        xs, ls, fs = x[seed_mask], labels[seed_mask], folds[seed_mask]
        self.variants["all"].add(xs, ls)
        for f in (0, 1):
            self.variants[f"fold{f}"].add(xs[fs == f], ls[fs == f])

    def finalize(self, dims: np.ndarray) -> None:
        self.within.finalize(self.sizes, dims)
        for v in self.variants.values():
            v.finalize(self.sizes, self.params, self.within)

    def distances(self, x: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        return {name: v.distances(x, labels) for name, v in self.variants.items()}

    def projections(self, x: np.ndarray) -> dict[str, np.ndarray]:
        w = np.stack([v.direction for v in self.variants.values()], axis=1).astype(np.float32)
        t = x @ w
        return {name: t[:, i] for i, name in enumerate(self.variants)}

    def add_spread(self, d2: dict[str, np.ndarray], labels: np.ndarray) -> None:
        for name, v in self.variants.items():
            v.add_spread(d2[name], labels)

    def choose_weights(
        self,
        ids: np.ndarray,
        seed_mask: np.ndarray,
        d2: dict[str, np.ndarray],
        t: dict[str, np.ndarray],
        labels: np.ndarray,
    ) -> dict[tuple[float, float], float]:
        """Pick ``(gamma, beta)``: the grid point whose fold scores best find the other fold.

        On a deterministic sample (by a hash of the user id) of at most ``select_sample`` users,
        half of them seed members when the seed is large; returns the mean held-out AUC per point.
        """
        p = self.params
        if len(p.gammas) * len(p.betas) == 1:
            self.gamma, self.beta = p.gammas[0], p.betas[0]
            return {}
        h = _sample_hash(ids)
        n_seed = int(seed_mask.sum())
        n_rest = len(ids) - n_seed
        seed_rate = min(1.0, (p.select_sample / 2) / max(n_seed, 1))
        rest_rate = min(1.0, (p.select_sample - min(n_seed, p.select_sample / 2)) / max(n_rest, 1))
        take = np.where(seed_mask, h < seed_rate, h < rest_rate)
        idx = np.flatnonzero(take)
        folds = fold_of(ids[idx])
        seed = seed_mask[idx]
        aucs: dict[tuple[float, float], list[float]] = {}
        for f in (0, 1):
            name = f"fold{f}"
            keep = ~(seed & (folds == f))
            positive = (seed & (folds != f))[keep]
            if not 0 < int(positive.sum()) < len(positive):
                continue
            a, tt, rel = self.variants[name].parts(d2[name][idx], t[name][idx], labels[idx])
            a, tt, rel = a[keep], tt[keep], rel[keep]
            for gamma in p.gammas:
                for beta in p.betas:
                    aucs.setdefault((gamma, beta), []).append(_auc(positive, a + gamma * tt - beta * rel))
        if not aucs:
            return {}
        mean = {gb: float(np.mean(v)) for gb, v in aucs.items()}
        self.gamma, self.beta = max(mean, key=lambda gb: mean[gb])  # first of equals: grid order
        return mean

    def scores(
        self, d2: dict[str, np.ndarray], t: dict[str, np.ndarray], labels: np.ndarray
    ) -> dict[str, np.ndarray]:
        return {
            name: v.score(d2[name], t[name], labels, self.gamma, self.beta)
            for name, v in self.variants.items()
        }

    @property
    def lift(self) -> np.ndarray:
        return self.variants["all"].lift

    @property
    def seed_counts(self) -> np.ndarray:
        return self.variants["all"].counts


_SAMPLE_HASH = 0x9E3779B1


def _sample_hash(user_ids: np.ndarray) -> np.ndarray:
    """A uniform value in [0, 1) per user id, independent of the fold hash."""
    u = user_ids.astype(np.uint64)
    return ((u * np.uint64(_SAMPLE_HASH) + np.uint64(0x7F4A7C15)) & np.uint64(0xFFFFFFFF)).astype(
        np.float64
    ) / 2.0**32


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half."""
    ranks = _average_ranks(score)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    new = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(values))
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(len(values), np.float64)
    ranks[order] = avg[group]
    return ranks


@dataclass
class _Moments:
    n: int = 0
    s: np.ndarray | None = None
    q: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        s = x.sum(axis=0, dtype=np.float64)
        q = np.einsum("ij,ij->j", x, x).astype(np.float64)  # no n x d temporary
        self.s = s if self.s is None else self.s + s
        self.q = q if self.q is None else self.q + q
        self.n += len(x)

    def var(self, d: int) -> np.ndarray:
        if self.n == 0 or self.s is None or self.q is None:
            return np.zeros(d)
        mean = self.s / self.n
        return np.maximum(self.q / self.n - mean**2, 0.0)


def candidate_dims(pop: _Moments, cand: _Moments, d: int, min_ratio: float) -> np.ndarray:
    """Columns that can rank the candidates: their variance among non-seed users is at least
    ``min_ratio`` of the population's. The others (e.g. ``ev_pay`` when the seed is "paid before")
    are constant among the candidates, describe how the seed was picked rather than who resembles
    it, and would only split the seed off into clusters no candidate can share."""
    pv, cv = pop.var(d), cand.var(d)
    return (pv > 1e-12) & (cv >= min_ratio * pv)


ChunkSource = Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]


@dataclass
class Ranking:
    """Scores of every user of the population for one seed (and its two halves)."""

    ids: np.ndarray
    labels: np.ndarray
    seed_mask: np.ndarray
    scores: dict[str, np.ndarray]
    d2: dict[str, np.ndarray]
    stats: SeedStats
    dims: np.ndarray  # bool per column: used for cells and distances
    #: held-out seed AUC per (gamma, beta) of the grid
    selection: dict[tuple[float, float], float] = field(default_factory=dict)

    @property
    def weights(self) -> tuple[float, float]:
        """The chosen ``(gamma, beta)``."""
        return self.stats.gamma, self.stats.beta

    @property
    def seed_matched(self) -> int:
        return int(self.seed_mask.sum())


def rank_population(
    centers: np.ndarray,
    chunks: ChunkSource,
    seed_ids: np.ndarray,
    params: ScoringParams,
    *,
    min_seed: int = 0,
    on_small_seed: Callable[[int], None] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> Ranking:
    """Three passes over standardised chunks: candidate dims, cells + seed and cluster sums,
    distances + projections on the seed direction; then the refinement weights are chosen.

    ``chunks()`` must yield the same ``(ids, x)`` sequence each time it is called; the ``x`` arrays
    are modified in place (masked columns zeroed), so they must not be the caller's.
    """
    k, d = centers.shape
    pop, cand = _Moments(), _Moments()
    ids_parts, seed_parts = [], []
    for ids, x in chunks():
        seed_mask = _isin(ids, seed_ids)
        pop.add(x)
        cand.add(x[~seed_mask])
        ids_parts.append(ids)
        seed_parts.append(seed_mask)
    all_ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.uint32)
    all_seed = np.concatenate(seed_parts) if seed_parts else np.zeros(0, bool)
    matched = int(all_seed.sum())
    if matched < min_seed and on_small_seed is not None:
        on_small_seed(matched)
    if progress is not None:
        progress("cells", 0.3)
    dims = candidate_dims(pop, cand, d, params.min_dim_variance)
    if not dims.any():
        dims = np.ones(d, bool)
    mask = dims.astype(np.float32)
    c = centers.astype(np.float32) * mask

    stats = SeedStats(k, d, params)
    label_parts = []
    for (ids, x), seed_mask in zip(chunks(), seed_parts, strict=True):
        xm = np.multiply(x, mask, out=x)  # in place: chunks are fresh or the cache, unmasked no longer needed
        labels, _ = assign(c, xm)
        stats.add_chunk(xm, labels, seed_mask, fold_of(ids))
        label_parts.append(labels)
    stats.finalize(dims)
    if progress is not None:
        progress("score", 0.6)
    d2_parts: dict[str, list[np.ndarray]] = {name: [] for name in stats.variants}
    t_parts: dict[str, list[np.ndarray]] = {name: [] for name in stats.variants}
    for (_ids, x), labels in zip(chunks(), label_parts, strict=True):
        xm = np.multiply(x, mask, out=x)  # idempotent on the cache
        d2 = stats.distances(xm, labels)
        stats.add_spread(d2, labels)
        for name, values in d2.items():
            d2_parts[name].append(values.astype(np.float32))
        for name, values in stats.projections(xm).items():
            t_parts[name].append(values)
    labels = np.concatenate(label_parts) if label_parts else np.zeros(0, np.int32)
    d2_all = {n: np.concatenate(p) if p else np.zeros(0, np.float32) for n, p in d2_parts.items()}
    t_all = {n: np.concatenate(p) if p else np.zeros(0, np.float32) for n, p in t_parts.items()}
    selection = stats.choose_weights(all_ids, all_seed, d2_all, t_all, labels)
    scores = stats.scores(d2_all, t_all, labels)
    return Ranking(all_ids, labels, all_seed, scores, d2_all, stats, dims, selection)


def score_in_memory(
    centers: np.ndarray,
    ids: np.ndarray,
    x: np.ndarray,
    seed_ids: np.ndarray,
    params: ScoringParams | None = None,
) -> Ranking:
    """``rank_population`` over arrays already in memory (the eval, small populations)."""
    own = np.array(x, dtype=np.float32, order="C")  # rank_population masks its chunks in place
    params = params or ScoringParams()
    return rank_population(centers, lambda: iter([(ids, own)]), np.unique(seed_ids), params)


# --------------------------------------------------------------------------------------------------
# The chunked expansion


@dataclass
class ExpandResult:
    members: np.ndarray  # uint32, sorted ascending
    population: int
    seed_size: int
    seed_matched: int
    eligible: int
    clusters_covered: int
    seed_concentration: float
    lift_curve: list[tuple[float, int, float]]  # (reach fraction, users, expected lift)
    cluster_count: int
    timings: dict[str, float]
    requested: int
    refinement: dict[str, float] = field(default_factory=dict)  # chosen gamma/beta, held-out AUC

    def stats(self) -> dict[str, Any]:
        return {
            "population": self.population,
            "seed_size": self.seed_size,
            "seed_matched": self.seed_matched,
            "eligible": self.eligible,
            "clusters_covered": self.clusters_covered,
            "seed_concentration": round(self.seed_concentration, 6),
            "lift_curve": [
                {"reach_fraction": f, "size": n, "expected_lift": round(lift, 4)}
                for f, n, lift in self.lift_curve
            ],
            "refinement": {k: round(v, 4) for k, v in self.refinement.items()},
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
        arr = np.asarray(values.to_array(), dtype=np.uint32)  # type: ignore[attr-defined]
    else:
        arr = np.fromiter(values, dtype=np.uint32)
    return np.unique(arr)


def _lift_at(
    score: np.ndarray, d2: np.ndarray, ids: np.ndarray, hidden: np.ndarray, shown: np.ndarray, m: int
) -> float:
    """Lift of ``hidden`` members in the top ``m`` of the users not in ``shown``."""
    keep = ~shown
    n_keep = int(keep.sum())
    n_hidden = int(hidden[keep].sum())
    if n_hidden == 0 or m <= 0 or n_keep == 0:
        return float("nan")
    s, dd, h, u = score[keep], d2[keep], hidden[keep], ids[keep]
    m = min(m, n_keep)
    top = _top(s, dd, u, m)
    precision = float(h[top].sum()) / m
    return precision / (n_hidden / n_keep)


def _top(score: np.ndarray, d2: np.ndarray, ids: np.ndarray, m: int) -> np.ndarray:
    """Indices of the ``m`` best rows: score desc, then d2 asc, then id asc (exact, total order)."""
    if m >= len(score):
        order = np.lexsort((ids, d2, -score))
        return order[:m]
    # Pre-select with a partition on the score, keeping every row tied with the m-th score.
    kth = np.partition(-score, m - 1)[m - 1]
    cand = np.flatnonzero(-score <= kth)
    order = np.lexsort((ids[cand], d2[cand], -score[cand]))
    return cand[order[:m]]


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
    params: ScoringParams | None = None,
    lift_steps: Sequence[float] = LIFT_STEPS,
    cache_bytes: int = 1 << 30,
    seed_field: str = "seed_pack",
    progress: Callable[[str, float], None] | None = None,
) -> ExpandResult:
    """Expand ``seed`` over the model's population; see the module doc.

    ``exclude`` (user ids) are never selected; ``allowed`` (user ids passing the profile
    constraints), when given, is the only users that may be selected. Raises ``ExpandError`` for
    a seed below ``min_seed`` or a reach out of range, ``NotEnoughCandidates`` when the eligible
    users are fewer than the reach.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    params = params or ScoringParams()
    population = snapshot.population
    requested = resolve_reach(population, fraction=reach_fraction, size=reach_size)
    seed_ids = _as_sorted(seed)
    assert seed_ids is not None
    exclude_ids = _as_sorted(exclude)
    allowed_ids = _as_sorted(allowed)
    k, d = model.cluster_count, model.centers.shape[1]

    cache_ok = population * d * 4 <= cache_bytes
    cache: list[tuple[np.ndarray, np.ndarray]] = []

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if cache:
            yield from cache
            return
        for ids, raw in snapshot.iter_shards():
            x = model.transform(raw)
            if cache_ok:
                cache.append((ids, x))
            yield ids, x

    def too_small(matched: int) -> None:
        raise ExpandError(
            seed_field,
            f"seed has {len(seed_ids):,} members, {matched:,} of them in the model's population of "
            f"{population:,} users; the minimum is {min_seed:,}",
        )

    ranking = rank_population(
        model.centers, chunks, seed_ids, params, min_seed=min_seed, on_small_seed=too_small, progress=progress
    )
    cache.clear()
    stats, ids, scores, d2_all = ranking.stats, ranking.ids, ranking.scores, ranking.d2
    seed_matched = ranking.seed_matched
    timings["score_seconds"] = time.perf_counter() - started

    # Selection.
    if progress is not None:
        progress("select", 0.85)
    t3 = time.perf_counter()
    seed_mask = ranking.seed_mask
    eligible = np.ones(len(ids), bool)
    if not include_seed:
        eligible &= ~seed_mask
    if exclude_ids is not None:
        eligible &= ~_isin(ids, exclude_ids)
    if allowed_ids is not None:
        eligible &= _isin(ids, allowed_ids)
    n_eligible = int(eligible.sum())
    if n_eligible < requested:
        raise NotEnoughCandidates(requested, n_eligible)
    idx = np.flatnonzero(eligible)
    top = idx[_top(scores["all"][idx], d2_all["all"][idx], ids[idx], requested)]
    members = np.sort(ids[top])
    timings["select_seconds"] = time.perf_counter() - t3

    # Reporting: coverage, concentration, expected lift from the held-out halves.
    t4 = time.perf_counter()
    counts = stats.seed_counts
    covered = int((counts > 0).sum())
    top_clusters = np.argsort(-stats.lift, kind="stable")[: max(1, math.ceil(0.1 * k))]
    concentration = float(counts[top_clusters].sum()) / seed_matched
    folds = fold_of(ids)
    steps = sorted({*lift_steps, requested / population})
    curve: list[tuple[float, int, float]] = []
    for f in steps:
        m = max(1, round(f * population))
        values = []
        for shown_fold in (0, 1):
            shown = seed_mask & (folds == shown_fold)
            hidden = seed_mask & (folds != shown_fold)
            name = f"fold{shown_fold}"
            values.append(_lift_at(scores[name], d2_all[name], ids, hidden, shown, m))
        finite = [v for v in values if not math.isnan(v)]
        curve.append((round(f, 6), m, float(np.mean(finite)) if finite else float("nan")))
    gamma, beta = ranking.weights
    refinement = {"gamma": gamma, "beta": beta}
    if ranking.selection:
        refinement["heldout_seed_auc"] = ranking.selection[(gamma, beta)]
    timings["report_seconds"] = time.perf_counter() - t4
    timings["total_seconds"] = time.perf_counter() - started
    return ExpandResult(
        members=members.astype(np.uint32),
        population=population,
        seed_size=len(seed_ids),
        seed_matched=seed_matched,
        eligible=n_eligible,
        clusters_covered=covered,
        seed_concentration=concentration,
        lift_curve=curve,
        cluster_count=k,
        timings=timings,
        requested=requested,
        refinement=refinement,
    )
