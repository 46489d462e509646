"""Fixtures of the real-time tests: real NATS JetStream (machine server or a private one), buses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.events.bus import JetStreamBus, MemoryBus

from .natsserver import NatsServer, port_open


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The machine's NATS (127.0.0.1:4222) when it answers, else a private server for the session."""
    if port_open(4222):
        yield "nats://127.0.0.1:4222"
        return
    server = NatsServer(tmp_path_factory.mktemp("nats-session"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of this test alone (it may stop and restart it)."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def unique_stream() -> tuple[str, str]:
    token = uuid.uuid4().hex[:12]
    return f"FCTEST_{token.upper()}", f"fctest.{token}"


async def make_jetstream_bus(url: str, shard_count: int = 4, **kwargs) -> JetStreamBus:
    stream, prefix = unique_stream()
    bus = JetStreamBus(url, shard_count=shard_count, stream=stream, subject_prefix=prefix, **kwargs)
    await bus.start()
    return bus


async def drop_stream(bus: JetStreamBus) -> None:
    try:
        if bus._js is not None and bus._nc is not None and bus._nc.is_connected:
            await bus._js.delete_stream(bus.stream)
    except Exception:
        pass
    await bus.close()


@pytest.fixture
async def jetstream_bus(nats_url: str) -> AsyncIterator[JetStreamBus]:
    bus = await make_jetstream_bus(nats_url)
    yield bus
    await drop_stream(bus)


@pytest.fixture(params=["memory", "jetstream"])
async def any_bus(request: pytest.FixtureRequest, nats_url: str) -> AsyncIterator[MemoryBus | JetStreamBus]:
    if request.param == "memory":
        yield MemoryBus(4)
        return
    bus = await make_jetstream_bus(nats_url)
    yield bus
    await drop_stream(bus)
