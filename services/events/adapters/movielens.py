"""MovieLens 100K (GroupLens) -> flashcrowd events and profiles.

Cite: F. Maxwell Harper and Joseph A. Konstan, *The MovieLens Datasets: History and Context*, ACM TiiS
5(4), 2015. Files read (latin-1): ``u.data`` (user, item, rating, Unix s), ``u.item`` (genre flags),
``u.genre``, ``u.user`` (age, gender, occupation, zip).

Mapping:

* Every rating -> ``video_play`` of ``video_id = item_id = movie id`` (a rating says the user
  watched the film); a rating of 4 or 5 -> also ``video_finish`` at the same time (watched and
  liked: our strongest video-engagement signal). No commerce events and no amounts are invented:
  nobody bought anything, and pack specs over ``pay`` should find nobody here.
* Genre -> ``category_id``: a movie has up to six genre flags and an event one category, so the
  movie's *most specific* genre is used (the one with the fewest movies; "Film-Noir" before
  "Drama"), which keeps the category informative. Ids are ``genre index + 1`` (1 = unknown,
  2 = Action, ... 19 = Western; listed in world.json).
* ``u.user`` -> profiles: age -> our age bands (<18, 18-24, 25-30, 31-35, 36-40, 41-50, >50),
  M/F -> gender, no region (US zip codes are not CN regions), occupation -> interest tags by the
  fixed table ``OCCUPATION_INTERESTS`` (a stated heuristic, not data: e.g. programmer ->
  electronics + books, homemaker -> home + mother_baby + food, student -> deals + sports). The
  occupation itself has no column in our schema; the tags are what persona/TGI and profile
  filters can use.
* Event ids carry the source in the top byte (``0x02``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from services.events.adapters.common import AdaptedData
from services.events.schema import (
    EVENTS_SCHEMA,
    INTEREST_TAGS,
    PLATFORM_OWNER,
    PROFILES_SCHEMA,
    AgeBand,
    EventType,
    Gender,
)
from services.events.sharding import bucket_expr

__all__ = ["LIKE_RATING", "OCCUPATION_INTERESTS", "SOURCE_TAG", "age_band", "read_movielens"]

SOURCE_TAG = 0x02
#: Ratings at or above this also emit ``video_finish``.
LIKE_RATING = 4
OCCUPATION_INTERESTS: dict[str, tuple[str, ...]] = {
    "administrator": ("home",),
    "artist": ("apparel", "beauty"),
    "doctor": ("travel",),
    "educator": ("books",),
    "engineer": ("electronics",),
    "entertainment": ("beauty", "travel"),
    "executive": ("travel", "electronics"),
    "healthcare": ("sports",),
    "homemaker": ("home", "mother_baby", "food"),
    "lawyer": ("books", "travel"),
    "librarian": ("books",),
    "marketing": ("deals", "apparel"),
    "none": ("deals",),
    "other": (),
    "programmer": ("electronics", "books"),
    "retired": ("travel", "home"),
    "salesman": ("deals",),
    "scientist": ("electronics", "books"),
    "student": ("deals", "sports"),
    "technician": ("electronics",),
    "writer": ("books",),
}
assert all(t in INTEREST_TAGS for tags in OCCUPATION_INTERESTS.values() for t in tags)


def age_band(age: int) -> AgeBand:
    """Years -> our band (``AgeBand.UNKNOWN`` for non-positive ages)."""
    if age <= 0:
        return AgeBand.UNKNOWN
    for upper, band in (
        (17, AgeBand.UNDER_18),
        (24, AgeBand.AGE_18_24),
        (30, AgeBand.AGE_25_30),
        (35, AgeBand.AGE_31_35),
        (40, AgeBand.AGE_36_40),
        (50, AgeBand.AGE_41_50),
    ):
        if age <= upper:
            return band
    return AgeBand.OVER_50


def _age_expr(col: pl.Expr) -> pl.Expr:
    return (
        pl.when(col <= 0).then(int(AgeBand.UNKNOWN))
        .when(col <= 17).then(int(AgeBand.UNDER_18))
        .when(col <= 24).then(int(AgeBand.AGE_18_24))
        .when(col <= 30).then(int(AgeBand.AGE_25_30))
        .when(col <= 35).then(int(AgeBand.AGE_31_35))
        .when(col <= 40).then(int(AgeBand.AGE_36_40))
        .when(col <= 50).then(int(AgeBand.AGE_41_50))
        .otherwise(int(AgeBand.OVER_50))
        .cast(pl.UInt8)
    )  # fmt: skip


def _read(path: Path, sep: str, names: list[str]) -> pl.DataFrame:
    return pl.read_csv(
        path, separator=sep, has_header=False, new_columns=names, encoding="utf8-lossy", quote_char=None,
        infer_schema=False,
    )  # fmt: skip


def read_movielens(path: str | Path) -> AdaptedData:
    """Events and profiles from an ``ml-100k`` directory; see the module doc."""
    root = Path(path)
    for name in ("u.data", "u.item", "u.genre", "u.user"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"MovieLens 100K file {name} missing under {root}")
    genres = _read(root / "u.genre", "|", ["name", "index"]).filter(pl.col("name") != "")
    genre_names = {int(i): n for n, i in genres.iter_rows()}
    n_genres = len(genre_names)
    item_cols = ["item_id", "title", "release", "video_release", "url", *[f"g{i}" for i in range(n_genres)]]
    items = _read(root / "u.item", "|", item_cols).select(
        pl.col("item_id").cast(pl.Int64), *[pl.col(f"g{i}").cast(pl.Int8) for i in range(n_genres)]
    )
    # Most specific genre: the flagged genre with the fewest movies (ties: lower index).
    movies_per_genre = {i: int(items[f"g{i}"].sum()) for i in range(n_genres)}
    by_specificity = sorted(range(n_genres), key=lambda i: (movies_per_genre[i], i))
    primary = pl.lit(None, dtype=pl.Int64)
    for i in reversed(by_specificity):  # the last `when` written is checked first
        primary = pl.when(pl.col(f"g{i}") == 1).then(pl.lit(i + 1)).otherwise(primary)
    items = items.select("item_id", primary.fill_null(1).alias("category_id"))  # no flag -> unknown (1)

    ratings = (
        _read(root / "u.data", "\t", ["user_id", "item_id", "rating", "timestamp"])
        .select(pl.all().cast(pl.Int64))
        .with_row_index("row")
    )
    report: dict[str, Any] = {"source": "movielens-100k", "dir": str(root), "ratings": ratings.height}
    ratings = ratings.join(items, on="item_id", how="left").with_columns(pl.col("category_id").fill_null(1))
    ratings = ratings.with_columns(ts=pl.from_epoch("timestamp", time_unit="s").dt.replace_time_zone("UTC"))

    plays = ratings.with_columns(
        event_type=pl.lit(int(EventType.VIDEO_PLAY), dtype=pl.UInt8), ordinal=pl.lit(0)
    )
    likes = ratings.filter(pl.col("rating") >= LIKE_RATING).with_columns(
        event_type=pl.lit(int(EventType.VIDEO_FINISH), dtype=pl.UInt8), ordinal=pl.lit(1)
    )
    both = pl.concat([plays, likes])
    source = pl.lit(SOURCE_TAG << 56, dtype=pl.UInt64)
    events = both.select(
        event_id=source | (pl.col("row").cast(pl.UInt64) * 2 + pl.col("ordinal").cast(pl.UInt64)),
        user_id=pl.col("user_id").cast(pl.UInt32),
        bucket=bucket_expr(pl.col("user_id").cast(pl.UInt32)),
        ts=pl.col("ts").dt.cast_time_unit("us"),
        event_type=pl.col("event_type"),
        item_id=pl.col("item_id").cast(pl.UInt32),
        category_id=pl.col("category_id").cast(pl.UInt32),
        campaign_id=pl.lit(None, dtype=pl.UInt32),
        video_id=pl.col("item_id").cast(pl.UInt32),
        order_id=pl.lit(None, dtype=pl.UInt64),
        amount_fen=pl.lit(None, dtype=pl.Int64),
        owner=pl.lit(PLATFORM_OWNER, dtype=pl.Utf8),  # public data: platform behaviour
    ).cast(EVENTS_SCHEMA)

    users = _read(root / "u.user", "|", ["user_id", "age", "gender", "occupation", "zip"])
    occupation = pl.col("occupation").str.strip_chars().str.to_lowercase()
    tag_lists = {k: list(v) for k, v in OCCUPATION_INTERESTS.items()}
    profiles = (
        users.select(
            user_id=pl.col("user_id").cast(pl.UInt32),
            age_band=_age_expr(pl.col("age").cast(pl.Int64)),
            gender=pl.col("gender")
            .str.strip_chars()
            .str.to_uppercase()
            .replace_strict(
                {"F": int(Gender.FEMALE), "M": int(Gender.MALE)},
                default=int(Gender.UNKNOWN),
                return_dtype=pl.UInt8,
            ),
            region=pl.lit(None, dtype=pl.Utf8),
            interests=occupation.replace_strict(tag_lists, default=[], return_dtype=pl.List(pl.Utf8)),
            signup_date=pl.lit(None, dtype=pl.Date),
        )
        .cast(PROFILES_SCHEMA)
        .sort("user_id")
    )
    unknown_occupations = sorted(
        set(users["occupation"].str.to_lowercase().to_list()) - set(OCCUPATION_INTERESTS)
    )
    report.update(
        events=events.height,
        users=profiles.height,
        users_with_ratings=events["user_id"].n_unique(),
        unknown_occupations=unknown_occupations,
        events_by_type={
            EventType(int(code)).label: int(n)
            for code, n in events.group_by("event_type").len().sort("event_type").iter_rows()
        },
        category_rule="most specific genre (fewest movies) of the movie; id = u.genre index + 1",
    )
    categories = [{"category_id": i + 1, "name": genre_names[i]} for i in sorted(genre_names)]
    meta = {"source": "movielens-100k", "citation": "Harper & Konstan, ACM TiiS 5(4), 2015"}
    return AdaptedData(events=events, profiles=profiles, report=report, categories=categories, meta=meta)
