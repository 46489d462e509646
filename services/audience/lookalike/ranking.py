"""Rank a population by likeness to a seed: cluster density blended with a classifier learnt from the seed.

Three components are computed for every user ``u`` from a seed ``S`` (and, the same way, from each
half of the seed, for the held-out choices):

============  =====================================================================================
cluster       ``mean over fits f of log( Σ_c p_f(c|u) · rate_fc / r0 )``: the seed's
              over-representation around ``u``, from the model's clusterings. ``p_f(c|u)`` is a soft
              membership, ``exp(−(d²_uc − min_c d²_uc) / τ_f)`` normalised over the clusters
              (``τ_f`` = ``softness`` × the fit's median squared distance to the nearest centre), and
              ``rate_fc = (Σ_{v∈S} p_f(c|v) + prior·r0) / (Σ_v p_f(c|v) + prior)`` the cluster's seed
              rate shrunk to the base rate ``r0 = |S| / n``. Soft memberships and the average over
              the ensemble's fits make the term a smooth density ratio instead of a step function
              of one fit's arbitrary boundaries (the evaluation's AUC range across fit seeds fell
              from 0.11 to under 0.01 on MovieLens).
classifier    positive-unlabelled learning: scikit-learn ``LogisticRegression`` (L2, ``C = pu_c``,
              balanced classes) of seed members (label 1) against a uniform sample of the population
              (label 0; it contains unknown positives, which only scales the odds), on the
              standardised features plus the user's cluster term (as at scoring time: a training
              member's own membership included), log distance to the nearest centres and log
              activity. The logit is the score. (A leave-one-out cluster term made the classifier
              discount it and overfit the raw columns: MovieLens mean AUC 0.848 instead of 0.857.)
activity      ``log1p(events)``: the "most active users" baseline, as a component, so that a seed
              that is mostly "the active users" is ranked as such.
============  =====================================================================================

Each component is z-scored over the population; the score is their weighted sum with the weights
``blend.choose_blend`` picks on held-out halves of the seed. Ties: the mean distance to the nearest
centres, then the user id — a total order, so a reach is honoured exactly.

Columns on which the non-seed users have < ``min_dim_variance`` of the population's variance are
masked for this ranking (``candidate_dims``): when the seed is "paid before", ``ev_pay`` and friends
describe how the seed was picked, not who resembles it. The feature exclusion (``exclusion.py``)
is the principled guard; this one catches seeds whose definition is not known.

Passes over standardised chunks (``ChunkSource``; pass-through of ``expand``'s cache): (1) ids,
seed, moments, activity; (2) soft memberships per fit: seed and population soft counts, nearest
distances, the first fit's hard labels, the classifier's training rows; (3) the cluster and
classifier components of every user. Memory per user is a few dozen bytes besides the cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression

from services.audience.lookalike.blend import BlendChoice, choose_blend, simplex_grid

__all__ = [
    "COMPONENTS",
    "ChunkSource",
    "Ranking",
    "RankingParams",
    "candidate_dims",
    "fold_of",
    "rank_in_memory",
    "rank_population",
]

COMPONENTS: tuple[str, ...] = ("cluster", "classifier", "activity")
VARIANTS: tuple[str, ...] = ("all", "fold0", "fold1")
_FOLD_HASH = 0x85EBCA6B
_SAMPLE_HASH = 0x9E3779B1
_BLOCK = 32_768  # rows per soft-membership block (block x k floats per fit in memory)

#: ``() -> iterator of (user ids, standardised features, events per user)``, the same every call.
ChunkSource = Callable[[], Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]]


@dataclass(frozen=True)
class RankingParams:
    """Tuning of the ranking (see the module doc); the defaults are what the evaluation chose."""

    prior: float = 2.0  # pseudo-members at the base rate added to every (soft) cluster
    softness: float = 2.0  # soft-membership temperature, x the fit's median nearest squared distance
    pu_c: float = 0.03  # inverse L2 strength of the positive-unlabelled classifier
    pu_seed_sample: int = 20_000  # seed members (at most) the classifier trains on
    pu_population_sample: int = 50_000  # population sample (at most) it trains against
    blend_steps: int = 4  # the blend grid's step is 1/blend_steps
    default_blend: tuple[float, float, float] = (0.25, 0.25, 0.5)  # cluster, classifier, activity
    select_z: float = 2.0  # standard errors of the rule towards the default (blend.py)
    select_sample: int = 200_000  # users (at most) on which the blend is chosen
    min_dim_variance: float = 0.05
    fixed_blend: tuple[float, float, float] | None = None  # skip the choice (tests, ablations)

    def __post_init__(self) -> None:
        if len(self.default_blend) != len(COMPONENTS) or abs(sum(self.default_blend) - 1) > 1e-9:
            raise ValueError("default_blend needs one weight per component, summing to 1")
        if self.default_blend not in simplex_grid(len(COMPONENTS), self.blend_steps):
            raise ValueError("default_blend must be a point of the blend grid")


def fold_of(user_ids: np.ndarray) -> np.ndarray:
    """0/1 per user, from a hash independent of the shard bucket."""
    u = user_ids.astype(np.uint64)
    return (((u * np.uint64(_FOLD_HASH)) & np.uint64(0xFFFFFFFF)) >> np.uint64(31)).astype(np.int8)


def sample_hash(user_ids: np.ndarray) -> np.ndarray:
    """A uniform value in [0, 1) per user id, independent of the fold hash."""
    u = user_ids.astype(np.uint64)
    return ((u * np.uint64(_SAMPLE_HASH) + np.uint64(0x7F4A7C15)) & np.uint64(0xFFFFFFFF)).astype(
        np.float64
    ) / 2.0**32


def _isin(ids: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    if len(sorted_values) == 0:
        return np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_values, ids), len(sorted_values) - 1)
    return sorted_values[pos] == ids


@dataclass
class _Moments:
    n: int = 0
    s: np.ndarray | None = None
    q: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        if len(x) == 0:
            return
        s = x.sum(axis=0, dtype=np.float64)
        q = np.einsum("ij,ij->j", x, x).astype(np.float64)
        self.s = s if self.s is None else self.s + s
        self.q = q if self.q is None else self.q + q
        self.n += len(x)

    def var(self, d: int) -> np.ndarray:
        if self.n == 0 or self.s is None or self.q is None:
            return np.zeros(d)
        mean = self.s / self.n
        return np.maximum(self.q / self.n - mean**2, 0.0)


def candidate_dims(pop: _Moments, cand: _Moments, d: int, min_ratio: float) -> np.ndarray:
    """Columns whose variance among non-seed users is at least ``min_ratio`` of the population's."""
    pv, cv = pop.var(d), cand.var(d)
    return (pv > 1e-12) & (cv >= min_ratio * pv)


