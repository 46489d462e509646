"""Negative and value-weighted seeds (issue 15, item 5): do they do what they claim, on data?

Negative seeds, MovieLens 100K: target genre T and "avoid" genre A (both genres' films removed from
the features). P = users who rated >= 2 films of T; N = users who rated >= 2 of A and not of T. A
random half of P is the seed, a random half of N the negative seed; the other halves are hidden.
Every user outside the seed and the negative seed is ranked, by the product's ranking with and
without the negative seed. Reported: AUC of the hidden P half (should not drop much) and the share
of the hidden N half among the top 10% of the population (should drop).

Value-weighted seeds, generated world: P = purchasers (pay and refund events removed from the
features, as the product excludes a purchase seed's behaviour), half the seed; value = net spend.
Ranked with uniform and with spend weights. Reported: AUC of the hidden purchasers and the share of
the hidden purchasers' *spend* found in the top 5% / 10% (should rise with weights).

    nice -n 10 .venv/bin/python bench/lookalike_seed_options.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAIRS = [("Horror", "Children's"), ("Children's", "Horror"), ("Sci-Fi", "Romance"), ("Western", "Musical")]


def _rank(prepared: Any, seed: np.ndarray, **kwargs: Any) -> np.ndarray:
    from services.audience.lookalike.ranking import rank_population

    model = prepared.models[0]
    x = np.array(prepared.x, dtype=np.float32)
    ids = prepared.ids
    ranking = rank_population(
        model.ensemble, lambda: iter([(ids, x.copy(), prepared.activity)]), seed,
        median_d2=model.median_d2, **kwargs,
    )  # fmt: skip
    return ranking.scores["all"] - 1e-9 * ranking.tie


def _top(score: np.ndarray, eligible: np.ndarray, size: int) -> np.ndarray:
    idx = np.flatnonzero(eligible)
    return idx[np.argsort(-score[idx], kind="stable")[:size]]


def negative_seeds(split_seed: int) -> list[str]:
    from services.audience.lookalike.evaluation.metrics import auc
    from services.audience.lookalike.evaluation.protocol import ProductRanker, _prepare
    from services.audience.lookalike.evaluation.targets import movielens_targets
    from services.storage import LocalObjectStore

    genres = {g for pair in PAIRS for g in pair}
    target_set = movielens_targets(genres=tuple(sorted(genres)))
    by_name = {t.name.split(": ", 1)[1]: t for t in target_set.targets}
    lines = [
        f"{'target':<12} {'avoid':<12} {'P':>4} {'N':>4}  {'AUC plain':>9} {'AUC neg':>8}  "
        f"{'hidden N in top 10%: plain':>27} {'neg':>6}"
    ]
    with tempfile.TemporaryDirectory(prefix="fc-negeval-") as tmp:
        store = LocalObjectStore(Path(tmp))
        for i, (t_name, a_name) in enumerate(PAIRS):
            target, avoid = by_name[t_name], by_name[a_name]
            exclusion = target.exclusion.union(avoid.exclusion)
            prepared = _prepare(
                store, target_set.source, target_set.as_of, exclusion, ProductRanker(), [0], f"neg-{i}"
            )
            ids = prepared.ids
            positives = np.intersect1d(target.positives, ids)
            negatives = np.setdiff1d(np.intersect1d(avoid.positives, ids), positives)
            rng = np.random.default_rng(split_seed)
            p, q = rng.permutation(positives), rng.permutation(negatives)
            seed, hidden = np.sort(p[: len(p) // 2]), np.sort(p[len(p) // 2 :])
            neg_seed, neg_hidden = np.sort(q[: len(q) // 2]), np.sort(q[len(q) // 2 :])
            ranked = ~np.isin(ids, seed) & ~np.isin(ids, neg_seed)
            truth = np.isin(ids, hidden)
            size = round(0.10 * len(ids))
            out = {}
            for label, kwargs in (("plain", {}), ("neg", {"negative_ids": neg_seed.astype(np.uint32)})):
                score = _rank(prepared, seed.astype(np.uint32), **kwargs)
                top = _top(score, ranked, size)
                out[label] = (
                    auc(truth[ranked], score[ranked]),
                    float(np.isin(ids[top], neg_hidden).sum() / max(len(neg_hidden), 1)),
                )
            lines.append(
                f"{t_name:<12} {a_name:<12} {len(positives):>4} {len(negatives):>4}  {out['plain'][0]:>9.3f} "
                f"{out['neg'][0]:>8.3f}  {out['plain'][1]:>27.1%} {out['neg'][1]:>6.1%}"
            )
    return lines


def spend_weighted(work: Path, split_seed: int, users: int) -> list[str]:
    from flashcrowd.audience.v1 import events_pb2, spec_pb2

    from services.audience.lookalike.evaluation.metrics import auc
    from services.audience.lookalike.evaluation.protocol import ProductRanker, _prepare
    from services.audience.lookalike.exclusion import FeatureExclusion
    from services.audience.lookalike.seed_weights import spend_weights
    from services.events.dataset import EventDataset
    from services.events.generator import GenConfig, generate
    from services.events.schema import EventType
    from services.storage import LocalObjectStore

    store = LocalObjectStore(work / "generated")
    generate(store, GenConfig(users=users, days=6, seed=3), overwrite=True)
    dataset = EventDataset(store)
    money = (
        dataset.scan_events(columns=["user_id", "event_type", "amount_fen"])
        .filter(pl.col("event_type").is_in([int(EventType.PAY), int(EventType.REFUND)]))
        .group_by(pl.col("user_id").cast(pl.UInt32))
        .agg(
            pl.when(pl.col("event_type") == int(EventType.PAY))
            .then(pl.col("amount_fen"))
            .otherwise(-pl.col("amount_fen"))
            .sum()
            .alias("net")
        )
        .collect()
    )
    buyers = money.filter(pl.col("net") > 0)
    spec = spec_pb2.PackSpec(
        behavior=spec_pb2.BehaviorCondition(
            event_types=[events_pb2.EVENT_TYPE_PAY, events_pb2.EVENT_TYPE_REFUND]
        )
    )
    exclusion = FeatureExclusion.from_seed_spec(spec)
    lines = []
    with tempfile.TemporaryDirectory(prefix="fc-spendeval-") as tmp:
        prepared = _prepare(
            LocalObjectStore(Path(tmp)), dataset, dataset.end, exclusion, ProductRanker(), [0], "spend"
        )
        ids = prepared.ids
        value = np.zeros(len(ids))
        pos = np.searchsorted(ids, buyers["user_id"].to_numpy())
        ok = pos < len(ids)
        value[pos[ok]] = buyers["net"].to_numpy()[ok]
        positives = ids[value > 0]
        rng = np.random.default_rng(split_seed)
        p = rng.permutation(positives)
        seed, hidden = np.sort(p[: len(p) // 2]).astype(np.uint32), np.sort(p[len(p) // 2 :])
        weights = spend_weights(dataset, "", seed, dataset.end)
        ranked = ~np.isin(ids, seed)
        truth = np.isin(ids, hidden)
        hidden_value = value * truth
        lines.append(
            f"generated world: {len(ids):,} users, {len(positives):,} purchasers (seed {len(seed):,}; "
            f"{weights.note})"
        )
        lines.append(
            f"{'seed':<9} {'AUC':>6} {'spend found @5%':>16} {'@10%':>6} {'buyers @5%':>11} {'@10%':>6}"
        )
        for label, kwargs in (("uniform", {}), ("spend", {"seed_weights": weights.weights})):
            score = _rank(prepared, seed, **kwargs)
            row = [f"{label:<9} {auc(truth[ranked], score[ranked]):>6.3f}"]
            shares, counts = [], []
            for reach in (0.05, 0.10):
                top = _top(score, ranked, round(reach * len(ids)))
                shares.append(hidden_value[top].sum() / hidden_value.sum())
                counts.append(truth[top].sum() / truth.sum())
            row.append(f"{shares[0]:>16.1%} {shares[1]:>6.1%} {counts[0]:>11.1%} {counts[1]:>6.1%}")
            lines.append(" ".join(row))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=20_000, help="users of the generated world")
    parser.add_argument("--work", type=Path, default=ROOT / "var" / "bench" / "seed-options")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"negative seeds (MovieLens 100K, split seed {args.split_seed})")
    try:
        print("\n".join(negative_seeds(args.split_seed)))
    except FileNotFoundError as error:
        print(f"skipped: {error}")
    print()
    print("value-weighted seeds")
    print("\n".join(spend_weighted(args.work, args.split_seed, args.users)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
