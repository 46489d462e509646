"""Targets of the seed-holdout evaluation, read through the project's adapters and generator.

A target is a set of *positive* users (those who did X) plus X written as a pack spec; the events
that define X are kept out of the features by the product's own rule,
``FeatureExclusion.from_seed_spec`` (so no method can find the positives by the very behaviour
that makes them positive, and the evaluation exercises the exclusion expansions apply to seeds).
Target sets group the targets of one data set over one feature source:

=================  ===============================================================================
MovieLens 100K     every genre with at least ``min_positives`` (150) positive users; positive =
                   rated at least 2 films of the genre. A film's genre is the adapter's
                   ``category_id`` (its most specific genre, services/events/adapters/movielens.py);
                   every event of the genre's films is removed from the features.
Taobao first users the ``top`` categories with most buyers; positive = bought in the category;
                   every event in the category is removed from the features.
generated world    each latent segment of ``flashcrowd gen`` (bots left out); nothing to remove:
                   the segment never appears as a column, only through the behaviour it causes.
=================  ===============================================================================

Real data is read from ``shared_data_dir()`` (``../shared/data`` or ``$FLASHCROWD_SHARED_DATA``);
loaders raise ``FileNotFoundError`` naming the folder when it is absent, so callers can skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import numpy as np
import polars as pl
from flashcrowd.audience.v1 import events_pb2, spec_pb2

from services.audience.lookalike.exclusion import FeatureExclusion
from services.audience.lookalike.features import FeatureSource, FrameSource
from services.events.schema import EventType

__all__ = [
    "Target",
    "TargetSet",
    "generated_targets",
    "movielens_targets",
    "taobao_targets",
]


@dataclass(frozen=True)
class Target:
    """Positive users and the spec that selects them (None: nothing observable defines them)."""

    name: str
    positives: np.ndarray  # sorted uint32
    spec: spec_pb2.PackSpec | None = None
    description: str = ""

    @property
    def exclusion(self) -> FeatureExclusion:
        """What the features leave out: the product's rule applied to the target's spec."""
        return FeatureExclusion.from_seed_spec(self.spec)


def _behaviour_spec(
    event_type: EventType, category: int, start: datetime, end: datetime, min_count: int = 1
) -> spec_pb2.PackSpec:
    window = spec_pb2.TimeWindow()
    window.absolute.start_time.FromDatetime(start)
    window.absolute.end_time.FromDatetime(end + timedelta(seconds=1))
    return spec_pb2.PackSpec(
        behavior=spec_pb2.BehaviorCondition(
            event_types=[cast(events_pb2.EventType, int(event_type))],
            window=window,
            min_count=min_count,
            filter=spec_pb2.EventFilter(category_ids=[category]),
        )
    )


@dataclass
class TargetSet:
    """The targets of one data set, with the feature source every method reads."""

    dataset: str
    source: FeatureSource
    as_of: datetime
    targets: list[Target]
    notes: list[str] = field(default_factory=list)


def _ids(series: pl.Series) -> np.ndarray:
    return np.unique(series.to_numpy().astype(np.uint32))


def _data_dir(folder: str, file: str, base: Path | None) -> Path:
    from services.events.adapters import shared_data_dir

    path = (base or shared_data_dir()) / folder
    if not (path / file).is_file():
        raise FileNotFoundError(f"real data set {folder} not found under {path.parent}")
    return path


def movielens_targets(
    base: Path | None = None, *, min_positives: int = 150, min_films: int = 2, genres: tuple[str, ...] = ()
) -> TargetSet:
    """One target per genre with ``min_positives`` users who rated ``min_films`` of its films."""
    from services.events.adapters.movielens import read_movielens

    data = read_movielens(_data_dir("movielens-100k", "u.data", base))
    names = {int(c["category_id"]): str(c["name"]) for c in data.categories}
    plays = data.events.filter(pl.col("event_type") == int(EventType.VIDEO_PLAY))
    per_user = plays.group_by("category_id", "user_id").len().filter(pl.col("len") >= min_films)
    start, end = data.events["ts"].min(), data.events["ts"].max()
    assert isinstance(start, datetime) and isinstance(end, datetime)
    targets = []
    for (category,), group in sorted(per_user.group_by("category_id"), key=lambda g: names[int(g[0][0])]):
        genre = names[int(category)]
        if group.height < min_positives or (genres and genre not in genres):
            continue
        targets.append(
            Target(
                f"movielens: {genre}",
                _ids(group["user_id"]),
                _behaviour_spec(EventType.VIDEO_PLAY, int(category), start, end, min_films),
                f"rated >= {min_films} {genre} films; the genre's films removed from the features",
            )
        )
    return TargetSet(
        "movielens-100k",
        FrameSource(data.events, data.profiles),
        end,
        targets,
        [f"{data.profiles.height} users; genre = the adapter's most specific genre of a film"],
    )


def taobao_targets(base: Path | None = None, *, top: int = 4) -> TargetSet:
    """The ``top`` categories by buyers in the Taobao first-users file."""
    from services.events.adapters.taobao import read_taobao

    data = read_taobao(_data_dir("taobao-userbehavior-first-users", "UserBehavior.csv", base))
    buys = data.events.filter(pl.col("event_type") == int(EventType.PAY))
    by_category = (
        buys.group_by("category_id")
        .agg(pl.col("user_id").unique().alias("users"), pl.col("user_id").n_unique().alias("n"))
        .sort(["n", "category_id"], descending=[True, False])
        .head(top)
    )
    start, end = data.events["ts"].min(), data.events["ts"].max()
    assert isinstance(start, datetime) and isinstance(end, datetime)
    targets = [
        Target(
            f"taobao: buy cat {int(c)}",
            np.unique(np.asarray(users, np.uint32)),
            _behaviour_spec(EventType.PAY, int(c), start, end),
            "bought in the category; every event of the category removed from the features",
        )
        for c, users, _n in by_category.iter_rows()
    ]
    return TargetSet(
        "taobao-first-users",
        FrameSource(data.events, data.profiles),
        end,
        targets,
        [f"{data.profiles.height} users, no profiles; hidden halves are small (AUC intervals wide)"],
    )


def generated_targets(work: Path, *, users: int = 20_000, days: int = 6, seed: int = 3) -> TargetSet:
    """One target per latent segment of a generated world (written under ``work``)."""
    from services.events.dataset import EventDataset
    from services.events.generator import GenConfig, generate
    from services.events.world import SEGMENTS
    from services.storage import LocalObjectStore

    store = LocalObjectStore(work / "generated")
    generate(store, GenConfig(users=users, days=days, seed=seed), overwrite=True)
    dataset = EventDataset(store)
    truth = dataset.scan_truth(["user_id", "segment", "is_bot"]).collect().filter(~pl.col("is_bot"))
    targets = [
        Target(
            f"generated: {s.name}",
            _ids(truth.filter(pl.col("segment") == s.code)["user_id"]),
            None,
            f"latent segment {s.code} ({s.share:.0%} of users); never a feature",
        )
        for s in SEGMENTS
    ]
    return TargetSet(
        "generated",
        dataset,
        dataset.end,
        targets,
        [f"{users:,} users, {days} days, generator seed {seed}"],
    )
