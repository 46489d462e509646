"""Ingest: per-shard batches into the bus, dedup, rejects one by one, UNAVAILABLE when NATS is down."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import grpc
import grpc.aio
import polars as pl
import pytest
from flashcrowd.audience.v1 import event_service_pb2, event_service_pb2_grpc, events_pb2

from services.events.bus import BusUnavailable, EventBus, MemoryBus
from services.events.codec import decode_batch, shard_table
from services.events.config import RealtimeSettings
from services.events.ingest import EventIngestor, event_service_definition
from services.runtime import create_server, error_details, load_settings
from tests.fixtures.channels import backend_channel

from .conftest import drop_stream, make_jetstream_bus
from .events import make_event, make_events


async def read_all(bus: EventBus, timeout: float = 0.5) -> tuple[pl.DataFrame, list]:
    sub = await bus.subscribe("reader")
    frames, deliveries = [], []
    try:
        while batch := await sub.fetch(100, timeout):
            deliveries.extend(batch)
            frames.extend(decode_batch(d.payload) for d in batch)
    finally:
        await sub.close()
    return (pl.concat(frames) if frames else pl.DataFrame()), deliveries


async def test_batches_per_shard_and_retry_is_deduplicated(any_bus: EventBus) -> None:
    ingestor = EventIngestor(any_bus)
    events = make_events(2500, users=50_000)
    first = await ingestor.ingest(events)
    assert (first.accepted, first.duplicates, first.rejected) == (2500, 0, [])
    again = await ingestor.ingest(events)  # a client retry of the same request
    assert (again.accepted, again.duplicates) == (0, 2500)

    stored, deliveries = await read_all(any_bus)
    assert stored.height == 2500 and stored["event_id"].n_unique() == 2500
    assert len(deliveries) == first.messages
    shards = shard_table(any_bus.shard_count)
    for d in deliveries:
        frame = decode_batch(d.payload)
        assert 0 < frame.height <= 1000 and d.count == frame.height
        assert set(shards[frame["bucket"].to_numpy()].tolist()) == {d.shard}
    # Every shard saw events; the biggest shard (~625 events) still fits one message each.
    assert {d.shard for d in deliveries} == set(range(any_bus.shard_count))


async def test_messages_hold_at_most_1000_events() -> None:
    bus = MemoryBus(1)
    result = await EventIngestor(bus).ingest(make_events(2500))
    assert result.messages == 3
    _, deliveries = await read_all(bus)
    assert [d.count for d in deliveries] == [1000, 1000, 500]


async def test_bad_events_rejected_one_by_one_rest_stored(any_bus: EventBus) -> None:
    now = datetime.now(UTC)
    events = make_events(6, when=now - timedelta(minutes=1))
    events[1].event_type = 0  # unknown type
    events[2].event_time.FromDatetime(now + timedelta(days=1))  # far future
    events[3].event_time.FromDatetime(now - timedelta(days=800))  # before retention
    events[4].user_id = 0  # missing user id
    pay = make_event(99, 5, events_pb2.EVENT_TYPE_PAY, amount_fen=-5)  # negative amount
    no_time = events_pb2.Event(event_id=100, user_id=6, event_type=events_pb2.EVENT_TYPE_CLICK)
    result = await EventIngestor(any_bus).ingest([*events, pay, no_time])
    by_index = {i: (f, r) for i, f, r in result.rejected}
    assert set(by_index) == {1, 2, 3, 4, 6, 7}
    assert by_index[1] == ("event_type", "unknown event type")
    assert by_index[2][0] == "event_time" and "future" in by_index[2][1]
    assert by_index[3][0] == "event_time" and "retention" in by_index[3][1]
    assert by_index[4][0] == "user_id"
    assert by_index[6] == ("amount_fen", "negative amount")
    assert by_index[7][0] == "event_time"
    assert result.accepted == 2
    stored, _ = await read_all(any_bus)
    assert sorted(stored["event_id"].to_list()) == [1, 6]


async def test_duplicate_ids_inside_one_request_are_stored_once() -> None:
    bus = MemoryBus(4)
    events = make_events(10)
    result = await EventIngestor(bus).ingest([*events, *events[:3]])
    assert (result.accepted, result.duplicates) == (10, 3)


@pytest.fixture
def settings() -> RealtimeSettings:
    return load_settings(RealtimeSettings, host="127.0.0.1", port=0, grace_seconds=0.2)


async def serve(settings: RealtimeSettings, bus: EventBus):
    names, register = event_service_definition(settings, bus)
    return await create_server(settings, service_names=names, register=register)


async def test_grpc_unary_and_streaming(settings: RealtimeSettings, jetstream_bus) -> None:
    server, port = await serve(settings, jetstream_bus)
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            events = make_events(1500)
            events[7].event_type = 0
            reply = await stub.IngestEventBatch(event_service_pb2.IngestEventBatchRequest(events=events))
            assert reply.accepted == 1499 and reply.duplicates == 0
            assert [(r.index, r.field) for r in reply.rejected] == [(7, "event_type")]

            async def requests():
                for k in range(3):
                    yield event_service_pb2.IngestEventsRequest(
                        events=make_events(1000, first_id=10_000 * (k + 1))
                    )
                yield event_service_pb2.IngestEventsRequest(
                    events=make_events(1000, first_id=10_000)
                )  # retry

            replies = [r async for r in stub.IngestEvents(requests())]
            assert [(r.accepted, r.duplicates) for r in replies] == [(1000, 0)] * 3 + [(0, 1000)]

            bad = [make_event(1, 0), make_event(2, 3, event_type=0)]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.IngestEventBatch(event_service_pb2.IngestEventBatchRequest(events=bad))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = error_details(caught.value)
            fields = [v.field for v in details.bad_request.field_violations]
            assert fields == ["events[0].user_id", "events[1].event_type"]
        stored, _ = await read_all(jetstream_bus)
        assert stored.height == 1499 + 3000
    finally:
        await server.stop(None)


async def test_unavailable_quickly_when_nats_stops_and_retry_creates_no_duplicates(
    settings: RealtimeSettings, private_nats
) -> None:
    bus = await make_jetstream_bus(private_nats.url)
    server, port = await serve(settings, bus)
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            acked: set[int] = set()
            batches = [make_events(1000, first_id=1 + 1000 * k, users=100_000) for k in range(6)]
            for events in batches[:2]:
                reply = await stub.IngestEventBatch(event_service_pb2.IngestEventBatchRequest(events=events))
                assert reply.accepted == 1000
                acked.update(e.event_id for e in events)

            private_nats.stop()
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.IngestEventBatch(event_service_pb2.IngestEventBatchRequest(events=batches[2]))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 3.0
            assert error_details(caught.value).retry_info is not None

            private_nats.start()
            # Clients retry with the same event ids until the stream is back.
            for events in batches[2:]:
                for _ in range(100):
                    try:
                        await stub.IngestEventBatch(event_service_pb2.IngestEventBatchRequest(events=events))
                        break
                    except grpc.aio.AioRpcError as error:
                        assert error.code() == grpc.StatusCode.UNAVAILABLE
                        await asyncio.sleep(0.2)
                acked.update(e.event_id for e in events)
            # A retry of an already acknowledged request: stored once.
            reply = await stub.IngestEventBatch(event_service_pb2.IngestEventBatchRequest(events=batches[0]))
            assert reply.duplicates == 1000
        stored, _ = await read_all(bus)
        assert stored.height == stored["event_id"].n_unique() == 6000
        assert set(stored["event_id"].to_list()) == acked
    finally:
        await server.stop(None)
        await drop_stream(bus)


async def test_fails_fast_when_nats_never_came_up(settings: RealtimeSettings) -> None:
    from services.events.bus import JetStreamBus

    from .natsserver import free_port

    bus = JetStreamBus(f"nats://127.0.0.1:{free_port()}", connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BusUnavailable):
        await EventIngestor(bus).ingest(make_events(3))
    assert time.monotonic() - started < 3.0


async def test_grpc_requests_are_decoded_from_the_wire_or_refused(settings: RealtimeSettings) -> None:
    """The handlers take the request bytes: odd encodings go through protobuf, garbage is refused."""
    bus = MemoryBus(4)
    server, port = await serve(settings, bus)
    try:
        async with backend_channel(f"127.0.0.1:{port}") as channel:
            raw = channel.unary_unary(
                "/flashcrowd.audience.v1.EventService/IngestEventBatch",
                request_serializer=None,
                response_deserializer=event_service_pb2.IngestEventBatchResponse.FromString,
            )
            events = make_events(3)
            body = event_service_pb2.IngestEventBatchRequest(events=events).SerializeToString()
            reply = await raw(body)
            assert (reply.accepted, reply.duplicates) == (3, 0)
            # A fourth event repeating event_id (protobuf: the last value wins), decoded by protobuf.
            # (Other batches than the first request's: stored again, consumers de-duplicate by id.)
            last = events[2].SerializeToString() + events_pb2.Event(event_id=777).SerializeToString()
            reply = await raw(body + b"\x0a" + bytes([len(last)]) + last)
            assert (reply.accepted, reply.duplicates, len(reply.rejected)) == (4, 0, 0)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await raw(b"\x0a\x05\x08")  # truncated
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stored, _ = await read_all(bus)
        assert set(stored["event_id"].to_list()) == {1, 2, 3, 777}
        merged = stored.filter(pl.col("event_id") == 777).row(0, named=True)
        assert merged["user_id"] == events[2].user_id and merged["item_id"] == events[2].item_id
    finally:
        await server.stop(None)
