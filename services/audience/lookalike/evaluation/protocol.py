"""The seed-holdout protocol: split the positives, rank everybody outside the seed, score the ranking.

For one target (``targets.Target``):

1. the features are built without the events that define the target (``Target.exclusion``: the
   product's ``FeatureExclusion.from_seed_spec`` of the target's spec, passed to ``build_snapshot``);
2. the positives are split in two halves at random (``split_seed``): the **seed** (what a caller
   would upload) and the **hidden** half (the truth);
3. every user of the population outside the seed is ranked by each method, which sees only the
   features and the seed ids:

   ============  ====================================================================================
   random        a uniform draw (AUC 0.5, lift 1: the yardstick)
   activity      most events first (the "most active users" an advertiser gets without any model)
   logreg        scikit-learn ``LogisticRegression`` seed vs rest on the same standardised features
   flashcrowd    the product path: a model trained on the snapshot, the expansion's ranking
   ============  ====================================================================================

4. metrics over the ranked users (hidden = positive): AUC with a stratified bootstrap interval,
   the paired bootstrap interval of flashcrowd's AUC minus each baseline's and minus the better
   baseline's (the one with the higher AUC on this target), lift at 1/2/5/10% reach (reach as a
   share of the whole population, as ExpandLookalike counts it), and flashcrowd's AUC for each of
   ``fit_seeds`` (the model retrained with another random seed: stability).

Flashcrowd is "significantly below" a baseline when the whole 95% interval of the paired
difference is below zero. The primary flashcrowd figures are those of the first fit seed. Models
are trained once per (feature snapshot, fit seed) and shared by the targets of that snapshot.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sklearn.linear_model import LogisticRegression

from services.audience.lookalike.evaluation.metrics import (
    Interval,
    auc,
    bootstrap_aucs,
    lift_at,
    percentile_interval,
)
from services.audience.lookalike.evaluation.targets import Target, TargetSet
from services.audience.lookalike.exclusion import FeatureExclusion
from services.audience.lookalike.features import (
    FeatureSnapshot,
    FeatureSource,
    activity_from_raw,
    build_snapshot,
)
from services.storage import LocalObjectStore, ObjectStore

__all__ = [
    "BASELINES",
    "METHODS",
    "REACHES",
    "ProductRanker",
    "Ranker",
    "TargetResult",
    "evaluate_set",
    "evaluate_target",
]

REACHES: tuple[float, ...] = (0.01, 0.02, 0.05, 0.10)
BASELINES = ("activity", "logreg")
METHODS = ("random", "activity", "logreg", "flashcrowd")


class Ranker(Protocol):
    """What the protocol needs of flashcrowd: train a model, score the population for a seed."""

    def train(self, store: ObjectStore, snapshot: FeatureSnapshot, fit_seed: int) -> Any: ...

    def score(
        self, model: Any, snapshot: FeatureSnapshot, seed_ids: np.ndarray
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Scores aligned with ``snapshot.load_all()``'s ids (higher = more seed-like), and notes."""
        ...


class ProductRanker:
    """The product's defaults: ``train_model`` (cluster count by its rule, the fit ensemble), then
    the expansion's ranking (``ranking.rank_in_memory``)."""

    def __init__(self, clusters: int | None = None, params: Any = None) -> None:
        self.clusters = clusters
        self.params = params

    def train(self, store: ObjectStore, snapshot: FeatureSnapshot, fit_seed: int) -> Any:
        from services.audience.lookalike.model import train_model

        clusters = None if self.clusters is None else min(self.clusters, snapshot.population)
        return train_model(store, snapshot, model_id=f"eval-{fit_seed}", clusters=clusters, seed=fit_seed)

    def score(
        self, model: Any, snapshot: FeatureSnapshot, seed_ids: np.ndarray
    ) -> tuple[np.ndarray, dict[str, Any]]:
        from services.audience.lookalike.features import activity_from_raw
        from services.audience.lookalike.ranking import rank_in_memory

        ids, raw = snapshot.load_all()
        ranking = rank_in_memory(
            model.ensemble, ids, model.transform(raw), activity_from_raw(snapshot.schema, raw), seed_ids,
            self.params, median_d2=model.median_d2,
        )  # fmt: skip
        weights = "/".join(f"{w:g}" for w in ranking.blend.weights)
        # the expansion breaks score ties by distance to the nearest centres: the same order here
        score = ranking.scores["all"] - 1e-9 * ranking.tie
        return score, {
            "k": model.cluster_count,
            "blend": weights,
            "heldout_auc": round(ranking.heldout_auc, 3),
        }


@dataclass
class TargetResult:
    """Every figure of one target (see the module doc)."""

    target: Target
    dataset: str
    population: int
    seed: int
    hidden: int
    ranked: int
    auc: dict[str, Interval]
    #: flashcrowd minus ``activity`` / ``logreg`` / ``best`` (the better baseline), paired bootstrap
    diff: dict[str, Interval]
    best_baseline: str
    lift: dict[str, dict[float, float]]
    stability: list[float]  # flashcrowd's AUC per fit seed
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def significantly_below_best(self) -> bool:
        return self.diff["best"].high < 0

    @property
    def above_both(self) -> bool:
        return all(self.auc["flashcrowd"].estimate > self.auc[b].estimate for b in BASELINES)

    @property
    def stability_range(self) -> float:
        finite = [a for a in self.stability if np.isfinite(a)]
        return max(finite) - min(finite) if finite else float("nan")


