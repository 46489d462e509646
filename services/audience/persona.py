"""Who is in a pack compared to the population: distributions with TGI, refused for tiny packs.

Population = users with a profile, minus bots. Members are described the same way (bots among them,
e.g. in a pack built with ``include_bots``, are left out and counted in ``bots_excluded``).

* age_band, gender, region: one value per user; share = members with the value / profiled members.
* interest: a user may have several tags, so shares add up to more than 1.
* category: categories of the members' events (any type with a category); share = members with an
  event in the category / members with any categorised event; likewise for the population.

TGI = 100 * share / population_share: 100 is "as in the population", 200 "twice as common".
"""

from __future__ import annotations

import polars as pl
from flashcrowd.audience.v1 import pack_pb2
from pyroaring import BitMap

from services.audience.compiler import bitmap_to_numpy
from services.events.dataset import EventDataset
from services.events.schema import AGE_BAND_NAMES, GENDER_NAMES
from services.runtime.errors import FailedPrecondition

__all__ = ["DEFAULT_MIN_SIZE", "compute_persona"]

#: Privacy minimum: fewer members than this could reveal individuals.
DEFAULT_MIN_SIZE = 1000


def _frame(bitmap: BitMap) -> pl.DataFrame:
    return pl.DataFrame({"user_id": pl.Series(bitmap_to_numpy(bitmap), dtype=pl.UInt32)})


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
) -> pack_pb2.PackPersona:
    """Persona of ``bitmap``'s members. ``FailedPrecondition`` if fewer than ``min_size`` remain."""
    members_bitmap = bitmap - bots if bots else bitmap
    bots_in_pack = len(bitmap) - len(members_bitmap)
    size = len(members_bitmap)
    if size < min_size:
        raise FailedPrecondition(
            "PACK_TOO_SMALL_FOR_PERSONA",
            f"a persona needs at least {min_size} members (privacy minimum); "
            f"{pack or 'this pack'} has {size}",
            [("PRIVACY_MINIMUM", pack or "pack", f"{size} members < minimum {min_size}")],
            metadata={"size": size, "minimum": min_size},
        )

    bot_ids = _frame(bots)
    members = _frame(members_bitmap)
    profiles = dataset.scan_profiles(["user_id", "age_band", "gender", "region", "interests"]).collect()
    population = profiles.join(bot_ids, on="user_id", how="anti")
    profiled = population.join(members, on="user_id", how="semi")

    persona = pack_pb2.PackPersona(
        pack=pack,
        version=version,
        size=size,
        population_size=population.height,
        bots_excluded=bots_excluded_at_build + bots_in_pack,
    )
    age = pl.col("age_band").replace_strict(AGE_BAND_NAMES, return_dtype=pl.Utf8)
    gender = pl.col("gender").replace_strict(GENDER_NAMES, return_dtype=pl.Utf8)
    for name, expr in (("age_band", age), ("gender", gender), ("region", pl.col("region"))):
        persona.dimensions.append(
            _dimension(
                name,
                _counts(profiled.select(expr.alias("value"))),
                profiled.height,
                _counts(population.select(expr.alias("value"))),
                population.height,
                top_n,
            )
        )
    interests = pl.col("interests").alias("value")
    persona.dimensions.append(
        _dimension(
            "interest",
            _counts(profiled.select(interests).explode("value")),
            profiled.height,
            _counts(population.select(interests).explode("value")),
            population.height,
            top_n,
        )
    )
    persona.dimensions.append(_categories(dataset, members, bot_ids, top_n))
    return persona


def _counts(values: pl.DataFrame) -> dict[str, int]:
    counted = values.drop_nulls().group_by("value").len()
    return dict(
        zip(
            counted.get_column("value").cast(pl.Utf8).to_list(),
            counted.get_column("len").to_list(),
            strict=True,
        )
    )


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


def _categories(
    dataset: EventDataset, members: pl.DataFrame, bot_ids: pl.DataFrame, top_n: int
) -> pack_pb2.PersonaDimension:
    # Distinct (user, category) pairs of the population, then the members' subset of them.
    pairs = (
        dataset.scan_events(columns=["user_id", "category_id"])
        .filter(pl.col("category_id").is_not_null())
        .unique()
        .collect(engine="streaming")
        .join(bot_ids, on="user_id", how="anti")
    )
    member_pairs = pairs.join(members, on="user_id", how="semi")
    names = {int(c["category_id"]): str(c["name"]) for c in dataset.world.get("categories", [])}

    def counts(frame: pl.DataFrame) -> dict[str, int]:
        counted = frame.group_by("category_id").len()
        return {
            names.get(int(cat), str(cat)): int(n)
            for cat, n in zip(
                counted.get_column("category_id").to_list(), counted.get_column("len").to_list(), strict=True
            )
        }

    return _dimension(
        "category",
        counts(member_pairs),
        member_pairs.get_column("user_id").n_unique(),
        counts(pairs),
        pairs.get_column("user_id").n_unique(),
        top_n,
    )
