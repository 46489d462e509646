"""Lookalike quality on a hidden future period (seed = did X before T, truth = first X after T).

For each scenario: events before the cutoff T are all a method may see (features are built with
``as_of = T``); the seed is everyone who did X before T; the truth is everyone who does X for the
*first* time in ``[T, end)``. Candidates are the population (users with a profile or an event before
T) minus the seed. Each method ranks the candidates; we report precision and lift over random at
1/2/5/10% reach (reach = share of the population, as in ExpandLookalike) and the AUC over all
candidates.

Methods:
  random      a uniform shuffle (lift ≈ 1, AUC ≈ 0.5: the yardstick)
  activity    most events before T first (the "popular users" baseline)
  lookalike   our product path: feature snapshot -> MiniBatchKMeans model -> expansion scores
  logreg      supervised reference: LogisticRegression seed-vs-rest on the same standardised features

Run:  .venv/bin/python bench/lookalike_future_eval.py [--gen-users 50000] [--only taobao-first]
Real data sets are read from ../shared/data (or $FLASHCROWD_SHARED_DATA) through the adapters in
services/events/adapters; missing folders are skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.audience.lookalike.features import (  # noqa: E402
    FeatureSource,
    FrameSource,
    activity_from_raw,
    build_snapshot,
)
from services.audience.lookalike.model import train_model  # noqa: E402
from services.audience.lookalike.ranking import RankingParams, rank_in_memory  # noqa: E402
from services.events.adapters import shared_data_dir  # noqa: E402
from services.events.schema import EventType  # noqa: E402
from services.storage import LocalObjectStore  # noqa: E402

REACHES = (0.01, 0.02, 0.05, 0.10)
METHODS = ("random", "activity", "lookalike", "logreg")


@dataclass
class Scenario:
    name: str
    dataset: str
    source: Callable[[], FeatureSource]
    cutoff: datetime
    end: datetime
    x_types: tuple[int, ...]
    x_category: int | None = None
    description: str = ""
    clusters: int = 64
    #: "global": one cutoff T for everybody; "per_user": each user's later half of events is hidden
    #: (users who do everything in one burst, as MovieLens raters do, leave a global cutoff empty).
    split: str = "global"
    notes: list[str] = field(default_factory=list)


@dataclass
class Result:
    scenario: Scenario
    population: int
    seed: int
    candidates: int
    truth: int
    metrics: dict[str, dict[str, float]]
    seconds: dict[str, float]
    cold_truth: int = 0
    dropped: list[str] = field(default_factory=list)
    weights: tuple[float, ...] = (0.0, 0.0, 0.0)  # the expansion's blend (cluster, classifier, activity)


def _x_filter(sc: Scenario) -> pl.Expr:
    expr = pl.col("event_type").is_in(list(sc.x_types))
    if sc.x_category is not None:
        expr &= pl.col("category_id") == sc.x_category
    return expr


def evaluate(sc: Scenario, *, params: RankingParams | None = None, seed: int = 0) -> Result:
    source = sc.source()
    events = source.scan_events()
    if sc.split == "per_user":
        ranked = events.with_columns(
            _rank=pl.col("ts").rank("ordinal").over("user_id"), _n=pl.len().over("user_id")
        )
        before = ranked.filter(pl.col("_rank") <= pl.col("_n") // 2).drop("_rank", "_n")
        later = ranked.filter(pl.col("_rank") > pl.col("_n") // 2).drop("_rank", "_n")
        as_of = sc.end
        feature_source: FeatureSource = FrameSource(before.collect(), source.scan_profiles().collect())
    else:
        before = events.filter(pl.col("ts") < sc.cutoff)
        later = events.filter((pl.col("ts") >= sc.cutoff) & (pl.col("ts") < sc.end))
        as_of = sc.cutoff
        feature_source = source
    t = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fc-eval-") as tmp:
        store = LocalObjectStore(Path(tmp))
        snap = build_snapshot(store, feature_source, as_of=as_of, shards=1)
        t["features"] = time.perf_counter() - started
        ids, raw = snap.load_all()
        x = snap.scaler.transform(raw)
        t1 = time.perf_counter()
        model = train_model(store, snap, model_id="eval", seed=seed)  # the population rule
        t["fit"] = time.perf_counter() - t1
    seed_ids = before.filter(_x_filter(sc)).select("user_id").unique().collect()["user_id"].to_numpy()
    truth_ids = later.filter(_x_filter(sc)).select("user_id").unique().collect()["user_id"].to_numpy()
    activity = before.group_by("user_id").agg(pl.len().alias("n")).collect()
    act = np.zeros(len(ids))
    pos = {int(u): i for i, u in enumerate(ids)}
    for u, n in activity.iter_rows():
        if int(u) in pos:
            act[pos[int(u)]] = n

    seed_mask = np.isin(ids, seed_ids)
    truth_mask = np.isin(ids, truth_ids) & ~seed_mask
    # Known at T = has behaviour before T. Users whose first event is after T (the adapters give
    # every user of a file a profile row, which would leak their future existence) are not
    # candidates: no method could have ranked them at T. They are counted as cold-start truth.
    known = act > 0
    cold_truth = int((truth_mask & ~known).sum())
    cand = ~seed_mask & known
    n_pop = int(known.sum())
    rng = np.random.default_rng(seed)

    t2 = time.perf_counter()
    ranking = rank_in_memory(
        model.ensemble, ids, x, activity_from_raw(snap.schema, raw), seed_ids.astype(np.uint32), params,
        median_d2=model.median_d2,
    )  # fmt: skip
    look, d2 = ranking.scores["all"], ranking.tie
    dropped = [c for c, keep in zip(model.schema.columns, ranking.dims, strict=True) if not keep]
    t["expand"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    lr = LogisticRegression(max_iter=2000, C=1.0)
    lr.fit(x, seed_mask.astype(int))
    logit = lr.decision_function(x)
    t["logreg"] = time.perf_counter() - t3

    scores = {
        "random": rng.random(len(ids)),
        "activity": act + rng.random(len(ids)) * 1e-3,  # random tie-break
        "lookalike": look - 1e-9 * d2,  # same tie-break order as the expansion
        "logreg": logit,
    }
    metrics: dict[str, dict[str, float]] = {}
    y = truth_mask[cand]
    base = y.mean() if y.size else float("nan")
    for method, s in scores.items():
        sc_c = s[cand]
        order = np.argsort(-sc_c, kind="stable")
        row: dict[str, float] = {}
        for r in REACHES:
            m = max(1, round(r * n_pop))
            hits = y[order[:m]].sum()
            row[f"p@{r:.0%}"] = hits / m
            row[f"lift@{r:.0%}"] = (hits / m) / base if base > 0 else float("nan")
        row["auc"] = roc_auc_score(y, sc_c) if 0 < y.sum() < y.size else float("nan")
        row["auc_se"] = auc_standard_error(row["auc"], int(y.sum()), int(y.size - y.sum()))
        metrics[method] = row
    return Result(
        sc,
        int(known.sum()),
        int(seed_mask.sum()),
        int(cand.sum()),
        int(y.sum()),
        metrics,
        t,
        cold_truth,
        dropped,
        tuple(ranking.blend.weights),
    )


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982): the sampling error of an AUC with this many positives/negatives.

    Printed next to every ratio: on the small real files (≈60-170 truth users) it is 0.02-0.04,
    so ratio differences of a few points between methods there are noise, not findings."""
    if not (positives and negatives) or np.isnan(auc):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (
        positives * negatives
    )
    return float(np.sqrt(max(var, 0.0)))


