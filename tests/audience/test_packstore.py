"""Versioned packs on both stores: visibility rules, pagination, filters, delete, TTL, shards."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flashcrowd.audience.v1 import pack_pb2, spec_pb2
from google.protobuf import duration_pb2
from pyroaring import BitMap, FrozenBitMap

from services.audience.packstore import PackStore, pack_from_manifest
from services.audience.spec_io import spec_from_data
from services.events.sharding import Shard
from services.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.storage import ObjectStore, publish

SPEC = spec_from_data({"shortcut": {"kind": "clickers", "window": {"last": "24h"}}})


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 6, 18, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


class FailingStore:
    """The real store, failing the first write whose key contains ``fail_on`` (fault injection)."""

    def __init__(self, inner: ObjectStore, fail_on: str) -> None:
        self._inner = inner
        self.fail_on = fail_on
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        if self.fail_on and self.fail_on in key:
            raise OSError(f"injected failure writing {key}")
        self._inner.put_bytes(key, data, content_type)


def template(**labels: str) -> pack_pb2.Pack:
    return pack_pb2.Pack(display_name="clickers", labels=labels, spec=SPEC, source=pack_pb2.Pack.SOURCE_SPEC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def packs(any_store: ObjectStore, clock: Clock) -> PackStore:
    return PackStore(any_store, clock=clock)


def test_versions_are_immutable_and_increasing(packs: PackStore, clock: Clock) -> None:
    stats = pack_pb2.BuildStats(
        files_total=3, files_read=1, events_matched=10, dataset_version=1, shard="0/1"
    )
    first = packs.publish_version("acme", "clickers", BitMap([1, 2, 3]), template(team="growth"), stats)
    clock.tick(minutes=5)
    second = packs.publish_version("acme", "clickers", BitMap([2, 3, 4, 5]), template(team="growth"))
    assert (first.version, second.version) == (1, 2)
    assert first.name == "tenants/acme/packs/clickers" and first.state == pack_pb2.Pack.STATE_READY
    assert second.create_time == first.create_time and second.update_time != first.update_time
    latest = packs.get("acme", "clickers")
    assert latest == second and latest.size == 4 and latest.spec == SPEC
    assert packs.get("acme", "clickers", 1).build_stats == stats
    bitmap, pack = packs.load_bitmap("acme", "clickers", 1)
    assert bitmap == BitMap([1, 2, 3]) and pack.version == 1
    frozen, _ = packs.load_frozen("acme", "clickers")
    assert isinstance(frozen, FrozenBitMap) and frozen == BitMap([2, 3, 4, 5])
    assert packs.load_frozen("acme", "clickers")[0] is frozen  # cached per version
    with pytest.raises(NotFound):
        packs.get("acme", "clickers", 3)
    assert packs.exists("acme", "clickers") and not packs.exists("acme", "other")
    assert packs.latest_version("acme", "clickers") == 2


def test_manifest_holds_the_spec_as_protobuf_json(packs: PackStore) -> None:
    resolved = spec_from_data(
        {
            "shortcut": {
                "kind": "clickers",
                "window": {
                    "absolute": {"startTime": "2025-06-14T00:00:00Z", "endTime": "2025-06-15T00:00:00Z"}
                },
            }
        }
    )
    packs.publish_version("acme", "p", BitMap([7]), template(), resolved_spec=resolved)
    raw = json.loads(packs.store.get_bytes(packs.manifest_key("acme", "p", 1)))
    assert raw["pack"]["spec"] == {"shortcut": {"kind": "KIND_CLICKERS", "window": {"last": "86400s"}}}
    assert pack_from_manifest(raw).spec == SPEC
    assert packs.resolved_spec("acme", "p") == resolved
    assert [f["key"] for f in raw["files"]] == ["packs/acme/p/v000001/members.roaring"]


def test_unpublished_version_is_invisible(packs: PackStore) -> None:
    packs.publish_version("acme", "p", BitMap([1]), template())
    # A publish that died after its manifest but before the pointer.
    publish(
        packs.store,
        data={"packs/acme/p/v000002/members.roaring": bytes(BitMap([9]).serialize())},
        manifest_key="packs/acme/p/v000002/manifest.json",
        manifest={
            "name": "tenants/acme/packs/p",
            "version": 2,
            "size": 1,
            "pack": {},
            "shards": {"parts": []},
        },
    )
    assert packs.get("acme", "p").version == 1
    with pytest.raises(NotFound):
        packs.get("acme", "p", 2)
    # The next publish skips the dead version's number instead of colliding with it.
    assert packs.publish_version("acme", "p", BitMap([3]), template()).version == 3


def test_published_by_finds_and_completes_an_operations_version(packs: PackStore) -> None:
    packs.publish_version("acme", "p", BitMap([1]), template(), operation="operations/a")
    assert packs.published_by("acme", "p", "operations/b") is None
    first_pointer = packs.store.get_bytes(packs.pointer_key("acme", "p"))
    # The owner of operations/c died after writing the version's manifest, before its pointer.
    published = packs.publish_version("acme", "p", BitMap([2, 3]), template(), operation="operations/c")
    packs.store.put_bytes(packs.pointer_key("acme", "p"), first_pointer)
    assert packs.get("acme", "p").version == 1
    found = packs.published_by("acme", "p", "operations/c")
    assert found is not None and found.version == published.version == 2 and found.size == 2
    # The re-run completed the pointer: the version is visible, nothing was published twice.
    assert packs.get("acme", "p") == published
    assert packs.published_by("acme", "p", "operations/c") == published
    assert packs.publish_version("acme", "p", BitMap([4]), template()).version == 3


@pytest.mark.parametrize("fail_on", ["members.roaring", "manifest.json", "latest.json"])
def test_failed_publish_leaves_nothing_visible(any_store: ObjectStore, fail_on: str) -> None:
    PackStore(any_store).publish_version("acme", "p", BitMap([1]), template())
    flaky = PackStore(FailingStore(any_store, fail_on))  # type: ignore[arg-type]
    with pytest.raises(OSError, match="injected"):
        flaky.publish_version("acme", "p", BitMap([1, 2]), template())
    packs = PackStore(any_store)
    assert packs.get("acme", "p").version == 1
    assert packs.load_bitmap("acme", "p")[0] == BitMap([1])
    if fail_on != "latest.json":  # data first, manifest last: no manifest points at missing data
        assert not any_store.exists("packs/acme/p/v000002/manifest.json")
    # A first version whose pointer never landed does not exist either.
    broken = PackStore(FailingStore(any_store, "latest.json"))  # type: ignore[arg-type]
    with pytest.raises(OSError, match="injected"):
        broken.publish_version("acme", "new", BitMap([1]), template())
    with pytest.raises(NotFound):
        packs.get("acme", "new")


def test_list_pages_newest_first_with_stable_tokens(packs: PackStore, clock: Clock) -> None:
    for i in range(7):
        packs.publish_version("acme", f"p{i}", BitMap([i]), template(kind="odd" if i % 2 else "even"))
        clock.tick(seconds=1)
    packs.publish_version("other", "p0", BitMap([1]), template())
    page1, token = packs.list("acme", page_size=3)
    assert [p.name.rsplit("/", 1)[1] for p in page1] == ["p6", "p5", "p4"] and token
    clock.tick(seconds=1)
    packs.publish_version("acme", "late", BitMap([1]), template())  # lands before page 1: not repeated
    page2, token = packs.list("acme", page_size=3, page_token=token)
    page3, end = packs.list("acme", page_size=3, page_token=token)
    assert [p.name.rsplit("/", 1)[1] for p in page2 + page3] == ["p3", "p2", "p1", "p0"] and end == ""
    assert len(packs.list("acme")[0]) == 8
    with pytest.raises(InvalidArgument) as caught:
        packs.list("acme", page_size=3, page_token="not-a-token")
    assert caught.value.violations[0][0] == "page_token"
    _, token = packs.list("acme", page_size=1)
    with pytest.raises(InvalidArgument, match="different filter"):
        packs.list("acme", page_size=1, page_token=token, filter="labels.kind=odd")
    with pytest.raises(InvalidArgument):
        packs.list("acme", page_size=-1)


def test_list_filter(packs: PackStore) -> None:
    for i in range(4):
        packs.publish_version(
            "acme", f"p{i}", BitMap([i]), template(kind="odd" if i % 2 else "even", team="a")
        )
    odd, _ = packs.list("acme", filter="labels.kind=odd AND state=READY")
    assert sorted(p.name.rsplit("/", 1)[1] for p in odd) == ["p1", "p3"]
    assert len(packs.list("acme", filter='labels.kind="even" AND labels.team=a')[0]) == 2
    assert packs.list("acme", filter="state=FAILED")[0] == []
    for bad in ("kind=odd", "labels.kind=odd OR state=READY", "state=SHINY"):
        with pytest.raises(InvalidArgument) as caught:
            packs.list("acme", filter=bad)
        assert caught.value.violations[0][0] == "filter"


def test_delete(packs: PackStore) -> None:
    packs.publish_version("acme", "p", BitMap([1]), template())
    packs.publish_version("acme", "p", BitMap([2]), template())
    packs.delete("acme", "p")
    with pytest.raises(NotFound):
        packs.get("acme", "p")
    assert list(packs.store.list("packs/acme/p/")) == []
    with pytest.raises(NotFound):
        packs.delete("acme", "p")
    assert packs.publish_version("acme", "p", BitMap([3]), template()).version == 1


def test_ttl_expiry(packs: PackStore, clock: Clock) -> None:
    pack = template()
    pack.ttl.CopyFrom(duration_pb2.Duration(seconds=3600))
    stored = packs.publish_version("acme", "short", BitMap([1]), pack)
    assert stored.expire_time.ToDatetime(UTC) == clock.now + timedelta(hours=1)
    packs.publish_version("acme", "forever", BitMap([1]), template())
    clock.tick(minutes=59)
    assert packs.get("acme", "short").version == 1
    clock.tick(minutes=2)
    with pytest.raises(NotFound):
        packs.get("acme", "short")
    with pytest.raises(NotFound):
        packs.load_bitmap("acme", "short")
    assert [p.name for p in packs.list("acme")[0]] == ["tenants/acme/packs/forever"]
    # Publishing again renews it, as a new pack (its old life is over).
    renewed = packs.publish_version("acme", "short", BitMap([2]), pack)
    assert renewed.version == 2 and renewed.create_time.ToDatetime(UTC) == clock.now
    clock.tick(hours=2)
    assert packs.purge_expired("acme") == ["tenants/acme/packs/short"]
    assert list(packs.store.list("packs/acme/short/")) == [] and packs.exists("acme", "forever")


def test_ids_are_checked(packs: PackStore) -> None:
    with pytest.raises(InvalidArgument) as caught:
        packs.publish_version("Acme", "9p", BitMap([1]), template())
    assert [f for f, _ in caught.value.violations] == ["tenant", "pack_id"]
    with pytest.raises(NotFound):
        packs.get("acme", "../x")


def test_per_shard_layout(packs: PackStore) -> None:
    members = BitMap(range(0, 20_000, 3))
    stored = packs.publish_version("acme", "big", members, template(), shards=4)
    keys = sorted(i.key for i in packs.store.list("packs/acme/big/v000001/"))
    assert keys == ["packs/acme/big/v000001/manifest.json"] + [
        f"packs/acme/big/v000001/members-{i:03d}-of-004.roaring" for i in range(4)
    ]
    assert stored.size == len(members) and packs.load_bitmap("acme", "big")[0] == members


def test_stage_and_merge_shards(packs: PackStore) -> None:
    members = BitMap(range(1, 30_000, 5))
    parts = [(s, BitMap(x for x in members if s.owns_user(x))) for s in Shard.all(3)]
    stats = pack_pb2.BuildStats(files_total=6, files_read=2, events_matched=5, dataset_version=1)
    for shard, part in parts[:2]:
        packs.stage_shard(
            "acme", "p", "run-1", shard, part, template(), stats, files_read=[f"f{shard.index}", "f9"]
        )
    with pytest.raises(FailedPrecondition) as caught:
        packs.merge_shards("acme", "p", "run-1", 3)
    assert "2/3" in caught.value.message and "0/3" not in caught.value.message
    assert not packs.exists("acme", "p")
    with pytest.raises(ValueError, match="outside shard"):
        packs.stage_shard("acme", "p", "run-1", parts[2][0], parts[0][1], template(), stats)
    packs.stage_shard("acme", "p", "run-1", parts[2][0], parts[2][1], template(), stats, files_read=["f2"])
    assert [p.shard for p in packs.staged_parts("acme", "p", "run-1")] == Shard.all(3)
    merged = packs.merge_shards("acme", "p", "run-1", 3)
    assert merged.version == 1 and merged.size == len(members)
    assert packs.load_bitmap("acme", "p")[0] == members
    assert merged.build_stats.files_read == 4 and merged.build_stats.events_matched == 15  # distinct files
    assert merged.build_stats.shard == "0/1"
    assert list(packs.store.list("packs/acme/p/staging/")) == []


def test_merge_refuses_inconsistent_shards(packs: PackStore) -> None:
    other = template()
    other.spec.CopyFrom(spec_from_data({"shortcut": {"kind": "followers", "window": {"last": "24h"}}}))
    packs.stage_shard(
        "acme", "p", "r", Shard(0, 2), BitMap([s for s in range(100) if Shard(0, 2).owns_user(s)]), template()
    )
    packs.stage_shard(
        "acme", "p", "r", Shard(1, 2), BitMap([s for s in range(100) if Shard(1, 2).owns_user(s)]), other
    )
    with pytest.raises(FailedPrecondition, match="another spec"):
        packs.merge_shards("acme", "p", "r", 2)


def test_resolvers_hide_other_tenants(packs: PackStore) -> None:
    packs.publish_version("acme", "p", BitMap([1, 2]), template())
    packs.publish_version("rival", "p", BitMap([3]), template())
    resolve = packs.resolve_pack("acme")
    assert resolve("tenants/acme/packs/p", 0) == (BitMap([1, 2]), 1)
    for name in ("tenants/rival/packs/p", "tenants/acme/packs/nope", "garbage"):
        with pytest.raises(NotFound) as caught:
            resolve(name, 0)
        assert caught.value.name == name
    spec, version = packs.resolve_spec("acme")("tenants/acme/packs/p", 1)
    assert spec == SPEC and version == 1
    assert isinstance(spec, spec_pb2.PackSpec)


def test_corrupt_data_is_detected(packs: PackStore) -> None:
    packs.publish_version("acme", "p", BitMap([1, 2]), template())
    packs.store.put_bytes("packs/acme/p/v000001/members.roaring", bytes(BitMap([1, 2, 3]).serialize()))
    with pytest.raises(FailedPrecondition, match="does not match"):
        packs.load_bitmap("acme", "p")
