"""CheckMembership and ExportPack over real gRPC, on both stores."""

from __future__ import annotations

import grpc
import numpy as np
import polars as pl
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api

from services.audience.servicer import ExportToken
from services.runtime import error_details
from tests.audience.service.specs import ET, INCLUDE_BOTS, behavior

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _two_packs(svc, tenant: str):
    start, end = svc.dataset.start, svc.dataset.end
    clickers = await svc.create_pack(
        tenant, behavior([ET.EVENT_TYPE_CLICK], start, end), options=INCLUDE_BOTS
    )
    payers = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_PAY], start, end), options=INCLUDE_BOTS)
    return clickers, payers


async def test_check_membership_matches_the_bitmaps(svc) -> None:
    tenant = svc.new_tenant()
    clickers, payers = await _two_packs(svc, tenant)
    bitmaps = {
        p.name: svc.app.packs.load_bitmap(tenant, p.name.rsplit("/", 1)[1])[0] for p in (clickers, payers)
    }
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6000, 2000).tolist()
    ids += list(bitmaps[payers.name])[:50]  # certainly some members
    ids += [2**32, 2**32 + int(next(iter(bitmaps[clickers.name]))), 2**64 - 1]  # beyond uint32: never members
    names = [clickers.name, payers.name, clickers.name]
    response = await svc.stub.CheckMembership(
        api.CheckMembershipRequest(parent=f"tenants/{tenant}", packs=names, user_ids=ids)
    )
    assert [r.pack for r in response.results] == names
    for result in response.results:
        assert result.version == 1
        assert list(result.members) == [uid < 2**32 and uid in bitmaps[result.pack] for uid in ids]
    assert any(response.results[1].members) and not all(response.results[1].members)