# --------------------------------------------------------------------------------------------------
# Scenarios


def _dataset_source(store_dir: Path):
    from services.events.dataset import EventDataset

    store = LocalObjectStore(store_dir)
    return EventDataset(store, "data/")


def generated_scenarios(users: int, work: Path) -> list[Scenario]:
    from services.events.generator import GenConfig, generate

    store_dir = work / "gen"
    store = LocalObjectStore(store_dir)
    cfg = GenConfig(users=users, days=8, seed=7)
    generate(store, cfg, overwrite=True)
    ds = _dataset_source(store_dir)
    start, end = ds.start, ds.end
    cutoff = start + timedelta(days=5)
    src = lambda: ds  # noqa: E731
    return [
        Scenario("gen: pay", "generated", src, cutoff, end, (int(EventType.PAY),),
                 description=f"{users:,} users, 8 days; X = pay; T = day 5"),
        Scenario("gen: add_cart", "generated", src, cutoff, end, (int(EventType.ADD_CART),),
                 description="X = add_cart"),
        Scenario("gen: live_enter", "generated", src, cutoff, end, (int(EventType.LIVE_ENTER),),
                 description="X = live_enter"),
    ]  # fmt: skip


def _imported(source: str, path: Path, work: Path, name: str):
    from services.events.adapters import import_dataset

    store_dir = work / name
    import_dataset(LocalObjectStore(store_dir), source, path)
    return _dataset_source(store_dir)


