"""Tenants see counts under differential privacy; the platform sees them exactly.

The attacks of issue 12 against the real audience server: a pack differing from another in one
person (differencing of personas, the union with a 1-member pack), a tiny pack's size, copies of a
pack to average noise away, and a tenant asking past its privacy budget. Each test also asks as the
platform, which sees the exact figures, to show that the attack would succeed without the mechanism.
"""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import pack_pb2, spec_pb2
from google.longrunning import operations_pb2

from services.audience.uploads import upload_requests
from services.events.generator import synthetic_identities
from services.events.identity import IdType, hash_identifier
from services.runtime import error_details
from tests.audience.conftest import WORLD
from tests.audience.service.conftest import Service, start_service, stop_service
from tests.audience.service.specs import ET, behavior
from tests.fixtures.channels import as_tenant

pytestmark = pytest.mark.asyncio(loop_scope="session")

_ALWAYS = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


def _did(event_type: int) -> spec_pb2.PackSpec:
    return behavior([event_type], *_ALWAYS)


#: Anyone who viewed a product: most of the small world (well above the persona minimum).
VIEWERS = _did(ET.EVENT_TYPE_PRODUCT_VIEW)


async def _stream(messages):
    for message in messages:
        yield message


async def _upload_one(svc: Service, tenant: str, user: int) -> pack_pb2.Pack:
    """A 1-member pack of ``user``, uploaded by its phone number (what an attacker would do)."""
    phones = {u: raw for u, kind, raw in synthetic_identities([user], WORLD.seed) if kind == IdType.PHONE}
    assert user in phones, "pick a user with a phone"
    header = api.UploadPackHeader(
        parent=f"tenants/{tenant}",
        pack_id=svc.new_id("one"),
        id_type=api.ID_TYPE_PHONE,
        hash_type=api.HASH_TYPE_SHA256,
    )
    rows = [hash_identifier("phone", phones[user])[0]]
    response = await svc.stub.UploadPack(_stream(upload_requests(header, rows)), metadata=as_tenant(tenant))
    # The tenant learns neither the size nor whether the phone matched anybody.
    assert response.pack.size == 0 and response.pack.size_disclosure == pack_pb2.SIZE_DISCLOSURE_BELOW_MINIMUM
    assert response.stats.matched == 0 and response.stats.match_rate == 0.0
    assert response.stats.matched_disclosure == pack_pb2.SIZE_DISCLOSURE_BELOW_MINIMUM
    exact = await svc.stub.GetPack(api.GetPackRequest(name=response.pack.name))  # the platform
    assert exact.size == 1 and exact.size_disclosure == pack_pb2.SIZE_DISCLOSURE_EXACT
    return response.pack


def _ref(pack: pack_pb2.Pack) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(pack=spec_pb2.PackReference(pack=pack.name))


def _counts(persona: pack_pb2.PackPersona) -> dict[tuple[str, str], int]:
    return {(d.dimension, b.value): b.count for d in persona.dimensions for b in d.buckets}


@pytest.fixture
async def private(local_world, tmp_path):  # type: ignore[no-untyped-def]
    store, url = local_world
    service = await start_service(
        "local",
        store,
        url,
        persona_min_size=200,
        privacy_daily_budget=40.0,
        control_database_url=f"sqlite:///{tmp_path / 'control.sqlite3'}",
    )
    yield service
    await stop_service(service)


