"""Builds compared with independent polars answers on the same generated world."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flashcrowd.audience.v1 import pack_pb2, spec_pb2
from pyroaring import BitMap

from services.audience.bots import bot_bitmap
from services.audience.builder import BuildResult, build_pack, find_reference_cycle
from services.audience.packstore import PackStore
from services.audience.spec_io import spec_from_data
from services.events.sharding import Shard
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.audience import reference as ref
from tests.audience.conftest import World

DAY1 = datetime(2025, 6, 12, tzinfo=UTC)
DAY2 = DAY1 + timedelta(days=1)
END = DAY1 + timedelta(days=3)
SALE = DAY2 + timedelta(hours=2)  # the flash sale hour of the generated story


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def window(start: datetime, end: datetime) -> dict[str, Any]:
    return {"absolute": {"startTime": _iso(start), "endTime": _iso(end)}}


def no_packs(name: str, version: int) -> tuple[BitMap, int]:
    raise NotFound("flashcrowd.dev/Pack", name)


def build(world: World, spec: dict[str, Any], *, include_bots: bool = True, **kwargs: Any) -> BuildResult:
    options = spec_pb2.BuildOptions(include_bots=include_bots)
    kwargs.setdefault("resolve_pack", no_packs)
    return build_pack(world.dataset, spec_from_data(spec), options, tenant="acme", **kwargs)


def test_behavior_leaf_with_filters_and_min_count(world: World) -> None:
    events = world.events
    categories = (
        events.filter(events["event_type"] == ref.CLICK)["category_id"].drop_nulls().unique().to_list()[:5]
    )
    spec = {
        "behavior": {
            "eventTypes": ["click", "product_view"],
            "window": window(DAY1 + timedelta(hours=6), DAY2 + timedelta(hours=18)),
            "minCount": 3,
            "filter": {"categoryIds": categories},
        }
    }
    got = build(world, spec).bitmap
    want = ref.users(
        events,
        [ref.CLICK, ref.PRODUCT_VIEW],
        DAY1 + timedelta(hours=6),
        DAY2 + timedelta(hours=18),
        min_count=3,
        category_id=categories,
    )
    assert want and set(got) == want


def test_amount_filter_on_pay(world: World) -> None:
    spec = {
        "behavior": {
            "eventTypes": ["pay"],
            "window": window(DAY1, END),
            "filter": {"amount": {"minFen": 5000}},
        }
    }
    got = build(world, spec).bitmap
    pays = world.events.filter((world.events["event_type"] == ref.PAY) & (world.events["amount_fen"] >= 5000))
    assert got and set(got) == set(pays["user_id"].to_list())


@pytest.mark.parametrize(
    ("kind", "types"),
    [
        ("clickers", [ref.CLICK]),
        ("video_viewers", [ref.VIDEO_PLAY, ref.VIDEO_FINISH]),
        ("followers", [ref.FOLLOW]),
        ("high_intent", [ref.PRODUCT_VIEW]),
    ],
)
def test_simple_shortcuts(world: World, kind: str, types: list[int]) -> None:
    got = build(world, {"shortcut": {"kind": kind, "window": window(DAY2, END)}}).bitmap
    want = ref.users(world.events, types, DAY2, END)
    assert want and set(got) == want


def test_cart_abandoners(world: World) -> None:
    got = build(world, {"shortcut": {"kind": "cart_abandoners", "window": window(DAY1, END)}}).bitmap
    want = ref.users(world.events, [ref.ADD_CART], DAY1, END) - ref.users(
        world.events, [ref.ORDER], DAY1, END
    )
    assert want and set(got) == want


def test_purchasers_drop_fully_refunded(world: World) -> None:
    result = build(
        world, {"shortcut": {"kind": "purchasers", "window": window(DAY1, DAY2 + timedelta(hours=12))}}
    )
    want = ref.purchasers(world.events, DAY1, DAY2 + timedelta(hours=12), END)
    payers = ref.users(world.events, [ref.PAY], DAY1, DAY2 + timedelta(hours=12))
    assert set(result.bitmap) == want
    assert payers - want, "the world should have someone whose purchases were all refunded"


def test_profile_leaf(world: World) -> None:
    spec = {
        "profile": {"genders": ["female"], "ageBands": ["25_30", "31_35"], "interests": ["apparel", "deals"]}
    }
    got = build(world, spec).bitmap
    want = ref.profile_users(world.profiles, genders=[1], age_bands=[3, 4], interests=["apparel", "deals"])
    assert want and set(got) == want


def test_set_operations(world: World) -> None:
    clickers = {"shortcut": {"kind": "clickers", "window": window(DAY2, END)}}
    viewers = {"shortcut": {"kind": "video_viewers", "window": window(DAY1, END)}}
    women = {"profile": {"genders": ["female"]}}
    c = ref.users(world.events, [ref.CLICK], DAY2, END)
    v = ref.users(world.events, [ref.VIDEO_PLAY, ref.VIDEO_FINISH], DAY1, END)
    w = ref.profile_users(world.profiles, genders=[1])
    assert set(build(world, {"union": {"operands": [clickers, viewers]}}).bitmap) == c | v
    assert set(build(world, {"intersect": {"operands": [clickers, viewers, women]}}).bitmap) == c & v & w
    assert (
        set(build(world, {"exclude": {"base": clickers, "subtract": [viewers, women]}}).bitmap) == c - v - w
    )
    nested = {
        "union": {
            "operands": [
                {"intersect": {"operands": [clickers, women]}},
                {"exclude": {"base": viewers, "subtract": [clickers]}},
            ]
        }
    }
    assert set(build(world, nested).bitmap) == (c & w) | (v - c)


def test_pack_reference_through_callback(world: World) -> None:
    seed = BitMap(range(1, 2000))
    calls = []

    def resolve(name: str, version: int) -> tuple[BitMap, int]:
        calls.append((name, version))
        return seed, 4

    spec = {
        "intersect": {
            "operands": [{"pack": {"pack": "tenants/acme/packs/seed"}}, {"profile": {"genders": ["male"]}}]
        }
    }
    result = build(world, spec, resolve_pack=resolve)
    assert set(result.bitmap) == set(seed) & ref.profile_users(world.profiles, genders=[2])
    assert calls == [("tenants/acme/packs/seed", 0)]
    assert [(i.pack, i.version) for i in result.inputs] == [("tenants/acme/packs/seed", 4)]
    assert len(seed) == 1999  # the caller's bitmap is not mutated


def test_bots_excluded_by_default_and_kept_on_request(world: World) -> None:
    spec = {"shortcut": {"kind": "clickers", "window": window(DAY1, END)}}
    everyone = ref.users(world.events, [ref.CLICK], DAY1, END)
    bots = bot_bitmap(world.dataset)
    default = build(world, spec, include_bots=False)
    kept = build(world, spec, include_bots=True)
    assert set(kept.bitmap) == everyone
    assert set(default.bitmap) == everyone - set(bots)
    assert default.stats.bots_excluded == len(everyone & set(bots)) > 0
    assert kept.stats.bots_excluded == 0
    assert not default.bitmap & world.bots  # no true bot left


def test_shard_builds_union_to_the_full_build(world: World) -> None:
    spec = {
        "union": {
            "operands": [
                {"shortcut": {"kind": "purchasers", "window": window(DAY1, END)}},
                {
                    "intersect": {
                        "operands": [
                            {"profile": {"genders": ["female"]}},
                            {"shortcut": {"kind": "clickers", "window": {"last": "24h"}}},
                        ]
                    }
                },
                {"pack": {"pack": "tenants/acme/packs/seed"}},
            ]
        }
    }
    seed = BitMap(range(1, 5000, 7))
    full = build(world, spec, include_bots=False, resolve_pack=lambda n, v: (seed, 1))
    parts = [
        build(world, spec, include_bots=False, resolve_pack=lambda n, v: (seed, 1), shard=shard)
        for shard in Shard.all(4)
    ]
    union = BitMap.union(*(p.bitmap for p in parts))
    assert union == full.bitmap
    assert sum(len(p.bitmap) for p in parts) == len(full.bitmap)  # disjoint
    for shard, part in zip(Shard.all(4), parts, strict=True):
        assert shard.mask_np(part.bitmap.to_array()).all()
        assert part.stats.shard == str(shard)


def test_deterministic(world: World) -> None:
    spec = {
        "exclude": {
            "base": {"shortcut": {"kind": "clickers", "window": {"last": "48h"}}},
            "subtract": [{"shortcut": {"kind": "purchasers", "window": {"last": "48h"}}}],
        }
    }
    first, second = build(world, spec, include_bots=False), build(world, spec, include_bots=False)
    assert first.bitmap == second.bitmap
    a, b = first.stats, second.stats
    a.ClearField("duration")
    b.ClearField("duration")
    assert a == b


def test_stats_and_resolved_windows(world: World) -> None:
    result = build(world, {"shortcut": {"kind": "clickers", "window": {"last": "6h"}}})
    stats = result.stats
    assert stats.as_of.ToDatetime(UTC) == END  # default as_of: the end of the data
    assert (stats.files_total, stats.files_read) == (3, 1)  # only the last day's partition
    assert stats.dataset_version == world.dataset.version and stats.shard == "0/1"
    assert stats.events_matched == len(
        world.events.filter(
            (world.events["event_type"] == ref.CLICK) & (world.events["ts"] >= END - timedelta(hours=6))
        )
    )
    resolved = result.resolved_spec.shortcut.window
    assert resolved.WhichOneof("window") == "absolute"
    assert resolved.absolute.start_time.ToDatetime(UTC) == END - timedelta(hours=6)
    as_of = DAY2 + timedelta(hours=3)
    options = spec_pb2.BuildOptions(include_bots=True)
    options.as_of.FromDatetime(as_of)
    spec = spec_from_data({"shortcut": {"kind": "clickers", "window": {"last": "1h"}}})
    pinned = build_pack(world.dataset, spec, options, resolve_pack=no_packs, tenant="acme")
    assert set(pinned.bitmap) == ref.users(world.events, [ref.CLICK], SALE, as_of)


def test_window_outside_the_data_is_empty(world: World) -> None:
    result = build(world, {"shortcut": {"kind": "clickers", "window": window(END, END + timedelta(days=1))}})
    assert len(result.bitmap) == 0 and result.stats.files_read == 0 and result.stats.events_matched == 0


def test_progress_by_stage(world: World) -> None:
    seen: list[tuple[str, float]] = []
    spec = {
        "exclude": {
            "base": {"shortcut": {"kind": "clickers", "window": window(DAY1, END)}},
            "subtract": [{"shortcut": {"kind": "purchasers", "window": window(DAY1, END)}}],
        }
    }
    build(world, spec, include_bots=False, progress=lambda stage, fraction: seen.append((stage, fraction)))
    stages = [s for s, _ in seen]
    assert stages[0] == "compile" and stages[-1] == "done"
    assert "bots" in stages and "combine" in stages
    assert "scan leaf 1/2" in stages and "scan leaf 2/2" in stages
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_invalid_spec_is_rejected_before_reading(world: World) -> None:
    with pytest.raises(InvalidArgument) as caught:
        build(world, {"union": {"operands": [{"shortcut": {"kind": "clickers"}}]}})
    fields = [f for f, _ in caught.value.violations]
    assert fields == ["pack.spec.union.operands", "pack.spec.union.operands[0].shortcut.window"]


def test_other_tenants_packs_are_not_found(world: World) -> None:
    called = []

    def resolve(name: str, version: int) -> tuple[BitMap, int]:
        called.append(name)
        return BitMap([1]), 1

    spec = {
        "union": {
            "operands": [{"pack": {"pack": "tenants/other/packs/x"}}, {"profile": {"genders": ["male"]}}]
        }
    }
    with pytest.raises(NotFound) as caught:
        build(world, spec, resolve_pack=resolve)
    assert "tenants/other/packs/x" in caught.value.message and not called
    with pytest.raises(NotFound):
        build(
            world,
            {
                "union": {
                    "operands": [
                        {"pack": {"pack": "tenants/acme/packs/missing"}},
                        {"profile": {"genders": ["male"]}},
                    ]
                }
            },
        )


def _ref(name: str) -> dict[str, Any]:
    return {"pack": {"pack": f"tenants/acme/packs/{name}"}}


def test_reference_cycles(world: World) -> None:
    specs = {
        "a": spec_from_data({"union": {"operands": [_ref("b"), {"profile": {"genders": ["male"]}}]}}),
        "b": spec_from_data(
            {"exclude": {"base": _ref("c"), "subtract": [{"profile": {"genders": ["female"]}}]}}
        ),
        "c": spec_from_data({"intersect": {"operands": [_ref("a"), _ref("upload")]}}),
        "upload": None,
    }

    def resolve_spec(name: str, version: int) -> tuple[spec_pb2.PackSpec | None, int]:
        key = name.rsplit("/", 1)[-1]
        if key not in specs:
            raise NotFound("flashcrowd.dev/Pack", name)
        return specs[key], 1

    assert find_reference_cycle(specs["a"], start="tenants/acme/packs/a", resolve_spec=resolve_spec) == [
        "tenants/acme/packs/a",
        "tenants/acme/packs/b",
        "tenants/acme/packs/c",
        "tenants/acme/packs/a",
    ]
    # Refreshing "a" must fail before any data is read, naming the cycle.
    with pytest.raises(FailedPrecondition) as caught:
        build_pack(
            world.dataset,
            specs["a"],
            None,
            tenant="acme",
            resolve_pack=lambda n, v: (BitMap([1]), 1),
            resolve_spec=resolve_spec,
            pack_name="tenants/acme/packs/a",
        )
    assert caught.value.reason == "PACK_REFERENCE_CYCLE"
    assert (
        "tenants/acme/packs/a -> tenants/acme/packs/b -> tenants/acme/packs/c -> tenants/acme/packs/a"
        in str(caught.value.message)
    )
    # A direct self-reference is a cycle even without resolve_spec.
    own = spec_from_data({"union": {"operands": [_ref("d"), {"profile": {"genders": ["male"]}}]}})
    assert find_reference_cycle(own, start="tenants/acme/packs/d", resolve_spec=None) == [
        "tenants/acme/packs/d",
        "tenants/acme/packs/d",
    ]
    # No cycle: b's chain ends at an upload.
    specs["c"] = spec_from_data(
        {"intersect": {"operands": [_ref("upload"), {"profile": {"genders": ["male"]}}]}}
    )
    assert find_reference_cycle(specs["a"], start="tenants/acme/packs/a", resolve_spec=resolve_spec) is None


def test_build_reads_events_through_s3_too(world_on: World) -> None:
    spec = {
        "exclude": {
            "base": {"shortcut": {"kind": "clickers", "window": window(DAY2, END)}},
            "subtract": [{"behavior": {"eventTypes": ["pay"], "window": window(DAY2, END)}}],
        }
    }
    got = build(world_on, spec).bitmap
    want = ref.users(world_on.events, [ref.CLICK], DAY2, END) - ref.users(
        world_on.events, [ref.PAY], DAY2, END
    )
    assert want and set(got) == want
    half = build(world_on, spec, shard=Shard(1, 2)).bitmap
    assert set(half) == {u for u in want if Shard(1, 2).owns_user(u)}


def test_build_failing_midway_publishes_nothing(world_on: World) -> None:
    packs = PackStore(world_on.store)
    calls = []

    def flaky(name: str, version: int) -> tuple[BitMap, int]:
        calls.append(name)
        if len(calls) == 2:  # the second reference dies, after the first one resolved
            raise ConnectionError("store went away")
        return BitMap([1, 2, 3]), 1

    spec = {"union": {"operands": [_ref("first"), _ref("second"), {"profile": {"genders": ["male"]}}]}}
    with pytest.raises(ConnectionError):
        result = build(world_on, spec, resolve_pack=flaky)
        packs.publish_version("acme", "p", result.bitmap, pack_pb2.Pack(spec=spec_from_data(spec)))
    assert calls == ["tenants/acme/packs/first", "tenants/acme/packs/second"]
    assert not packs.exists("acme", "p")
    assert list(world_on.store.list("packs/")) == []