def _isin(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.isin(ids, values, assume_unique=False)


@dataclass
class _Prepared:
    snapshot: FeatureSnapshot
    ids: np.ndarray
    x: np.ndarray
    activity: np.ndarray
    models: dict[int, Any]
    seconds: dict[str, float]


def evaluate_target(
    target: Target,
    prepared: _Prepared,
    ranker: Ranker,
    *,
    dataset: str,
    fit_seeds: Sequence[int],
    split_seed: int = 0,
    resamples: int = 1000,
) -> TargetResult:
    ids, x = prepared.ids, prepared.x
    n = len(ids)
    positives = target.positives[_isin(target.positives, ids)]
    rng = np.random.default_rng(split_seed)
    shuffled = rng.permutation(positives)
    seed_ids = np.sort(shuffled[: len(shuffled) // 2]).astype(np.uint32)
    hidden_ids = np.sort(shuffled[len(shuffled) // 2 :]).astype(np.uint32)
    seed_mask = _isin(ids, seed_ids)
    ranked = ~seed_mask
    truth = _isin(ids, hidden_ids)[ranked]

    timings: dict[str, float] = {}
    started = time.perf_counter()
    lr = LogisticRegression(max_iter=2000, C=1.0)
    lr.fit(x, seed_mask.astype(int))
    timings["logreg"] = time.perf_counter() - started
    scores = {
        "random": rng.random(n),
        "activity": prepared.activity.astype(np.float64),
        "logreg": lr.decision_function(x),
    }
    stability: list[float] = []
    notes: dict[str, Any] = {}
    for i, fit_seed in enumerate(fit_seeds):
        t0 = time.perf_counter()
        score, info = ranker.score(prepared.models[fit_seed], prepared.snapshot, seed_ids)
        timings.setdefault("flashcrowd", time.perf_counter() - t0)
        stability.append(auc(truth, score[ranked]))
        if i == 0:
            scores["flashcrowd"] = score
            notes = info
    in_ranked = {name: s[ranked] for name, s in scores.items()}
    point = {name: auc(truth, s) for name, s in in_ranked.items()}
    boot = bootstrap_aucs(truth, in_ranked, resamples=resamples, rng_seed=split_seed + 1)
    intervals = {name: percentile_interval(point[name], boot[name]) for name in in_ranked}
    best = max(BASELINES, key=lambda b: (point[b], b == "logreg"))
    diff = {
        b: percentile_interval(point["flashcrowd"] - point[b], boot["flashcrowd"] - boot[b])
        for b in BASELINES
    }
    diff["best"] = diff[best]
    tie = rng.random(int(ranked.sum()))  # random tie-break: activity has many ties
    lifts = {
        name: {r: lift_at(truth, s, max(1, round(r * n)), tie_break=tie) for r in REACHES}
        for name, s in in_ranked.items()
    }
    return TargetResult(
        target=target,
        dataset=dataset,
        population=n,
        seed=len(seed_ids),
        hidden=len(hidden_ids),
        ranked=int(ranked.sum()),
        auc=intervals,
        diff=diff,
        best_baseline=best,
        lift=lifts,
        stability=stability,
        seconds={**prepared.seconds, **timings},
        notes=notes,
    )


def _prepare(
    store: ObjectStore, source: FeatureSource, as_of: datetime, exclusion: FeatureExclusion,
    ranker: Ranker, fit_seeds: Sequence[int], snapshot_id: str,
) -> _Prepared:  # fmt: skip
    t0 = time.perf_counter()
    snapshot = build_snapshot(
        store, source, as_of=as_of, shards=1, snapshot_id=snapshot_id, exclusion=exclusion
    )
    ids, raw = snapshot.load_all()
    t1 = time.perf_counter()
    models = {s: ranker.train(store, snapshot, s) for s in fit_seeds}
    t2 = time.perf_counter()
    return _Prepared(
        snapshot,
        ids,
        snapshot.scaler.transform(raw),
        activity_from_raw(snapshot.schema, raw),
        models,
        {"features": t1 - t0, "fit": (t2 - t1) / max(len(fit_seeds), 1)},
    )


def evaluate_set(
    target_set: TargetSet,
    ranker: Ranker | None = None,
    *,
    fit_seeds: Sequence[int] = (0, 1, 2, 3, 4),
    split_seed: int = 0,
    resamples: int = 1000,
    work: Path | None = None,
) -> list[TargetResult]:
    """Every target of the set; snapshots and models are shared by targets with equal exclusions."""
    ranker = ranker or ProductRanker()
    results: list[TargetResult] = []
    with tempfile.TemporaryDirectory(prefix="fc-holdout-", dir=work) as tmp:
        store = LocalObjectStore(Path(tmp))
        cache: dict[FeatureExclusion, _Prepared] = {}
        for target in target_set.targets:
            key = target.exclusion
            if key not in cache:
                cache.clear()  # one snapshot at a time in memory
                cache[key] = _prepare(
                    store, target_set.source, target_set.as_of, key, ranker, fit_seeds,
                    snapshot_id=f"eval-{len(results):03d}",
                )  # fmt: skip
            results.append(
                evaluate_target(
                    target,
                    cache[key],
                    ranker,
                    dataset=target_set.dataset,
                    fit_seeds=fit_seeds,
                    split_seed=split_seed,
                    resamples=resamples,
                )
            )
    return results