async def test_sizes_are_noisy_for_tenants_exact_for_the_platform(private: Service) -> None:
    svc, tenant = private, private.new_tenant()
    pack = await svc.create_pack(tenant, VIEWERS, metadata=as_tenant(tenant))
    shown = await svc.stub.GetPack(api.GetPackRequest(name=pack.name), metadata=as_tenant(tenant))
    exact = await svc.stub.GetPack(api.GetPackRequest(name=pack.name))
    assert exact.size_disclosure == pack_pb2.SIZE_DISCLOSURE_EXACT
    assert shown.size_disclosure == pack_pb2.SIZE_DISCLOSURE_NOISY
    assert abs(shown.size - exact.size) <= 40  # Laplace(2): far inside 40 with overwhelming odds
    assert shown.build_stats.bots_excluded == 0 and shown.build_stats.events_matched == 0
    # The operation's result, the listing and a repeat all show the same disclosed size.
    listed_ops = await svc.ops.ListOperations(
        operations_pb2.ListOperationsRequest(name=f"tenants/{tenant}"), metadata=as_tenant(tenant)
    )
    done = await svc.ops.GetOperation(
        operations_pb2.GetOperationRequest(name=listed_ops.operations[0].name), metadata=as_tenant(tenant)
    )
    in_operation = pack_pb2.Pack()
    done.response.Unpack(in_operation)
    listed = await svc.stub.ListPacks(
        api.ListPacksRequest(parent=f"tenants/{tenant}"), metadata=as_tenant(tenant)
    )
    again = await svc.stub.GetPack(api.GetPackRequest(name=pack.name), metadata=as_tenant(tenant))
    assert in_operation.size == listed.packs[0].size == again.size == shown.size

    # A hundred copies would average the noise away if each got its own: copies get the same answer,
    # and cost no budget after the first.
    spent = svc.app.discloser.ledger.spent(tenant)
    copies = [await svc.create_pack(tenant, VIEWERS, metadata=as_tenant(tenant)) for _ in range(3)]
    for copy in copies:
        got = await svc.stub.GetPack(api.GetPackRequest(name=copy.name), metadata=as_tenant(tenant))
        assert got.size == shown.size
    assert svc.app.discloser.ledger.spent(tenant) == spent


async def test_estimates_are_noisy_and_tiny_ones_read_fewer_than_the_minimum(private: Service) -> None:
    svc, tenant = private, private.new_tenant()
    request = api.EstimatePackSizeRequest(parent=f"tenants/{tenant}", spec=VIEWERS, sample_fraction=0.5)
    shown = await svc.stub.EstimatePackSize(request, metadata=as_tenant(tenant))
    exact = await svc.stub.EstimatePackSize(request)
    assert exact.disclosure == pack_pb2.SIZE_DISCLOSURE_EXACT
    assert shown.disclosure == pack_pb2.SIZE_DISCLOSURE_NOISY and shown.estimated_size > 0
    assert abs(shown.sample_size - exact.sample_size) <= 40
    one = await _upload_one(svc, tenant, await _user_with_phone())
    tiny = api.EstimatePackSizeRequest(parent=f"tenants/{tenant}", spec=_ref(one), sample_fraction=1.0)
    shown_tiny = await svc.stub.EstimatePackSize(tiny, metadata=as_tenant(tenant))
    assert shown_tiny.estimated_size == shown_tiny.sample_size == 0
    assert shown_tiny.disclosure == pack_pb2.SIZE_DISCLOSURE_BELOW_MINIMUM
    assert (await svc.stub.EstimatePackSize(tiny)).estimated_size == 1  # the platform


async def _user_with_phone() -> int:
    for user, kind, _ in synthetic_identities(list(range(1, 200)), WORLD.seed):
        if kind == IdType.PHONE:
            return user
    raise AssertionError("no user with a phone in the first 200")


