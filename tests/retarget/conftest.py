"""Fixtures of the retarget tests: a real audience server, real retarget servers on both ledgers.

* ``audience`` (session): a generated world (24,000 users, 2 days) in a local store and a real
  audience server on port 0; ``audience.upload(tenant, user_ids)`` makes an exact pack through
  UploadPack (SHA-256 of the users' simulated phone numbers, as an advertiser would send them;
  the identity map itself holds keyed hashes only), ``audience.spec_pack`` builds
  one from a spec (CreatePack).
* ``pg_url`` (function): a throwaway PostgreSQL database, dropped afterwards; PostgreSQL tests
  are skipped with a message when 127.0.0.1:5432 does not answer.
* ``rt`` (session, parametrized "sqlite" / "postgresql"): a retarget server over that ledger,
  talking to the audience server. Tests share it and isolate themselves by tenant (``rt.tenant()``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import polars as pl
import pytest
import pytest_asyncio
from flashcrowd.audience.v1 import audience_service_pb2, audience_service_pb2_grpc, pack_pb2
from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2, retarget_service_pb2, retarget_service_pb2_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from services.audience.config import AudienceSettings
from services.audience.server import AudienceApp, create_audience_server
from services.audience.spec_io import spec_from_data
from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate, synthetic_identities
from services.events.identity import hash_identifier
from services.events.schema import IdType
from services.retarget.config import RetargetSettings
from services.retarget.server import RetargetApp, create_retarget_server
from services.runtime import load_settings
from services.storage import LocalObjectStore
from tests.fixtures.channels import backend_channel
from tests.fixtures.postgres import create_pg_database, drop_pg_database, pg_reachable

WORLD = GenConfig(users=24_000, days=2, seed=11)


# --- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_available() -> None:
    reason = pg_reachable()
    if reason is not None:
        pytest.skip(f"skipping PostgreSQL test: {reason}")


@pytest.fixture
def pg_url(pg_available: None) -> Iterator[str]:
    url = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(url)


# --- the audience service ----------------------------------------------------------------------


@dataclass
class Audience:
    settings: AudienceSettings
    server: grpc.aio.Server
    port: int
    app: AudienceApp
    channel: grpc.aio.Channel
    stub: audience_service_pb2_grpc.AudienceServiceStub
    ops: operations_pb2_grpc.OperationsStub
    phone_hash: dict[int, str]
    world: dict[str, Any]
    store_url: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def users(self) -> list[int]:
        """Users with a phone hash (uploadable), ascending."""
        return sorted(self.phone_hash)

    async def upload(self, tenant: str, user_ids: Sequence[int], pack_id: str | None = None) -> pack_pb2.Pack:
        """A pack of exactly these users (UploadPack of their phone hashes)."""
        pack_id = pack_id or f"p-{uuid.uuid4().hex[:10]}"
        hashes = [self.phone_hash[user] for user in user_ids]

        async def requests() -> AsyncIterator[audience_service_pb2.UploadPackRequest]:
            yield audience_service_pb2.UploadPackRequest(
                header=audience_service_pb2.UploadPackHeader(
                    parent=f"tenants/{tenant}",
                    pack_id=pack_id,
                    id_type=audience_service_pb2.ID_TYPE_PHONE,
                    hash_type=audience_service_pb2.HASH_TYPE_SHA256,
                )
            )
            for start in range(0, len(hashes), 5000):
                yield audience_service_pb2.UploadPackRequest(
                    chunk=audience_service_pb2.UploadPackChunk(hashed_ids=hashes[start : start + 5000])
                )

        response = await self.stub.UploadPack(requests())
        assert response.pack.size == len(set(user_ids)), response.stats
        return response.pack

    async def spec_pack(self, tenant: str, spec: dict[str, Any], pack_id: str | None = None) -> pack_pb2.Pack:
        """A pack built from a spec document (CreatePack, waited for)."""
        request = audience_service_pb2.CreatePackRequest(
            parent=f"tenants/{tenant}",
            pack_id=pack_id or f"p-{uuid.uuid4().hex[:10]}",
            pack=pack_pb2.Pack(spec=spec_from_data(spec)),
        )
        operation = await self.stub.CreatePack(request)
        operation = await self.ops.WaitOperation(
            operations_pb2.WaitOperationRequest(
                name=operation.name, timeout=duration_pb2.Duration(seconds=60)
            )
        )
        assert operation.done and not operation.HasField("error"), operation.error
        pack = pack_pb2.Pack()
        operation.response.Unpack(pack)
        return pack


@pytest.fixture(scope="session")
def audience_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalObjectStore, str]:
    root: Path = tmp_path_factory.mktemp("retarget-world") / "store"
    store = LocalObjectStore(root)
    generate(store, WORLD)
    return store, str(root)


@pytest_asyncio.fixture(scope="session")
async def audience(audience_store: tuple[LocalObjectStore, str]) -> AsyncIterator[Audience]:
    store, url = audience_store
    settings = load_settings(AudienceSettings, store_url=url, port=0, grace_seconds=0.5, log_json=False)
    server, port, app = await create_audience_server(settings)
    dataset = EventDataset(store, settings.dataset_prefix)
    phone_users = (
        dataset.scan_identity(["user_id", "id_type"])
        .filter(pl.col("id_type") == int(IdType.PHONE))
        .collect()
        .get_column("user_id")
    )
    phone_hash = {
        user: hash_identifier(kind, raw)[0]
        for user, kind, raw in synthetic_identities(phone_users.to_numpy(), WORLD.seed)
        if kind == IdType.PHONE
    }
    assert len(phone_hash) == len(phone_users)
    channel = backend_channel(f"127.0.0.1:{port}")
    try:
        yield Audience(
            settings=settings,
            server=server,
            port=port,
            app=app,
            channel=channel,
            stub=audience_service_pb2_grpc.AudienceServiceStub(channel),
            ops=operations_pb2_grpc.OperationsStub(channel),
            phone_hash=phone_hash,
            world=dataset.world,
            store_url=url,
        )
    finally:
        await channel.close()
        await server.stop(0.5)
        await app.close()


# --- the retarget service ----------------------------------------------------------------------

Stub = retarget_service_pb2_grpc.RetargetServiceStub
TERMINAL = (campaign_pb2.Campaign.STATE_COMPLETED, campaign_pb2.Campaign.STATE_CANCELLED)


def retarget_settings(database_url: str, audience_target: str, **overrides: Any) -> RetargetSettings:
    values: dict[str, Any] = dict(
        database_url=database_url,
        audience_target=audience_target,
        port=0,
        grace_seconds=0.5,
        log_json=False,
        launch_batch_size=500,
        launch_page_size=4000,
        stream_poll_seconds=0.1,
        pool_max_size=12,
    )
    values.update(overrides)
    return load_settings(RetargetSettings, **values)


@dataclass
class Rt:
    """A running retarget server and helpers to drive it."""

    kind: str
    url: str
    server: grpc.aio.Server
    port: int
    app: RetargetApp
    channel: grpc.aio.Channel
    stub: Stub
    ops: operations_pb2_grpc.OperationsStub
    audience: Audience
    _ids: Iterator[int] = field(default_factory=lambda: iter(range(1, 10**9)))

    @staticmethod
    def tenant() -> str:
        return f"t{uuid.uuid4().hex[:10]}"

    def new_id(self, prefix: str = "x") -> str:
        return f"{prefix}-{next(self._ids)}-{uuid.uuid4().hex[:6]}"

    async def template(
        self, tenant: str, template_id: str | None = None, **fields: Any
    ) -> coupon_pb2.CouponTemplate:
        if "fixed_amount" not in fields and "percent_off" not in fields:
            fields["fixed_amount"] = coupon_pb2.FixedAmountOff(amount_fen=1000)
        return await self.stub.CreateCouponTemplate(
            retarget_service_pb2.CreateCouponTemplateRequest(
                parent=f"tenants/{tenant}",
                coupon_template_id=template_id or self.new_id("tpl"),
                coupon_template=coupon_pb2.CouponTemplate(**fields),
            )
        )

    async def campaign(
        self, tenant: str, pack: str, template: str, campaign_id: str | None = None, **fields: Any
    ) -> campaign_pb2.Campaign:
        return await self.stub.CreateCampaign(
            retarget_service_pb2.CreateCampaignRequest(
                parent=f"tenants/{tenant}",
                campaign_id=campaign_id or self.new_id("cmp"),
                campaign=campaign_pb2.Campaign(audience_pack=pack, coupon_template=template, **fields),
            )
        )

    async def launch(self, name: str, *, wait: bool = True, timeout: float = 60) -> campaign_pb2.Campaign:
        await self.stub.LaunchCampaign(retarget_service_pb2.LaunchCampaignRequest(name=name))
        if not wait:
            return await self.get(name)
        return await self.wait_state(name, (*TERMINAL, campaign_pb2.Campaign.STATE_PAUSED), timeout=timeout)

    async def get(self, name: str) -> campaign_pb2.Campaign:
        return await self.stub.GetCampaign(retarget_service_pb2.GetCampaignRequest(name=name))

    async def wait_state(
        self, name: str, states: Sequence[int], timeout: float = 60
    ) -> campaign_pb2.Campaign:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            campaign = await self.get(name)
            if campaign.state in states:
                return campaign
            assert loop.time() < deadline, (
                f"{name} still {campaign.state} after {timeout}s: {campaign.progress}"
            )
            await asyncio.sleep(0.05)

    async def sql(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.app.db.run(fn, *args, **kwargs)


async def start_rt(kind: str, url: str, audience: Audience, **overrides: Any) -> Rt:
    settings = retarget_settings(url, audience.target, **overrides)
    server, port, app = await create_retarget_server(settings)
    channel = backend_channel(f"127.0.0.1:{port}")
    return Rt(
        kind=kind,
        url=url,
        server=server,
        port=port,
        app=app,
        channel=channel,
        stub=Stub(channel),
        ops=operations_pb2_grpc.OperationsStub(channel),
        audience=audience,
    )


async def stop_rt(rt: Rt) -> None:
    await rt.channel.close()
    await rt.server.stop(0.5)
    await rt.app.close()


@pytest_asyncio.fixture(scope="session", params=["sqlite", "postgresql"])
async def rt(
    request: pytest.FixtureRequest, audience: Audience, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Rt]:
    if request.param == "postgresql":
        reason = pg_reachable()
        if reason is not None:
            pytest.skip(f"skipping PostgreSQL variant: {reason}")
        url = create_pg_database()
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('retarget-ledger') / 'retarget.db'}"
    service = await start_rt(request.param, url, audience)
    try:
        yield service
    finally:
        await stop_rt(service)
        if request.param == "postgresql":
            drop_pg_database(url)