def real_scenarios(work: Path) -> tuple[list[Scenario], list[str]]:
    base = shared_data_dir()
    out: list[Scenario] = []
    skipped: list[str] = []
    pay, cart, follow = int(EventType.PAY), int(EventType.ADD_CART), int(EventType.FOLLOW)

    p = base / "taobao-userbehavior-first-users"
    if (p / "UserBehavior.csv").is_file():
        ds = _imported("taobao", p, work, "taobao-first")
        cut = datetime(2017, 11, 30, 16, tzinfo=UTC)  # 6 days before, 3 after (Beijing midnight)
        src = lambda ds=ds: ds  # noqa: E731
        out += [
            Scenario("taobao-first: buy", "taobao-first-users", src, cut, ds.end, (pay,),
                     description="815 users, 9 days; T = day 7 (Beijing); X = buy"),
            Scenario("taobao-first: cart", "taobao-first-users", src, cut, ds.end, (cart,),
                     description="X = cart"),
            Scenario("taobao-first: fav", "taobao-first-users", src, cut, ds.end, (follow,),
                     description="X = fav (follow)"),
        ]  # fmt: skip
    else:
        skipped.append(f"taobao-userbehavior-first-users: not found under {base}")

    p = base / "taobao-userbehavior-slice"
    if (p / "UserBehavior.csv").is_file():
        ds = _imported("taobao", p, work, "taobao-slice")
        cut = datetime(2017, 11, 26, 2, 20, tzinfo=UTC)  # 80 min before, 50 min after
        end = datetime(2017, 11, 26, 3, 11, tzinfo=UTC)
        src = lambda ds=ds: ds  # noqa: E731
        out += [
            Scenario("taobao-slice: buy", "taobao-slice", src, cut, end, (pay,),
                     description="66k users, 2h10m; T = +80 min; X = buy"),
            Scenario("taobao-slice: cart", "taobao-slice", src, cut, end, (cart,), description="X = cart"),
        ]  # fmt: skip
    else:
        skipped.append(f"taobao-userbehavior-slice: not found under {base}")

    p = base / "movielens-100k"
    if (p / "u.data").is_file():
        ds = _imported("movielens", p, work, "movielens")
        src = lambda ds=ds: ds  # noqa: E731
        finish = int(EventType.VIDEO_FINISH)
        genres = {g["name"]: g["category_id"] for g in ds.world["categories"]}
        for genre in ("Documentary", "Fantasy", "Western", "Horror"):
            out.append(
                Scenario(f"movielens: likes {genre}", "movielens-100k", src, ds.end, ds.end, (finish,),
                         x_category=genres[genre], split="per_user",
                         description=f"each user's later half hidden; X = rated a {genre} film >= 4",
                         clusters=32)
            )  # fmt: skip
    else:
        skipped.append(f"movielens-100k: not found under {base}")
    return out, skipped


# --------------------------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    head = f"{'scenario':<26} {'pop':>7} {'seed':>6} {'truth':>6} {'method':<10}"
    head += "".join(f" {'lift@' + format(r, '.0%'):>8}" for r in REACHES)
    head += f" {'p@5%':>7} {'AUC':>6}"
    print(head)
    print("-" * len(head))
    for res in results:
        for i, method in enumerate(METHODS):
            m = res.metrics[method]
            left = (
                f"{res.scenario.name:<26} {res.population:>7,} {res.seed:>6,} {res.truth:>6,}"
                if i == 0
                else f"{'':<26} {'':>7} {'':>6} {'':>6}"
            )
            line = f"{left} {method:<10}" + "".join(f" {m[f'lift@{r:.0%}']:>7.2f}x" for r in REACHES)
            line += f" {m['p@5%']:>7.3f} {m['auc']:>6.3f}"
            print(line)
        look, ref = res.metrics["lookalike"]["auc"], res.metrics["logreg"]["auc"]
        se = res.metrics["lookalike"]["auc_se"]
        print(f"{'':<26} lookalike AUC = {look / ref:.0%} of logreg's (AUC s.e. ≈ {se:.3f}); "
              f"blend {'/'.join(f'{w:g}' for w in res.weights)}; {res.cold_truth} first-time doers "
              "had no events before T (not rankable); "
              f"time: features {res.seconds['features']:.2f}s fit {res.seconds['fit']:.2f}s "
              f"expand {res.seconds['expand']:.2f}s")  # fmt: skip
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gen-users", type=int, default=50_000, help="generated population (0 = skip)")
    parser.add_argument("--only", default=None, help="substring of the scenario names to run")
    parser.add_argument("--prior", type=float, default=None)
    parser.add_argument(
        "--blend",
        default=None,
        help="fix the blend 'cluster,classifier,activity' (default: chosen per expansion)",
    )
    parser.add_argument("--min-dim-variance", type=float, default=None)
    parser.add_argument("--verbose", action="store_true", help="list the columns each expansion dropped")
    args = parser.parse_args(argv)
    defaults = RankingParams()
    params = RankingParams(
        prior=args.prior if args.prior is not None else defaults.prior,
        fixed_blend=tuple(float(w) for w in args.blend.split(",")) if args.blend else None,  # type: ignore[arg-type]
        min_dim_variance=args.min_dim_variance
        if args.min_dim_variance is not None
        else defaults.min_dim_variance,
    )
    with tempfile.TemporaryDirectory(prefix="fc-eval-data-") as tmp:
        work = Path(tmp)
        scenarios: list[Scenario] = []
        if args.gen_users > 0 and (args.only is None or "gen" in args.only):
            scenarios += generated_scenarios(args.gen_users, work)
        real, skipped = real_scenarios(work)
        scenarios += real
        if args.only:
            scenarios = [s for s in scenarios if args.only in s.name]
        print(
            f"lookalike eval: prior={params.prior} blend={params.fixed_blend or 'chosen per expansion'}; "
            "reach = share of population\n"
        )
        results = []
        for sc in scenarios:
            results.append(evaluate(sc, params=params))
        print_table(results)
        if args.verbose:
            for res in results:
                print(f"{res.scenario.name}: dropped {res.dropped}")
        for note in skipped:
            print(f"skipped: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