async def test_persona_differencing_reveals_nothing_exact_about_the_person(private: Service) -> None:
    """persona(everyone minus X) vs persona(everyone minus X, union {X}): the old attack read X's
    age band, gender, region and categories off the difference; now the difference is noise."""
    svc, tenant = private, private.new_tenant()
    victim = await _user_with_phone()
    one = await _upload_one(svc, tenant, victim)
    without = await svc.create_pack(
        tenant,
        spec_pb2.PackSpec(exclude=spec_pb2.ExcludeOperands(base=VIEWERS, subtract=[_ref(one)])),
        metadata=as_tenant(tenant),
    )
    with_victim = await svc.create_pack(
        tenant,
        spec_pb2.PackSpec(union=spec_pb2.SetOperands(operands=[_ref(without), _ref(one)])),
        metadata=as_tenant(tenant),
    )

    async def persona(name: str, metadata=()) -> pack_pb2.PackPersona:  # type: ignore[no-untyped-def]
        return await svc.stub.GetPackPersona(
            api.GetPackPersonaRequest(name=name, top_n=100), metadata=metadata
        )

    # As the platform (exact counts) the attack works: the difference is X's attributes, each +1.
    exact_a, exact_b = _counts(await persona(without.name)), _counts(await persona(with_victim.name))
    exact_diff = {k: exact_b.get(k, 0) - exact_a.get(k, 0) for k in exact_a.keys() | exact_b.keys()}
    revealed = {k for k, v in exact_diff.items() if v != 0}
    assert revealed and all(exact_diff[k] == 1 for k in revealed)
    assert {dimension for dimension, _ in revealed} >= {"age_band", "gender"}

    # As the tenant: noisy personas; the difference is not X's one-hot vector, and the buckets that
    # differ are not X's buckets.
    shown_a = await persona(without.name, as_tenant(tenant))
    shown_b = await persona(with_victim.name, as_tenant(tenant))
    assert shown_a.disclosure == shown_b.disclosure == pack_pb2.SIZE_DISCLOSURE_NOISY
    a, b = _counts(shown_a), _counts(shown_b)
    diff = {k: b.get(k, 0) - a.get(k, 0) for k in a.keys() | b.keys()}
    assert diff != exact_diff
    changed = {k for k, v in diff.items() if v != 0}
    assert changed != revealed
    assert len(changed) > 2 * len(revealed)  # noise moves many buckets, not just X's
    assert shown_a.bots_excluded == 0
    # Asking again gives the same answer (no averaging by repetition).
    assert _counts(await persona(without.name, as_tenant(tenant))) == a


async def test_privacy_budget_is_enforced_per_tenant(local_world, tmp_path) -> None:
    store, url = local_world
    svc = await start_service(
        "local",
        store,
        url,
        persona_min_size=200,
        privacy_daily_budget=4.0,  # one persona (3.0) and two sizes (0.5 each)
        control_database_url=f"sqlite:///{tmp_path / 'control.sqlite3'}",
    )
    try:
        tenant, other = svc.new_tenant(), svc.new_tenant()
        first = await svc.create_pack(tenant, VIEWERS, metadata=as_tenant(tenant))
        second = await svc.create_pack(tenant, _did(ET.EVENT_TYPE_CLICK), metadata=as_tenant(tenant))
        await svc.stub.GetPackPersona(api.GetPackPersonaRequest(name=first.name), metadata=as_tenant(tenant))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await svc.stub.GetPackPersona(
                api.GetPackPersonaRequest(name=second.name), metadata=as_tenant(tenant)
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = error_details(caught.value)
        assert details.reason == "PRIVACY_BUDGET_EXHAUSTED"
        assert details.quota_failure is not None
        assert details.quota_failure.violations[0].subject == f"tenants/{tenant}"
        # The persona already shown stays available; sizes still fit, then read BUDGET_EXHAUSTED.
        await svc.stub.GetPackPersona(api.GetPackPersonaRequest(name=first.name), metadata=as_tenant(tenant))
        sizes = [
            (
                await svc.stub.GetPack(api.GetPackRequest(name=p.name), metadata=as_tenant(tenant))
            ).size_disclosure
            for p in (first, second)
        ]
        assert sizes == [pack_pb2.SIZE_DISCLOSURE_NOISY, pack_pb2.SIZE_DISCLOSURE_NOISY]
        third = await svc.create_pack(tenant, _did(ET.EVENT_TYPE_ADD_CART), metadata=as_tenant(tenant))
        got = await svc.stub.GetPack(api.GetPackRequest(name=third.name), metadata=as_tenant(tenant))
        assert got.size == 0 and got.size_disclosure == pack_pb2.SIZE_DISCLOSURE_BUDGET_EXHAUSTED
        # Another tenant's budget is its own; the platform is never limited.
        mine = await svc.create_pack(other, VIEWERS, metadata=as_tenant(other))
        await svc.stub.GetPackPersona(api.GetPackPersonaRequest(name=mine.name), metadata=as_tenant(other))
        assert (await svc.stub.GetPack(api.GetPackRequest(name=third.name))).size > 0
    finally:
        await stop_service(svc)
