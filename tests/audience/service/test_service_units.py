"""The service's building blocks without a server: membership checks, estimates, tokens, operations."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import pack_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from services.audience.membership import (
    MembershipCache,
    as_user_ids,
    check_batch,
    dense_bits,
    membership_response,
)
from services.audience.operations import OperationManager
from services.audience.servicer import ExportToken, sample_shard, scale_estimate, shard_fraction
from services.audience.tenancy import Tenancy, parse_operation_name, parse_pack_name, parse_parent
from services.runtime import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from services.runtime.assertion import AssertionSigner, Caller, load_assertion_key

ids_strategy = st.lists(st.integers(min_value=0, max_value=2**64 - 1), min_size=0, max_size=300)


@settings(max_examples=150, deadline=None)
@given(
    ids=ids_strategy,
    members=st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=300),
    small=st.lists(st.integers(min_value=0, max_value=500), max_size=300),
)
def test_check_batch_equals_a_per_id_loop(ids: list[int], members: list[int], small: list[int]) -> None:
    bitmaps = [BitMap(members), BitMap(small), BitMap()]
    ids = ids + small[:50] + [2**32 + m for m in small[:5]]  # members, and their uint32 aliases
    dense = [dense_bits(b, 1 << 20) for b in bitmaps]  # the first is usually too sparse: Roaring
    for flags in (check_batch(bitmaps, as_user_ids(ids)), check_batch(bitmaps, as_user_ids(ids), dense)):
        for bitmap, hit in zip(bitmaps, flags, strict=True):
            assert hit.tolist() == [uid < 2**32 and uid in bitmap for uid in ids]


def test_membership_response_equals_the_plain_construction() -> None:
    rng = np.random.default_rng(0)
    flags = [rng.random(n) < 0.4 for n in (1000, 1000, 0)]
    names = ["tenants/t/packs/a", "tenants/t/packs/é", "tenants/t/packs/c"]
    built = membership_response(names, [3, 300, 0], flags)
    plain = api.CheckMembershipResponse(
        results=[
            api.PackMembership(pack=n, version=v, members=f.tolist())
            for n, v, f in zip(names, [3, 300, 0], flags, strict=True)
        ]
    )
    assert built == plain


def test_membership_cache_refreshes_within_the_interval(tmp_path) -> None:
    class Packs:
        def __init__(self) -> None:
            self.version, self.reads = 1, 0

        def get(self, tenant, pack_id, version=0):
            if self.version == 0:
                raise NotFound("flashcrowd.dev/Pack", f"tenants/{tenant}/packs/{pack_id}")
            return pack_pb2.Pack(version=self.version)

        def load_bitmap(self, tenant, pack_id, version=0):
            self.reads += 1
            return BitMap([version]), pack_pb2.Pack(version=version)

    import asyncio

    now = [0.0]
    packs = Packs()
    cache = MembershipCache(packs, capacity=2, refresh_ms=1000, clock=lambda: now[0])

    async def run() -> None:
        assert (await cache.get("t", "a")).version == 1
        packs.version = 2
        now[0] = 0.5
        assert (await cache.get("t", "a")).version == 1  # pointer still fresh
        now[0] = 1.6
        got = await cache.get("t", "a")
        assert got.version == 2 and list(got.bitmap) == [2]
        await cache.get("t", "b")
        await cache.get("t", "c")  # evicts "a" (capacity 2)
        assert len(cache) == 2
        packs.version = 0
        now[0] = 5.0
        with pytest.raises(NotFound):
            await cache.get("t", "a")

    asyncio.run(run())
    assert packs.reads == 4


def test_scale_estimate_and_sample_shards() -> None:
    assert scale_estimate(500, 1.0) == (500, 500, 500)
    est, lo, hi = scale_estimate(400, 0.25)
    assert est == 1600 and lo < 1600 < hi and lo >= 400
    assert scale_estimate(0, 0.125) == (0, 0, 24)
    assert shard_fraction(sample_shard(1 / 16)) == 1 / 16
    assert shard_fraction(sample_shard(1.0)) == 1.0
    assert 0.001 < shard_fraction(sample_shard(0.000001)) <= 1 / 256 + 1e-9
    # Coverage: the interval holds the truth ~95% of the time for a binomial sample.
    rng = np.random.default_rng(5)
    truth, f = 20_000, 1 / 16
    inside = sum(
        lo <= truth <= hi
        for _, lo, hi in (scale_estimate(int(rng.binomial(truth, f)), f) for _ in range(2000))
    )
    assert 0.93 < inside / 2000 < 0.97


def test_export_token_roundtrip_and_garbage() -> None:
    token = ExportToken("tenants/t/packs/p", 3, 2, 12345)
    assert ExportToken.decode(token.encode()) == token
    for garbage in ("", "abc", "W10", ExportToken("x", 1, 1, 1).encode()[:-3] + "!!"):
        with pytest.raises(InvalidArgument) as caught:
            ExportToken.decode(garbage)
        assert caught.value.violations[0][0] == "page_token"


def test_names_and_tenancy() -> None:
    assert parse_parent("tenants/acme") == "acme"
    assert parse_pack_name("tenants/acme/packs/p-1") == ("acme", "p-1")
    assert parse_operation_name("tenants/acme/operations/0123abcd") == ("acme", "0123abcd")
    for bad in ("", "tenants/", "tenants/Acme", "tenants/acme/packs", "acme"):
        with pytest.raises(InvalidArgument):
            parse_parent(bad)
    with pytest.raises(InvalidArgument) as caught:
        parse_pack_name("tenants/acme/packs/UPPER", "packs[2]")
    assert caught.value.violations[0][0] == "packs[2]"

    class Context:
        def __init__(self, metadata):
            self._metadata = metadata

        def invocation_metadata(self):
            return self._metadata

    signer = AssertionSigner(load_assertion_key())
    method = "/flashcrowd.audience.v1.AudienceService/GetPack"

    def asserted(caller: Caller) -> Context:
        return Context((signer.metadata(caller, method),))

    tenancy = Tenancy()
    assert tenancy.authorize(asserted(Caller.platform("job")), "acme") == "acme"  # platform: any tenant
    assert tenancy.authorize(asserted(Caller.for_tenant("acme")), "acme") == "acme"
    with pytest.raises(NotFound) as caught:
        tenancy.authorize(asserted(Caller.for_tenant("evil")), "acme", name="tenants/acme/packs/p")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and caught.value.name == "tenants/acme/packs/p"
    with pytest.raises(PermissionDenied):
        tenancy.require_members(asserted(Caller.for_tenant("acme", scopes={"packs.read"})))
    tenancy.require_members(asserted(Caller.platform("ad-serving", {"members.read"})))


def _operation_store(tmp_path):
    from services.audience.control_db import ControlDatabase
    from services.audience.operation_store import OperationStore

    return OperationStore(ControlDatabase(f"sqlite:///{tmp_path}/control.sqlite3", ""))


def test_operation_manager_queue_cancel_and_limits(tmp_path) -> None:
    import asyncio

    store = _operation_store(tmp_path)
    manager = OperationManager(store, max_workers=1, max_queued=1, retry_after_seconds=2)
    gate = threading.Event()
    started = threading.Event()

    def blocker(ctx):
        started.set()
        gate.wait(10)
        return pack_pb2.Pack(name="first")

    async def run() -> None:
        first = await manager.start("t", "Test", blocker, api.BuildPackMetadata())
        started.wait(5)
        queued = await manager.start(
            "t", "Test", lambda ctx: pack_pb2.Pack(name="never"), api.BuildPackMetadata()
        )
        with pytest.raises(ResourceExhausted) as caught:
            await manager.start("t", "Test", lambda ctx: None, api.BuildPackMetadata())
        assert caught.value.retry_after_seconds == 2
        manager.cancel("t", queued.name.rsplit("/", 1)[1])  # never runs
        op = manager.get("t", queued.name.rsplit("/", 1)[1])
        assert op.done and op.error.code == grpc.StatusCode.CANCELLED.value[0]
        gate.set()
        done = await manager.wait("t", first.name.rsplit("/", 1)[1], timeout=10)
        assert done.done and not done.HasField("error")
        # A job that raises an unexpected exception: INTERNAL, generic message, no stack trace.
        boom = await manager.start("t", "Test", lambda ctx: 1 / 0, api.BuildPackMetadata())
        failed = await manager.wait("t", boom.name.rsplit("/", 1)[1], timeout=10)
        assert (
            failed.error.code == grpc.StatusCode.INTERNAL.value[0] and "division" not in failed.error.message
        )
        assert manager.running() == 0
        await manager.close(1)

    asyncio.run(run())
    # Everything was recorded in the control database, all three finished.
    assert store.count("t", "done") == 3 and store.count("t", "queued") == 0


def test_claims_serve_the_tenant_with_fewest_running_then_least_recently_served(tmp_path) -> None:
    from services.audience.operation_store import StoredOperation

    store = _operation_store(tmp_path)
    for n, tenant in enumerate(["a", "a", "a", "a", "b", "c"]):
        op_id = f"{n:024x}"
        row = StoredOperation(tenant=tenant, op_id=op_id, kind="Test", state="queued", record=b"",
                              portable=True)  # fmt: skip
        assert store.insert(row, payload=b"", trace="", owner="", lease_until=0.0,
                            tenant_queued_limit=None, active_limit=None) == (None, "")  # fmt: skip

    def claim():
        claimed = store.claim("w", 1e12, portable=True, pinned=False, max_running=2)
        return None if claimed is None else (claimed.operation.tenant, int(claimed.operation.op_id, 16))

    # Nobody runs anything: the oldest (a) first, then b and c (0 running) before a's second.
    assert [claim(), claim(), claim()] == [("a", 0), ("b", 4), ("c", 5)]
    assert claim() == ("a", 1) and claim() is None  # a is at its cap of 2; nobody else waits
    assert store.finish("a", f"{0:024x}", b"done", owner="w")
    assert claim() == ("a", 2)
    # A finished row never changes again, whoever asks.
    assert not store.finish("a", f"{0:024x}", b"again", owner="w")
    assert not store.finish("a", f"{0:024x}", b"again", owner=None)
    assert store.get("a", f"{0:024x}").record == b"done"
