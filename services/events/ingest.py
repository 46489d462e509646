"""EventService: validated events into the durable event bus, acknowledged only once stored.

``python -m services.events.ingest`` serves it alone; the audience service and the demo can mount
the same servicer. Per request: proto events -> columns -> ``validate_events`` (bad events are
returned one by one with index, field and reason; the valid rest goes on) -> duplicates of an event
id inside the request dropped -> per-shard messages of up to 1,000 events with deterministic ids
(``services.events.codec``) -> ``bus.publish`` waits for every message's confirmation. Any
confirmation missing within ``FLASHCROWD_INGEST_ACK_TIMEOUT`` -> UNAVAILABLE and nothing of the
request is acknowledged; a retry with the same events creates no duplicates (same message ids, and
consumers de-duplicate by event id).

Unary ``IngestEventBatch`` answers INVALID_ARGUMENT (BadRequest, one violation per bad event)
when no event of the batch is valid; otherwise it answers OK with the rejects listed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from flashcrowd.audience.v1 import event_service_pb2, event_service_pb2_grpc

from services.events.bus import BusUnavailable, EventBus, open_bus
from services.events.codec import PROTO_FIELD, events_from_proto, shard_table, split_batches
from services.events.config import RealtimeSettings
from services.events.schema import Reject, validate_events
from services.runtime import InvalidArgument, ServiceDefinition, Unavailable, run_service

__all__ = ["EventIngestor", "EventServicer", "IngestResult", "build", "event_service_definition"]

logger = logging.getLogger(__name__)

SERVICE_NAME = event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Reject] = field(default_factory=list)
    messages: int = 0
    #: Seconds spent per stage (decode, validate, encode, publish), for benchmarks.
    timings: dict[str, float] = field(default_factory=dict)


class EventIngestor:
    """Validate, batch per shard, publish; the domain object behind EventService."""

    def __init__(
        self,
        bus: EventBus,
        *,
        ack_timeout: float = 2.0,
        message_events: int = 1000,
        max_future: timedelta = timedelta(minutes=5),
        retention: timedelta = timedelta(days=400),
    ) -> None:
        self.bus = bus
        self.ack_timeout = ack_timeout
        self.message_events = message_events
        self.max_future = max_future
        self.retention = retention
        self._shards = shard_table(bus.shard_count)

    async def ingest(self, events: Sequence, *, now: datetime | None = None) -> IngestResult:
        """Store the valid events of one batch; ``BusUnavailable`` if the bus did not confirm them all."""
        result = IngestResult()
        if len(events) == 0:
            return result
        if not self.bus.available:
            # Fail fast (no validation work) while the bus is known to be down; start() retries.
            try:
                await self.bus.start()
            except BusUnavailable:
                raise
            if not self.bus.available:
                raise BusUnavailable("event bus unavailable")
        t0 = time.perf_counter()
        frame = events_from_proto(events)
        t1 = time.perf_counter()
        valid, rejects = validate_events(
            frame, now=now or datetime.now(UTC), max_future_skew=self.max_future, retention=self.retention
        )
        result.rejected = [(i, PROTO_FIELD.get(f, f), reason) for i, f, reason in rejects]
        unique = valid.unique(subset="event_id", keep="first", maintain_order=True)
        result.duplicates = valid.height - unique.height
        t2 = time.perf_counter()
        batches = split_batches(unique, self._shards, max_events=self.message_events)
        t3 = time.perf_counter()
        acks = await self.bus.publish(batches, timeout=self.ack_timeout)
        t4 = time.perf_counter()
        for batch, ack in zip(batches, acks, strict=True):
            if ack.duplicate:
                result.duplicates += batch.count
            else:
                result.accepted += batch.count
        result.messages = len(batches)
        result.timings = {"decode": t1 - t0, "validate": t2 - t1, "encode": t3 - t2, "publish": t4 - t3}
        return result


def _violations(rejected: list[Reject]) -> list[tuple[str, str]]:
    return [(f"events[{index}].{name}", reason) for index, name, reason in rejected]


def _rejected_pb(rejected: list[Reject]) -> list[event_service_pb2.RejectedEvent]:
    return [event_service_pb2.RejectedEvent(index=i, field=f, reason=r) for i, f, r in rejected]


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, ingestor: EventIngestor, *, max_events: int = 10_000) -> None:
        self.ingestor = ingestor
        self.max_events = max_events

    def _check_size(self, count: int) -> None:
        if count > self.max_events:
            raise InvalidArgument("events", f"at most {self.max_events} events per request, got {count}")

    async def _ingest(self, events: Sequence) -> IngestResult:
        try:
            return await self.ingestor.ingest(events)
        except BusUnavailable as error:
            logger.warning("ingest unavailable: %s", error)
            raise Unavailable(
                f"event stream unavailable, nothing of this batch was acknowledged: {error}",
                reason="EVENT_STREAM_UNAVAILABLE",
                retry_after_seconds=1.0,
            ) from None

    async def IngestEventBatch(
        self, request: event_service_pb2.IngestEventBatchRequest, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.IngestEventBatchResponse:
        if len(request.events) == 0:
            raise InvalidArgument("events", "at least one event is required")
        self._check_size(len(request.events))
        result = await self._ingest(request.events)
        if result.rejected and result.accepted == 0 and result.duplicates == 0:
            raise InvalidArgument(
                _violations(result.rejected),
                message=f"all {len(request.events)} events were rejected",
                reason="INVALID_EVENTS",
            )
        return event_service_pb2.IngestEventBatchResponse(
            accepted=result.accepted, duplicates=result.duplicates, rejected=_rejected_pb(result.rejected)
        )

    async def IngestEvents(
        self,
        request_iterator: AsyncIterator[event_service_pb2.IngestEventsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[event_service_pb2.IngestEventsResponse]:
        async for request in request_iterator:
            self._check_size(len(request.events))
            result = await self._ingest(request.events)
            yield event_service_pb2.IngestEventsResponse(
                accepted=result.accepted, duplicates=result.duplicates, rejected=_rejected_pb(result.rejected)
            )


def ingestor_from_settings(settings: RealtimeSettings, bus: EventBus) -> EventIngestor:
    return EventIngestor(
        bus,
        ack_timeout=settings.ingest_ack_timeout,
        message_events=settings.ingest_message_events,
        max_future=timedelta(seconds=settings.ingest_max_future_seconds),
        retention=timedelta(days=settings.ingest_retention_days),
    )


def event_service_definition(settings: RealtimeSettings, bus: EventBus) -> tuple[list[str], object]:
    """``(service names, register)`` for mounting EventService on another service's server."""
    servicer = EventServicer(ingestor_from_settings(settings, bus), max_events=settings.ingest_max_events)
    return [SERVICE_NAME], lambda server: event_service_pb2_grpc.add_EventServiceServicer_to_server(
        servicer, server
    )


async def build(settings: RealtimeSettings) -> ServiceDefinition:
    bus = open_bus(settings.bus_url, shard_count=settings.bus_shards)
    try:
        await bus.start()
    except BusUnavailable as error:  # serve anyway: ingest answers UNAVAILABLE until the bus is back
        logger.warning("event bus not reachable at start: %s", error)
    names, register = event_service_definition(settings, bus)
    return ServiceDefinition(names=names, register=register, on_stop=[bus.close])


if __name__ == "__main__":
    run_service("ingest", RealtimeSettings, build)