async def test_membership_sees_a_refresh_and_a_delete(svc) -> None:
    tenant = svc.new_tenant()
    start, end = svc.dataset.start, svc.dataset.end
    pack = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_FOLLOW], start, end), options=INCLUDE_BOTS)
    request = api.CheckMembershipRequest(parent=f"tenants/{tenant}", packs=[pack.name], user_ids=[1, 2, 3])
    assert (await svc.stub.CheckMembership(request)).results[0].version == 1
    op = await svc.stub.RefreshPack(api.RefreshPackRequest(name=pack.name))
    await svc.wait(op.name)
    assert (await svc.stub.CheckMembership(request)).results[0].version == 2
    await svc.stub.DeletePack(api.DeletePackRequest(name=pack.name))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await svc.stub.CheckMembership(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_export_pages_resume_and_hashes(svc) -> None:
    tenant = svc.new_tenant()
    clickers, _ = await _two_packs(svc, tenant)
    members = svc.app.packs.load_bitmap(tenant, clickers.name.rsplit("/", 1)[1])[0]
    assert len(members) > 250

    pages = [
        page
        async for page in svc.stub.ExportPack(
            api.ExportPackRequest(name=clickers.name, format=api.EXPORT_FORMAT_USER_ID, page_size=100)
        )
    ]
    assert len(pages) == -(-len(members) // 100)
    assert [uid for p in pages for uid in p.user_ids] == list(members)  # in id order, no gaps or repeats
    assert pages[-1].next_page_token == "" and pages[-1].exported == pages[-1].total == len(members)
    assert all(p.total == len(members) for p in pages)

    # Resume from the token of page 2: continues exactly with page 3.
    resumed = [
        page
        async for page in svc.stub.ExportPack(
            api.ExportPackRequest(
                name=clickers.name,
                format=api.EXPORT_FORMAT_USER_ID,
                page_size=100,
                page_token=pages[1].next_page_token,
            )
        )
    ]
    assert [uid for p in resumed for uid in p.user_ids] == [uid for p in pages[2:] for uid in p.user_ids]

    # A refresh after the first page does not disturb an export resumed from its token (pinned version).
    op = await svc.stub.RefreshPack(api.RefreshPackRequest(name=clickers.name))
    await svc.wait(op.name)
    pinned = [
        uid
        async for page in svc.stub.ExportPack(
            api.ExportPackRequest(
                name=clickers.name,
                format=api.EXPORT_FORMAT_USER_ID,
                page_size=100,
                page_token=pages[0].next_page_token,
            )
        )
        for uid in page.user_ids
    ]
    assert pinned == list(members)[100:]

    # Keyed export == the identity map's keyed hashes of the members (HMAC hex, never plain digests).
    identity = svc.dataset.scan_identity().collect()
    for fmt, id_type in (
        (api.EXPORT_FORMAT_KEYED_SHA256_PHONE, 1),
        (api.EXPORT_FORMAT_KEYED_SHA256_OAID, 2),
    ):
        keyed = [
            h
            async for page in svc.stub.ExportPack(
                api.ExportPackRequest(name=clickers.name, format=fmt, page_size=64, version=1)
            )
            for h in page.hashed_ids
        ]
        expected = (
            identity.filter(pl.col("id_type") == id_type)
            .filter(pl.col("user_id").is_in(list(members)))
            .get_column("key_sha256")
            .to_list()
        )
        assert sorted(keyed) == sorted(expected) and len(expected) > 0
        assert all(len(h) == 64 for h in keyed)


async def test_plain_digest_exports_are_refused(svc) -> None:
    tenant = svc.new_tenant()
    clickers, _ = await _two_packs(svc, tenant)
    for fmt, instead in (
        (api.EXPORT_FORMAT_SHA256_PHONE, "EXPORT_FORMAT_KEYED_SHA256_PHONE"),
        (api.EXPORT_FORMAT_MD5_PHONE, "EXPORT_FORMAT_KEYED_SHA256_PHONE"),
        (api.EXPORT_FORMAT_SHA256_OAID, "EXPORT_FORMAT_KEYED_SHA256_OAID"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in svc.stub.ExportPack(api.ExportPackRequest(name=clickers.name, format=fmt)):
                pass
        details = error_details(caught.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT
        [(field, description)] = details.field_violations
        assert field == "format" and "refused" in description
        assert instead in description and "EXPORT_FORMAT_USER_ID" in description


async def test_export_tokens_are_bound_to_pack_version_and_format(svc) -> None:
    tenant = svc.new_tenant()
    clickers, payers = await _two_packs(svc, tenant)
    first = None
    async for page in svc.stub.ExportPack(
        api.ExportPackRequest(name=clickers.name, format=api.EXPORT_FORMAT_USER_ID, page_size=10)
    ):
        first = page
        break
    assert first is not None and first.next_page_token
    bad = {
        "another pack": api.ExportPackRequest(
            name=payers.name, format=api.EXPORT_FORMAT_USER_ID, page_token=first.next_page_token
        ),
        "another version": api.ExportPackRequest(
            name=clickers.name, format=api.EXPORT_FORMAT_USER_ID, page_token=first.next_page_token, version=2
        ),
        "another format": api.ExportPackRequest(
            name=clickers.name, format=api.EXPORT_FORMAT_KEYED_SHA256_PHONE, page_token=first.next_page_token
        ),
        "garbage": api.ExportPackRequest(
            name=clickers.name, format=api.EXPORT_FORMAT_USER_ID, page_token="%%%"
        ),
        "beyond the end": api.ExportPackRequest(
            name=clickers.name,
            format=api.EXPORT_FORMAT_USER_ID,
            page_token=ExportToken(clickers.name, 1, api.EXPORT_FORMAT_USER_ID, 10**9).encode(),
        ),
    }
    for label, request in bad.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in svc.stub.ExportPack(request):
                pass
        details = error_details(caught.value)
        assert details.code == grpc.StatusCode.INVALID_ARGUMENT, label
        assert [f for f, _ in details.field_violations] == ["page_token"], label


async def test_check_membership_on_live_packs(svc) -> None:
    from pyroaring import BitMap

    from services.runtime import NotFound

    tenant = svc.new_tenant()
    start, end = svc.dataset.start, svc.dataset.end
    stored = await svc.create_pack(tenant, behavior([ET.EVENT_TYPE_PAY], start, end), options=INCLUDE_BOTS)
    live_name = f"tenants/{tenant}/livePacks/warm-clickers"
    request = api.CheckMembershipRequest(
        parent=f"tenants/{tenant}", packs=[live_name, stored.name], user_ids=[1, 2, 3, 4]
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # no live-pack service in this process
        await svc.stub.CheckMembership(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    class Live:
        def live_members(self, tenant_id: str, live_id: str) -> tuple[int, BitMap]:
            if (tenant_id, live_id) != (tenant, "warm-clickers"):
                raise NotFound("flashcrowd.dev/LivePack", f"tenants/{tenant_id}/livePacks/{live_id}")
            return 42, BitMap([2, 4])

    svc.app.servicer.live_packs = Live()
    try:
        response = await svc.stub.CheckMembership(request)
        assert (response.results[0].pack, response.results[0].version) == (live_name, 42)
        assert list(response.results[0].members) == [False, True, False, True]
        assert response.results[1].version == 1
        for name, code in (
            (f"tenants/{tenant}/livePacks/other", grpc.StatusCode.NOT_FOUND),
            ("tenants/someone-else/livePacks/warm-clickers", grpc.StatusCode.NOT_FOUND),
            (f"tenants/{tenant}/livePacks/Bad_Id", grpc.StatusCode.INVALID_ARGUMENT),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await svc.stub.CheckMembership(
                    api.CheckMembershipRequest(parent=f"tenants/{tenant}", packs=[name], user_ids=[1])
                )
            assert caught.value.code() == code, name
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert [f for f, _ in error_details(caught.value).field_violations] == ["packs[0]"]
    finally:
        svc.app.servicer.live_packs = None
