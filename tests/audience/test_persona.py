"""Persona distributions and TGI against an independent computation; the privacy minimum."""

from __future__ import annotations

from collections import Counter

import polars as pl
import pytest
from pyroaring import BitMap

from services.audience.persona import compute_persona
from services.events.schema import AGE_BAND_NAMES, GENDER_NAMES
from services.runtime.errors import FailedPrecondition
from tests.audience.conftest import World


def expected(world: World, members: set[int], bots: set[int], column: str, names: dict | None = None) -> dict:
    """value -> (count, share, population_share, tgi), computed row by row."""
    population = [row for row in world.profiles.iter_rows(named=True) if row["user_id"] not in bots]
    inside = [row for row in population if row["user_id"] in members]

    def values(row: dict) -> list:
        value = row[column]
        items = value if isinstance(value, list) else [value]
        return [names[v] if names else v for v in items]

    pop = Counter(v for row in population for v in values(row))
    mem = Counter(v for row in inside for v in values(row))
    out = {}
    for value, count in mem.items():
        share, pop_share = count / len(inside), pop[value] / len(population)
        out[value] = (count, share, pop_share, 100 * share / pop_share)
    return out


def test_distributions_and_tgi(world: World) -> None:
    bots = BitMap(world.bots)
    clickers = world.events.filter(pl.col("event_type") == 5).get_column("user_id").unique().to_list()
    members = BitMap(clickers) | BitMap(range(1, 200))  # some members without events, some bots
    persona = compute_persona(world.dataset, members, bots=bots, top_n=40, min_size=1000, pack="p", version=3)
    described = set(members) - set(bots)
    assert persona.size == len(described) and persona.pack == "p" and persona.version == 3
    assert persona.bots_excluded == len(members & bots) > 0
    assert persona.population_size == world.profiles.height - len(bots)
    dims = {d.dimension: d for d in persona.dimensions}
    assert list(dims) == ["age_band", "gender", "region", "interest", "category"]
    for name, column, names in (
        ("age_band", "age_band", AGE_BAND_NAMES),
        ("gender", "gender", GENDER_NAMES),
        ("region", "region", None),
        ("interest", "interests", None),
    ):
        want = expected(world, described, set(bots), column, names)
        got = {b.value: (b.count, b.share, b.population_share, b.tgi) for b in dims[name].buckets}
        assert set(got) == set(want), name
        for value, numbers in want.items():
            assert got[value] == pytest.approx(numbers), (name, value)
        counts = [b.count for b in dims[name].buckets]
        assert counts == sorted(counts, reverse=True)
    # Categories: distinct users per category among members / among the population.
    pairs = world.events.filter(pl.col("category_id").is_not_null()).select("user_id", "category_id").unique()
    pairs = pairs.filter(~pl.col("user_id").is_in(list(bots)))
    member_pairs = pairs.filter(pl.col("user_id").is_in(list(described)))
    names = {c["category_id"]: c["name"] for c in world.dataset.world["categories"]}
    top = dims["category"].buckets[0]
    top_id = next(cid for cid, name in names.items() if name == top.value)
    count = member_pairs.filter(pl.col("category_id") == top_id).height
    share = count / member_pairs["user_id"].n_unique()
    pop_share = pairs.filter(pl.col("category_id") == top_id).height / pairs["user_id"].n_unique()
    assert (top.count, top.share, top.population_share, top.tgi) == pytest.approx(
        (count, share, pop_share, 100 * share / pop_share)
    )


def test_top_n(world: World) -> None:
    persona = compute_persona(world.dataset, BitMap(range(1, 3000)), bots=world.bots, top_n=3)
    assert all(len(d.buckets) <= 3 for d in persona.dimensions)
    assert len({d.dimension: d for d in persona.dimensions}["region"].buckets) == 3


def test_privacy_minimum(world: World) -> None:
    humans = BitMap(range(1, 5001)) - world.bots
    small = BitMap(list(humans)[:999])
    with pytest.raises(FailedPrecondition) as caught:
        compute_persona(world.dataset, small, bots=world.bots, min_size=1000)
    assert "1000" in caught.value.message and "999" in caught.value.message
    assert caught.value.reason == "PACK_TOO_SMALL_FOR_PERSONA"
    # Bots do not count towards the minimum.
    with pytest.raises(FailedPrecondition):
        compute_persona(world.dataset, small | world.bots, bots=world.bots, min_size=1000)
    exactly = BitMap(list(humans)[:1000])
    assert compute_persona(world.dataset, exactly, bots=world.bots, min_size=1000).size == 1000
