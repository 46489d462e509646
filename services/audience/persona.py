"""Who is in a pack compared to the population: distributions with TGI, refused for tiny packs.

Population = users with a profile, minus bots. Members are described the same way (bots among them,
e.g. in a pack built with ``include_bots``, are left out and counted in ``bots_excluded``).

* age_band, gender, region: one value per user; share = members with the value / profiled members.
* interest: a user may have several tags, so shares add up to more than 1.
* category: categories of the members' events (any type with a category); share = members with an
  event in the category / members with any categorised event; likewise for the population.

TGI = 100 * share / population_share: 100 is "as in the population", 200 "twice as common".

The population side (a scan of every profile and every event) is computed once per dataset version
and bot set and kept in a small in-process cache; a pack's own side is a join against it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
from flashcrowd.audience.v1 import pack_pb2
from pyroaring import BitMap

from services.audience.compiler import bitmap_to_numpy
from services.events.dataset import EventDataset
from services.events.schema import AGE_BAND_NAMES, GENDER_NAMES, PLATFORM_OWNER
from services.runtime.errors import FailedPrecondition

#: Per-user caps of multi-valued dimensions when counts are noised (see services/audience/privacy.py).
INTEREST_CAP = 5
CATEGORY_CAP = 10

__all__ = ["DEFAULT_MIN_SIZE", "compute_persona"]

#: Privacy minimum: fewer members than this could reveal individuals.
DEFAULT_MIN_SIZE = 1000


def _frame(bitmap: BitMap) -> pl.DataFrame:
    return pl.DataFrame({"user_id": pl.Series(bitmap_to_numpy(bitmap), dtype=pl.UInt32)})


_AGE = pl.col("age_band").replace_strict(AGE_BAND_NAMES, return_dtype=pl.Utf8)
_GENDER = pl.col("gender").replace_strict(GENDER_NAMES, return_dtype=pl.Utf8)
# (dimension, expression giving its value(s), several values per user)
_PROFILE_DIMENSIONS: tuple[tuple[str, pl.Expr, bool], ...] = (
    ("age_band", _AGE, False),
    ("gender", _GENDER, False),
    ("region", pl.col("region"), False),
    ("interest", pl.col("interests"), True),
)


@dataclass
class _Population:
    """What a persona compares against; the same for every pack of one dataset version."""

    profiles: pl.DataFrame  # profiled users minus bots: user_id + the dimension columns
    counts: dict[str, dict[str, int]]  # dimension -> value -> users
    pairs: pl.DataFrame  # distinct (user_id, category_id) of the population's events
    category_counts: dict[str, int]
    category_users: int


# Population summaries of the last few (dataset version, bot set) pairs: they cost a full scan of
# profiles and events, while a pack's own part is a join against them.
_CACHE: OrderedDict[tuple[str, ...], _Population] = OrderedDict()
_CACHE_SIZE = 2
_CACHE_LOCK = threading.Lock()


def _population(dataset: EventDataset, bots: BitMap) -> _Population:
    key = (
        dataset.store.url,
        dataset.prefix,
        str(dataset.version),
        str(dataset.manifest.get("published_at", "")),
        hashlib.sha256(bytes(bots.serialize())).hexdigest(),
    )
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    bot_ids = _frame(bots)
    profiles = (
        dataset.scan_profiles(["user_id", "age_band", "gender", "region", "interests"])
        .collect()
        .join(bot_ids, on="user_id", how="anti")
    )
    counts = {name: _counts(profiles, expr, many) for name, expr, many in _PROFILE_DIMENSIONS}
    pairs = (
        dataset.scan_events(columns=["user_id", "category_id"], owners=(PLATFORM_OWNER,))
        .filter(pl.col("category_id").is_not_null())
        .unique()
        .collect(engine="streaming")
        .join(bot_ids, on="user_id", how="anti")
    )
    names = {int(c["category_id"]): str(c["name"]) for c in dataset.world.get("categories", [])}
    population = _Population(
        profiles, counts, pairs, _category_counts(pairs, names), pairs.get_column("user_id").n_unique()
    )
    with _CACHE_LOCK:
        _CACHE[key] = population
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return population


def compute_persona(
    dataset: EventDataset,
    bitmap: BitMap,
    *,
    bots: BitMap,
    top_n: int = 10,
    min_size: int = DEFAULT_MIN_SIZE,
    pack: str = "",
    version: int = 0,
    bots_excluded_at_build: int = 0,
    noise: Callable[[str, int], int] | None = None,
) -> pack_pb2.PackPersona:
    """Persona of ``bitmap``'s members. ``FailedPrecondition`` if fewer than ``min_size`` remain.

    With ``noise`` (tenant callers; services/audience/privacy.py), every count shown is
    ``noise(label, true count)``: the size, the totals and each bucket of the whole value domain
    of the population (so that a bucket's presence reveals nothing), with each user's interests and
    categories capped so that one user changes every count by a bounded amount; the minimum
    applies to the noisy size; bots are not counted.
    """
    members_bitmap = bitmap - bots if bots else bitmap
    bots_in_pack = len(bitmap) - len(members_bitmap)
    size = len(members_bitmap) if noise is None else noise("size", len(members_bitmap))
    if size < min_size:
        raise FailedPrecondition(
            "PACK_TOO_SMALL_FOR_PERSONA",
            f"a persona needs at least {min_size} members (privacy minimum); "
            f"{pack or 'this pack'} has {size}",
            [("PRIVACY_MINIMUM", pack or "pack", f"{size} members < minimum {min_size}")],
            metadata={"size": size, "minimum": min_size},
        )

    population = _population(dataset, bots)
    members = _frame(members_bitmap)
    profiled = population.profiles.join(members, on="user_id", how="semi")
    persona = pack_pb2.PackPersona(
        pack=pack,
        version=version,
        size=size,
        population_size=population.profiles.height,
        bots_excluded=bots_excluded_at_build + bots_in_pack if noise is None else 0,
    )
    profiled_total = profiled.height if noise is None else noise("profiled", profiled.height)
    for name, expr, many in _PROFILE_DIMENSIONS:
        counts = _counts(profiled, expr, many, cap=INTEREST_CAP if noise is not None and many else None)
        persona.dimensions.append(
            _dimension(
                name,
                _noised(name, counts, population.counts[name], noise),
                profiled_total,
                population.counts[name],
                population.profiles.height,
                top_n,
            )
        )
    member_pairs = population.pairs.join(members, on="user_id", how="semi")
    if noise is not None:  # at most CATEGORY_CAP categories per user (bounded sensitivity)
        member_pairs = member_pairs.sort("user_id", "category_id").group_by("user_id").head(CATEGORY_CAP)
    names = {int(c["category_id"]): str(c["name"]) for c in dataset.world.get("categories", [])}
    category_users = member_pairs.get_column("user_id").n_unique()
    persona.dimensions.append(
        _dimension(
            "category",
            _noised("category", _category_counts(member_pairs, names), population.category_counts, noise),
            category_users if noise is None else noise("categorised", category_users),
            population.category_counts,
            population.category_users,
            top_n,
        )
    )
    if noise is not None:
        persona.disclosure = pack_pb2.SIZE_DISCLOSURE_NOISY
    else:
        persona.disclosure = pack_pb2.SIZE_DISCLOSURE_EXACT
    return persona


def _noised(
    dimension: str,
    counts: dict[str, int],
    domain: dict[str, int],
    noise: Callable[[str, int], int] | None,
) -> dict[str, int]:
    """Noisy counts over the population's whole value domain; buckets at 0 are left out."""
    if noise is None:
        return counts
    shown = {value: noise(f"{dimension}|{value}", counts.get(value, 0)) for value in domain}
    return {value: count for value, count in shown.items() if count > 0}


def _counts(frame: pl.DataFrame, expr: pl.Expr, many: bool, cap: int | None = None) -> dict[str, int]:
    values = frame.select(expr.alias("value"))
    if many:  # a user with several interests counts once in each (in at most ``cap`` of them)
        if cap is not None:
            values = values.select(pl.col("value").list.head(cap))
        values = values.explode("value")
    counted = values.drop_nulls().group_by("value").len()
    return dict(
        zip(
            counted.get_column("value").cast(pl.Utf8).to_list(),
            counted.get_column("len").to_list(),
            strict=True,
        )
    )


def _category_counts(pairs: pl.DataFrame, names: dict[int, str]) -> dict[str, int]:
    counted = pairs.group_by("category_id").len()
    return {
        names.get(int(cat), str(cat)): int(n)
        for cat, n in zip(
            counted.get_column("category_id").to_list(), counted.get_column("len").to_list(), strict=True
        )
    }


def _dimension(
    name: str, counts: dict[str, int], total: int, pop_counts: dict[str, int], pop_total: int, top_n: int
) -> pack_pb2.PersonaDimension:
    dimension = pack_pb2.PersonaDimension(dimension=name)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]
    for value, count in ordered:
        share = count / total if total else 0.0
        pop_share = pop_counts.get(value, 0) / pop_total if pop_total else 0.0
        dimension.buckets.append(
            pack_pb2.PersonaBucket(
                value=value,
                count=count,
                share=share,
                population_share=pop_share,
                tgi=100.0 * share / pop_share if pop_share else 0.0,
            )
        )
    return dimension
