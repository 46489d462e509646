"""A real audience server per store kind (local directory and the moto S3 server), started once.

``svc`` is parametrized over "local" and "s3": each runs the same tests against a server whose
``FLASHCROWD_STORE_URL`` points at that store, holding the audience tests' small generated world (5,000 users,
3 days). Tests share the server, so each uses fresh pack ids (``svc.new_id()``) and its own tenant
when it lists things.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from flashcrowd.audience.v1 import audience_service_pb2, audience_service_pb2_grpc, pack_pb2, spec_pb2
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from services.audience.config import AudienceSettings
from services.audience.server import AudienceApp, create_audience_server
from services.events.dataset import EventDataset
from services.events.generator import generate
from services.runtime import load_settings
from services.storage import LocalObjectStore, MinioObjectStore, ObjectStore
from tests.audience.conftest import WORLD
from tests.fixtures.channels import backend_channel
from tests.fixtures.s3server import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, s3_url, unique_bucket

PERSONA_MIN = 200
UPLOAD_MAX_ROWS = 3000


@dataclass
class Service:
    kind: str
    store: ObjectStore
    store_url: str
    dataset: EventDataset
    settings: AudienceSettings
    server: grpc.aio.Server
    port: int
    app: AudienceApp
    channel: grpc.aio.Channel
    stub: audience_service_pb2_grpc.AudienceServiceStub
    ops: operations_pb2_grpc.OperationsStub

    def new_id(self, prefix: str = "p") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    def new_tenant(self) -> str:
        return f"t{uuid.uuid4().hex[:10]}"

    async def create(
        self,
        tenant: str,
        spec: spec_pb2.PackSpec,
        *,
        pack_id: str | None = None,
        labels: dict[str, str] | None = None,
        options: spec_pb2.BuildOptions | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> operations_pb2.Operation:
        """CreatePack and wait for the operation; returns the finished operation."""
        request = audience_service_pb2.CreatePackRequest(
            parent=f"tenants/{tenant}",
            pack_id=pack_id or self.new_id(),
            pack=pack_pb2.Pack(spec=spec, labels=labels or {}, options=options),
        )
        op = await self.stub.CreatePack(request, metadata=metadata)
        return await self.wait(op.name)

    async def create_pack(self, tenant: str, spec: spec_pb2.PackSpec, **kwargs) -> pack_pb2.Pack:
        op = await self.create(tenant, spec, **kwargs)
        assert op.done and not op.HasField("error"), op.error
        pack = pack_pb2.Pack()
        op.response.Unpack(pack)
        return pack

    async def wait(self, name: str, seconds: float = 60) -> operations_pb2.Operation:
        op = await self.ops.WaitOperation(
            operations_pb2.WaitOperationRequest(
                name=name, timeout=duration_pb2.Duration(seconds=int(seconds))
            )
        )
        assert op.done, f"{name} not done after {seconds}s"
        return op


def _settings(store_url: str, **overrides) -> AudienceSettings:
    values = dict(
        store_url=store_url,
        port=0,
        grace_seconds=0.5,
        persona_min_size=PERSONA_MIN,
        upload_max_rows=UPLOAD_MAX_ROWS,
        membership_refresh_ms=200,
        log_json=False,
    )
    values.update(overrides)
    return load_settings(AudienceSettings, **values)


async def start_service(kind: str, store: ObjectStore, store_url: str, **overrides) -> Service:
    settings = _settings(store_url, **overrides)
    server, port, app = await create_audience_server(settings)
    channel = backend_channel(f"127.0.0.1:{port}")
    return Service(
        kind=kind,
        store=store,
        store_url=store_url,
        dataset=EventDataset(store, settings.dataset_prefix),
        settings=settings,
        server=server,
        port=port,
        app=app,
        channel=channel,
        stub=audience_service_pb2_grpc.AudienceServiceStub(channel),
        ops=operations_pb2_grpc.OperationsStub(channel),
    )


async def stop_service(service: Service) -> None:
    await service.channel.close()
    await service.server.stop(0.5)
    await service.app.close()


@pytest.fixture(scope="session")
def world_stores(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """kind -> (store, url), each holding the generated world; created on first use."""
    made: dict[str, tuple[ObjectStore, str]] = {}

    def get(kind: str) -> tuple[ObjectStore, str]:
        if kind not in made:
            if kind == "local":
                root: Path = tmp_path_factory.mktemp("audience") / "store"
                store: ObjectStore = LocalObjectStore(root)
                url = root.as_uri()
            else:
                endpoint = request.getfixturevalue("s3_server")
                bucket = unique_bucket("aud")
                store = MinioObjectStore(
                    endpoint, S3_ACCESS_KEY, S3_SECRET_KEY, bucket, secure=False, region=S3_REGION
                )
                url = s3_url(endpoint, bucket)
            generate(store, WORLD)
            made[kind] = (store, url)
        return made[kind]

    return get


@pytest_asyncio.fixture(scope="session", params=["local", "s3"])
async def svc(request: pytest.FixtureRequest, world_stores) -> AsyncIterator[Service]:
    store, url = world_stores(request.param)
    service = await start_service(request.param, store, url)
    try:
        yield service
    finally:
        await stop_service(service)


@pytest.fixture
def local_world(world_stores) -> tuple[ObjectStore, str]:
    """The local store with the world (for tests that start servers of their own)."""
    return world_stores("local")