class _Fits:
    """The ensemble's (masked) centres and soft-membership temperatures."""

    def __init__(
        self, ensemble: np.ndarray, mask: np.ndarray, median_d2: list[float] | None, softness: float
    ):
        self.centers = [np.ascontiguousarray(c.astype(np.float32) * mask) for c in ensemble]
        self.c_sq = [np.einsum("ij,ij->i", c, c) for c in self.centers]
        self.k = ensemble.shape[1]
        self.softness = softness
        self.tau: list[float] | None = (
            [max(softness * m, 1e-6) for m in median_d2]
            if median_d2 and len(median_d2) == len(ensemble)
            else None
        )

    def memberships(self, f: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(p (n×k), nearest centre, squared distance to it)`` of fit ``f``."""
        c = self.centers[f]
        d2 = self.c_sq[f][None, :] - 2.0 * (x @ c.T)
        d2 += np.einsum("ij,ij->i", x, x)[:, None]
        np.maximum(d2, 0.0, out=d2)
        nearest = np.argmin(d2, axis=1)
        dmin = d2[np.arange(len(x)), nearest]
        if self.tau is None:  # a model from before the ensemble: scale from the first chunk
            self.tau = [max(self.softness * float(np.median(dmin)), 1e-6)] * len(self.centers)
        z = (dmin[:, None] - d2) / np.float32(self.tau[f])
        p = np.exp(z, out=z)
        p /= p.sum(axis=1, keepdims=True)
        return p, nearest.astype(np.int32), dmin


@dataclass
class Ranking:
    """Scores of every user for a seed (``scores["all"]``) and for each half (``"fold0"``/``"fold1"``)."""

    ids: np.ndarray
    seed_mask: np.ndarray
    folds: np.ndarray
    scores: dict[str, np.ndarray]
    tie: np.ndarray  # mean squared distance to the nearest centres (ascending breaks score ties)
    labels: np.ndarray  # nearest centre in the model's first fit
    cluster_lift: np.ndarray  # the first fit's (soft) seed over-representation per cluster
    seed_counts: np.ndarray  # seed members per cluster of the first fit (hard)
    dims: np.ndarray  # bool per column: used by this ranking
    blend: BlendChoice
    component_auc: dict[str, float] = field(default_factory=dict)  # held-out AUC of each alone
    negative_mask: np.ndarray | None = None  # known non-members (negative seeds) in the population

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(COMPONENTS, self.blend.weights, strict=True))

    @property
    def heldout_auc(self) -> float:
        return self.blend.heldout_auc

    @property
    def seed_matched(self) -> int:
        return int(self.seed_mask.sum())


def rank_population(
    ensemble: np.ndarray,
    chunks: ChunkSource,
    seed_ids: np.ndarray,
    params: RankingParams | None = None,
    *,
    median_d2: list[float] | None = None,
    min_seed: int = 0,
    on_small_seed: Callable[[int], None] | None = None,
    progress: Callable[[str, float], None] | None = None,
    seed_weights: np.ndarray | None = None,
    negative_ids: np.ndarray | None = None,
) -> Ranking:
    """Score every user of ``chunks()`` for ``seed_ids`` (sorted uint32); see the module doc.

    ``ensemble`` is ``fits × k × d``; ``chunks()`` must yield the same sequence each call, and its
    ``x`` arrays are masked in place (they must not be the caller's).

    ``seed_weights`` (aligned with the sorted unique ``seed_ids``, e.g. spend): how much each seed
    member counts in the cluster densities and the classifier; rescaled to mean 1 over the members
    found, so the base rate and the prior keep their meaning. ``negative_ids``: users to move away
    from, taught to the classifier as known non-members (half of its negative class's weight, the
    other half the population sample); seed members among them stay seed members.
    """
    params = params or RankingParams()
    if seed_weights is not None:
        order = np.argsort(np.asarray(seed_ids, np.uint32), kind="stable")
        raw_ids = np.asarray(seed_ids, np.uint32)[order]
        raw_w = np.asarray(seed_weights, np.float64)[order]
        seed_ids, first = np.unique(raw_ids, return_index=True)
        weight_of = raw_w[first]
    seed_ids = np.unique(np.asarray(seed_ids, np.uint32))
    negatives = np.unique(np.asarray(negative_ids, np.uint32)) if negative_ids is not None else None
    ensemble = ensemble if ensemble.ndim == 3 else ensemble[None, :, :]
    n_fits, k, d = ensemble.shape

    # Pass 1: ids, seed, moments (for the candidate columns), activity.
    pop, cand = _Moments(), _Moments()
    ids_parts, seed_parts, act_parts, weight_parts, neg_parts = [], [], [], [], []
    for ids, x, act in chunks():
        mask = _isin(ids, seed_ids)
        pop.add(x)
        cand.add(x[~mask])
        ids_parts.append(ids)
        seed_parts.append(mask)
        act_parts.append(np.log1p(np.asarray(act, np.float64)).astype(np.float32))
        w = np.ones(len(ids), np.float64)
        if seed_weights is not None and mask.any():
            w[mask] = weight_of[np.searchsorted(seed_ids, ids[mask])]
        weight_parts.append(w)
        neg_parts.append(_isin(ids, negatives) & ~mask if negatives is not None else np.zeros(len(ids), bool))
    ids_all = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.uint32)
    seed_all = np.concatenate(seed_parts) if seed_parts else np.zeros(0, bool)
    act_all = np.concatenate(act_parts) if act_parts else np.zeros(0, np.float32)
    weight_all = np.concatenate(weight_parts) if weight_parts else np.zeros(0, np.float64)
    neg_all = np.concatenate(neg_parts) if neg_parts else np.zeros(0, bool)
    n = len(ids_all)
    matched = int(seed_all.sum())
    if seed_weights is not None and matched:
        mean_w = float(weight_all[seed_all].mean())
        weight_all[seed_all] /= mean_w if mean_w > 0 else 1.0
    weight_all[~seed_all] = 1.0
    if matched < min_seed and on_small_seed is not None:
        on_small_seed(matched)
    if progress is not None:
        progress("cells", 0.2)
    dims = candidate_dims(pop, cand, d, params.min_dim_variance)
    if not dims.any():
        dims = np.ones(d, bool)
    mask_f = dims.astype(np.float32)
    fits = _Fits(ensemble, mask_f, median_d2, params.softness)
    folds_all = fold_of(ids_all)
    variants = {
        "all": seed_all,
        "fold0": seed_all & (folds_all == 0),
        "fold1": seed_all & (folds_all == 1),
    }
    # Weighted seed counts (= member counts when unweighted): the base rates of the densities.
    counts = {v: float(weight_all[m].sum()) for v, m in variants.items()}
    h = sample_hash(ids_all)
    pop_sample = h < min(1.0, params.pu_population_sample / max(n, 1))
    seed_sample = seed_all & (h < min(1.0, params.pu_seed_sample / max(matched, 1)))
    n_neg = int(neg_all.sum())
    neg_sample = neg_all & (h < min(1.0, params.pu_seed_sample / max(n_neg, 1)))
    pool = pop_sample | seed_sample | neg_sample

    # Pass 2: soft counts per fit and variant, nearest distances, first-fit labels, training rows.
    sizes = [np.zeros(k, np.float64) for _ in range(n_fits)]
    seed_soft = {v: [np.zeros(k, np.float64) for _ in range(n_fits)] for v in VARIANTS}
    tie_parts, label_parts, pool_x = [], [], []
    offset = 0
    for (_ids, x, _act), _mask in zip(chunks(), seed_parts, strict=True):
        xm = np.multiply(x, mask_f, out=x)
        for lo in range(0, len(xm), _BLOCK):
            xb = xm[lo : lo + _BLOCK]
            rows = slice(offset + lo, offset + lo + len(xb))
            dsum = np.zeros(len(xb), np.float64)
            for f in range(n_fits):
                p, nearest, dmin = fits.memberships(f, xb)
                sizes[f] += p.sum(axis=0, dtype=np.float64)
                wb = weight_all[rows]
                for v in VARIANTS:
                    sel = variants[v][rows]
                    if sel.any():
                        seed_soft[v][f] += wb[sel] @ p[sel].astype(np.float64)
                dsum += dmin
                if f == 0:
                    label_parts.append(nearest)
            tie_parts.append((dsum / n_fits).astype(np.float32))
            in_pool = pool[rows]
            if in_pool.any():
                pool_x.append(xb[in_pool].copy())
        offset += len(xm)
    tie = np.concatenate(tie_parts) if tie_parts else np.zeros(0, np.float32)
    labels = np.concatenate(label_parts) if label_parts else np.zeros(0, np.int32)
    r0 = {v: max(counts[v], 1) / max(n, 1) for v in VARIANTS}
    rates = {
        v: [(seed_soft[v][f] + params.prior * r0[v]) / (sizes[f] + params.prior) for f in range(n_fits)]
        for v in VARIANTS
    }
    if progress is not None:
        progress("classifier", 0.45)

    # The classifier of each variant, on the pool's rows.
    pool_idx = np.flatnonzero(pool)
    xp = np.concatenate(pool_x) if pool_x else np.zeros((0, d), np.float32)
    p_pool = (
        [
            np.concatenate([fits.memberships(f, xp[lo : lo + _BLOCK])[0] for lo in range(0, len(xp), _BLOCK)])
            for f in range(n_fits)
        ]
        if len(xp)
        else []
    )
    log_tie = np.log1p(tie.astype(np.float64))
    extras_mean = np.array([0.0, log_tie.mean() if n else 0.0, act_all.mean() if n else 0.0])
    extras_sd = np.array([1.0, log_tie.std() if n else 1.0, act_all.std() if n else 1.0])
    extras_sd = np.where(extras_sd > 1e-9, extras_sd, 1.0)
    models: dict[str, tuple[np.ndarray, float, float, float] | None] = {}
    for v in VARIANTS:
        models[v] = None
        if not len(xp):
            continue
        y = variants[v][pool_idx]
        labelled = y & seed_sample[pool_idx]
        known_negative = ~y & neg_sample[pool_idx]
        unlabelled = ~y & pop_sample[pool_idx] & ~known_negative
        train = labelled | unlabelled | known_negative
        if labelled.sum() < 2 or unlabelled.sum() < 2:
            continue
        sample_weight = np.where(labelled, weight_all[pool_idx], 1.0)
        if known_negative.any():  # the known negatives weigh as much as the population sample
            sample_weight[known_negative] = unlabelled.sum() / known_negative.sum()
        cl_train = np.zeros(len(xp), np.float64)
        for f in range(n_fits):
            cl_train += np.log(np.maximum(p_pool[f] @ rates[v][f], 1e-12) / r0[v])
        cl_train /= n_fits
        cl_mean = float(cl_train[unlabelled].mean())
        cl_sd = float(cl_train[unlabelled].std()) or 1.0
        features = np.hstack(
            [
                xp[:, dims],
                ((cl_train - cl_mean) / cl_sd)[:, None],
                ((log_tie[pool_idx] - extras_mean[1]) / extras_sd[1])[:, None],
                ((act_all[pool_idx] - extras_mean[2]) / extras_sd[2])[:, None],
            ]
        )
        lr = LogisticRegression(C=params.pu_c, class_weight="balanced", max_iter=500)
        lr.fit(features[train], labelled[train].astype(np.int8), sample_weight=sample_weight[train])
        coef = lr.coef_[0]
        models[v] = (coef, float(lr.intercept_[0]), cl_mean, cl_sd)
    if progress is not None:
        progress("score", 0.6)

    # Pass 3: the cluster and classifier components of every user.
    comp = {v: {c: np.zeros(n, np.float32) for c in COMPONENTS[:2]} for v in VARIANTS}
    offset = 0
    nd = int(dims.sum())
    for _ids, x, _act in chunks():
        xm = np.multiply(x, mask_f, out=x)  # idempotent on the cache
        for lo in range(0, len(xm), _BLOCK):
            xb = xm[lo : lo + _BLOCK]
            rows = slice(offset + lo, offset + lo + len(xb))
            cl = {v: np.zeros(len(xb), np.float64) for v in VARIANTS}
            for f in range(n_fits):
                p = fits.memberships(f, xb)[0]
                for v in VARIANTS:
                    cl[v] += np.log(np.maximum(p @ rates[v][f], 1e-12) / r0[v])
            xd = xb[:, dims]
            for v in VARIANTS:
                cv = cl[v] / n_fits
                comp[v]["cluster"][rows] = cv
                model = models[v]
                if model is not None:
                    coef, intercept, cl_mean, cl_sd = model
                    logit = xd @ coef[:nd].astype(np.float32) + intercept
                    logit += coef[nd] * (cv - cl_mean) / cl_sd
                    logit += coef[nd + 1] * (log_tie[rows] - extras_mean[1]) / extras_sd[1]
                    logit += coef[nd + 2] * (act_all[rows] - extras_mean[2]) / extras_sd[2]
                    comp[v]["classifier"][rows] = logit
        offset += len(xm)

    def z(values: np.ndarray) -> np.ndarray:
        sd = float(values.std()) if len(values) else 0.0
        return ((values - values.mean()) / sd).astype(np.float32) if sd > 1e-12 else np.zeros_like(values)

    act_z = z(act_all)
    zc = {v: [z(comp[v]["cluster"]), z(comp[v]["classifier"]), act_z] for v in VARIANTS}
    if progress is not None:
        progress("blend", 0.75)

    # The blend, chosen on held-out halves of a deterministic sample.
    n_rest = n - matched
    take = np.where(
        seed_all,
        h < min(1.0, (params.select_sample / 2) / max(matched, 1)),
        h < min(1.0, (params.select_sample - min(matched, params.select_sample // 2)) / max(n_rest, 1)),
    )
    idx = np.flatnonzero(take)
    fold_inputs = []
    for s in (0, 1):
        keep = idx[~variants[f"fold{s}"][idx]]
        positive = variants[f"fold{1 - s}"][keep]
        fold_inputs.append((positive, [c[keep] for c in zc[f"fold{s}"]]))
    grid = simplex_grid(len(COMPONENTS), params.blend_steps)
    choice = choose_blend(
        fold_inputs, grid, params.default_blend, z=params.select_z, fixed=params.fixed_blend
    )
    component_auc = {}
    for i, name in enumerate(COMPONENTS):
        vertex = tuple(1.0 if j == i else 0.0 for j in range(len(COMPONENTS)))
        component_auc[name] = choice.table.get(vertex, float("nan"))

    def blended(v: str) -> np.ndarray:
        out = np.zeros(n, np.float64)
        for w, c in zip(choice.weights, zc[v], strict=True):
            if w:
                out += w * c
        return out

    scores = {v: blended(v) for v in VARIANTS}
    seed_counts = np.bincount(labels[seed_all], minlength=k) if n else np.zeros(k, np.int64)
    cluster_lift = rates["all"][0] / r0["all"]
    if progress is not None:
        progress("ranked", 0.85)
    return Ranking(
        ids=ids_all,
        seed_mask=seed_all,
        folds=folds_all,
        scores=scores,
        tie=tie,
        labels=labels,
        cluster_lift=cluster_lift,
        seed_counts=seed_counts,
        dims=dims,
        blend=choice,
        component_auc={k_: v for k_, v in component_auc.items() if not math.isnan(v)},
        negative_mask=neg_all if negatives is not None else None,
    )


def rank_in_memory(
    ensemble: np.ndarray,
    ids: np.ndarray,
    x: np.ndarray,
    activity: np.ndarray,
    seed_ids: np.ndarray,
    params: RankingParams | None = None,
    *,
    median_d2: list[float] | None = None,
) -> Ranking:
    """``rank_population`` over arrays in memory (the evaluation, small populations)."""
    own = np.array(x, dtype=np.float32, order="C")  # masked in place
    return rank_population(
        ensemble, lambda: iter([(ids, own, activity)]), seed_ids, params, median_d2=median_d2
    )
