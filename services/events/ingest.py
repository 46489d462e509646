"""EventService: validated events into the durable event bus, acknowledged only once stored.

``python -m services.ingest`` (``services/ingest``) serves it alone; the audience service and the
demo can mount the same servicer. Per request: the serialized request -> numpy columns straight from the wire
(``services.events.columns``; protobuf parses whatever that decoder does not handle) ->
``validate_columns`` (bad events are returned one by one with index, field and reason; the valid
rest goes on) -> duplicates of an event id inside the request dropped -> per-shard messages of up to
1,000 events with deterministic ids (``services.events.codec``) -> ``bus.publish`` waits for every
message's confirmation. Any confirmation missing within ``FLASHCROWD_INGEST_ACK_TIMEOUT`` ->
UNAVAILABLE and nothing of the request is acknowledged; a retry with the same events creates no
duplicates (same message ids, and consumers de-duplicate by event id).

The handlers are registered without a request deserializer (``add_event_service``): they receive
the request bytes, so no Python object is built per event.

Unary ``IngestEventBatch`` answers INVALID_ARGUMENT (BadRequest, one violation per bad event)
when no event of the batch is valid; otherwise it answers OK with the rejects listed.

**Owners.** Every event gets an owner from the verified caller (``caller_of``; the server installs
``backend_interceptors``), never from the request: events carry no owner field.

* A tenant principal holding ``events.write`` writes its own conversion events: owner = its tenant.
  Without the scope: PERMISSION_DENIED ``MISSING_SCOPE``.
* A platform principal holding ``events.platform`` writes the platform's first-party behaviour
  stream: owner = ``PLATFORM_OWNER``. Without the scope (``events.write`` alone is not enough: a
  platform principal has no tenant to own the events): PERMISSION_DENIED ``PLATFORM_SCOPE_REQUIRED``.
  Platform principals cannot write events on a tenant's behalf: every tenant-owned event comes from
  that tenant's own credential.

The owner is checked before the request is decoded, is one constant per request, and is part of
every de-duplication key: the bus message ids hash it with the event ids, and a request's repeated
ids are repeats of the same ``(owner, event_id)``. Tenant B's events are never "duplicates" of
tenant A's events with the same ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
from flashcrowd.audience.v1 import event_service_pb2, event_service_pb2_grpc
from google.protobuf.message import DecodeError

from services.events.bus import BusUnavailable, EventBus
from services.events.codec import PROTO_FIELD, batches_from_columns, shard_table
from services.events.columns import EventColumns, columns_from_proto, columns_from_wire, validate_columns
from services.events.config import RealtimeSettings
from services.events.schema import PLATFORM_OWNER, Reject
from services.events.sharding import buckets_np
from services.runtime import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.runtime.assertion import caller_of
from services.runtime.scopes import EVENTS_WRITE, PLATFORM_EVENTS_WRITE

__all__ = [
    "EventIngestor",
    "EventServicer",
    "IngestResult",
    "add_event_service",
    "event_service_definition",
    "owner_of_caller",
    "to_columns",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name


def to_columns(events: bytes | Sequence | EventColumns) -> EventColumns:
    """A serialized IngestEvents/IngestEventBatch request, proto events, or columns -> columns."""
    if isinstance(events, EventColumns):
        return events
    if not isinstance(events, bytes | bytearray | memoryview):
        return columns_from_proto(events)
    columns = columns_from_wire(events)
    if columns is not None:
        return columns
    try:  # a shape the vectorised decoder leaves to protobuf (merged fields, unknown fields...)
        return columns_from_proto(event_service_pb2.IngestEventBatchRequest.FromString(bytes(events)).events)
    except DecodeError as error:
        raise InvalidArgument("events", f"malformed request: {error}") from None


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

    async def ingest(
        self,
        events: bytes | Sequence | EventColumns,
        *,
        owner: str = PLATFORM_OWNER,
        now: datetime | None = None,
    ) -> IngestResult:
        """Store the valid events of one batch as ``owner``'s; ``BusUnavailable`` if the bus did not
        confirm them all.

        ``events``: the serialized request (what EventService receives), proto events or columns.
        ``owner``: ``PLATFORM_OWNER`` (in-process platform producers: the default) or a tenant id; the
        servicer passes what the caller may write (``owner_of_caller``).
        """
        t0 = time.perf_counter()
        columns = to_columns(events).owned_by(owner)
        return await self.ingest_columns(columns, now=now, decode_seconds=time.perf_counter() - t0)

    async def ingest_columns(
        self, columns: EventColumns, *, now: datetime | None = None, decode_seconds: float = 0.0
    ) -> IngestResult:
        """Store ``columns`` (owned by ``columns.owner``); see ``ingest``."""
        result = IngestResult()
        if len(columns) == 0:
            return result
        if not self.bus.available:
            # Fail fast (no validation work) while the bus is known to be down; start() retries.
            try:
                await self.bus.start()
            except BusUnavailable:
                raise
            if not self.bus.available:
                raise BusUnavailable("event bus unavailable")
        t1 = time.perf_counter()
        ok, rejects = validate_columns(
            columns, now=now or datetime.now(UTC), max_future_skew=self.max_future, retention=self.retention
        )
        result.rejected = [(i, PROTO_FIELD.get(f, f), reason) for i, f, reason in rejects]
        keep = np.flatnonzero(ok) if rejects else None
        ids = columns.event_id if keep is None else columns.event_id[keep]
        unique = _first_occurrences(ids)
        if unique is not None:  # repeated event ids inside the request: keep the first
            result.duplicates = ids.size - unique.size
            keep = unique if keep is None else keep[unique]
        valid = columns if keep is None else columns.take(keep)
        t2 = time.perf_counter()
        batches = batches_from_columns(
            valid, buckets_np(valid.user_id), self._shards, max_events=self.message_events
        )
        t3 = time.perf_counter()
        acks = await self.bus.publish(batches, timeout=self.ack_timeout)
        t4 = time.perf_counter()
        for batch, ack in zip(batches, acks, strict=True):
            if ack.duplicate:
                result.duplicates += batch.count
            else:
                result.accepted += batch.count
        result.messages = len(batches)
        result.timings = {
            "decode": decode_seconds,
            "validate": t2 - t1,
            "encode": t3 - t2,
            "publish": t4 - t3,
        }
        return result


def _first_occurrences(ids: np.ndarray) -> np.ndarray | None:
    """Sorted positions of each id's first occurrence; None when every id is unique (the usual case).

    The ids are one request's, which all have one owner: first occurrences of ``event_id`` are
    first occurrences of ``(owner, event_id)``.
    """
    if ids.size < 2:
        return None
    ordered = np.sort(ids)
    if not (ordered[1:] == ordered[:-1]).any():
        return None
    _, first = np.unique(ids, return_index=True)
    first.sort()
    return first


def _violations(rejected: list[Reject]) -> list[tuple[str, str]]:
    return [(f"events[{index}].{name}", reason) for index, name, reason in rejected]


def _rejected_pb(rejected: list[Reject]) -> list[event_service_pb2.RejectedEvent]:
    return [event_service_pb2.RejectedEvent(index=i, field=f, reason=r) for i, f, r in rejected]


def owner_of_caller(context: grpc.aio.ServicerContext | None) -> str:
    """The owner the verified caller writes events as (see the module doc); raises if it may not.

    A servicer called without a context (unit tests of servicer methods) writes platform events.
    """
    if context is None:
        return PLATFORM_OWNER
    caller = caller_of(context)
    if caller is None:
        raise Unauthenticated(
            "ingest needs a verified caller (the gateway's assertion)", reason="GATEWAY_ASSERTION_REQUIRED"
        )
    if caller.is_platform:
        if not caller.has(PLATFORM_EVENTS_WRITE):
            raise PermissionDenied(
                f"the platform's behaviour stream needs a platform principal with the "
                f"{PLATFORM_EVENTS_WRITE!r} scope; a tenant's conversion events come from the tenant's "
                "own credential",
                reason="PLATFORM_SCOPE_REQUIRED",
                metadata={"scope": PLATFORM_EVENTS_WRITE},
            )
        return PLATFORM_OWNER
    if not caller.has(EVENTS_WRITE):
        raise PermissionDenied(
            f"ingesting conversion events needs the {EVENTS_WRITE!r} scope",
            reason="MISSING_SCOPE",
            metadata={"scope": EVENTS_WRITE},
        )
    assert caller.tenant is not None  # Caller's invariant for tenant principals
    return caller.tenant


class EventServicer(event_service_pb2_grpc.EventServiceServicer):
    def __init__(self, ingestor: EventIngestor, *, max_events: int = 10_000) -> None:
        self.ingestor = ingestor
        self.max_events = max_events

    def _check_size(self, count: int) -> None:
        if count > self.max_events:
            raise InvalidArgument("events", f"at most {self.max_events} events per request, got {count}")

    async def _ingest(self, columns: EventColumns, owner: str) -> IngestResult:
        try:
            return await self.ingestor.ingest_columns(columns.owned_by(owner))
        except BusUnavailable as error:
            logger.warning("ingest unavailable: %s", error)
            raise Unavailable(
                f"event stream unavailable, nothing of this batch was acknowledged: {error}",
                reason="EVENT_STREAM_UNAVAILABLE",
                retry_after_seconds=1.0,
            ) from None

    async def IngestEventBatch(
        self, request: bytes | event_service_pb2.IngestEventBatchRequest, context: grpc.aio.ServicerContext
    ) -> event_service_pb2.IngestEventBatchResponse:
        owner = owner_of_caller(context)
        columns = to_columns(request if isinstance(request, bytes) else request.events)
        if len(columns) == 0:
            raise InvalidArgument("events", "at least one event is required")
        self._check_size(len(columns))
        result = await self._ingest(columns, owner)
        if result.rejected and result.accepted == 0 and result.duplicates == 0:
            raise InvalidArgument(
                _violations(result.rejected),
                message=f"all {len(columns)} events were rejected",
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
        owner = owner_of_caller(context)  # one caller per stream
        async for request in request_iterator:
            columns = to_columns(request if isinstance(request, bytes) else request.events)
            self._check_size(len(columns))
            result = await self._ingest(columns, owner)
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


def add_event_service(servicer: EventServicer, server: grpc.aio.Server) -> None:
    """Register EventService with raw-bytes requests (the handlers decode them into columns)."""
    handlers = {
        "IngestEvents": grpc.stream_stream_rpc_method_handler(
            servicer.IngestEvents,
            request_deserializer=None,
            response_serializer=event_service_pb2.IngestEventsResponse.SerializeToString,
        ),
        "IngestEventBatch": grpc.unary_unary_rpc_method_handler(
            servicer.IngestEventBatch,
            request_deserializer=None,
            response_serializer=event_service_pb2.IngestEventBatchResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def event_service_definition(
    settings: RealtimeSettings, bus: EventBus
) -> tuple[list[str], Callable[[grpc.aio.Server], None]]:
    """``(service names, register)`` for mounting EventService on another service's server."""
    servicer = EventServicer(ingestor_from_settings(settings, bus), max_events=settings.ingest_max_events)
    return [SERVICE_NAME], lambda server: add_event_service(servicer, server)
