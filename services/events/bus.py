"""The event bus: a durable, sequenced, de-duplicating log of event batches, behind one small interface.

Producers (``services.events.ingest``) publish *batches* (one message = up to 1,000 events of one
shard, Arrow IPC encoded by ``services.events.codec``) with a deterministic message id; the bus
stores a message at most once per id inside its de-duplication window and answers with the stream
sequence. Consumers (the compactor, live packs, the sale monitor) read in sequence order from a
start sequence or a start time, and acknowledge what they have made durable.

Two implementations, chosen by ``open_bus(url)``:

* ``memory://`` — ``MemoryBus``: in-process, for the embedded demo and unit tests (lost on exit).
  ``memory://NAME`` is one bus per process and name, shared by every ``open_bus`` of that URL
  (reference-counted: the last ``close`` closes it), so several services run in one process (the
  demo: audience and sale monitor) share a stream the way separate processes share NATS.
* ``nats://host:port`` — ``JetStreamBus``: NATS JetStream via ``nats-py``. One stream (default
  ``FLASHCROWD_EVENTS``) over subjects ``flashcrowd.events.<shard>``; de-duplication by the
  ``Nats-Msg-Id`` header inside the stream's ``duplicate_window``; file storage.

A Kafka adapter would map shard -> partition, message id -> idempotent producer + the id as record
key, sequence -> offset; nothing outside this module knows which bus runs.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DEFAULT_STREAM",
    "DEFAULT_SUBJECT_PREFIX",
    "BusUnavailable",
    "Delivery",
    "EventBus",
    "JetStreamBus",
    "MemoryBus",
    "OutgoingBatch",
    "PublishResult",
    "Subscription",
    "open_bus",
]

logger = logging.getLogger(__name__)

DEFAULT_STREAM = "FLASHCROWD_EVENTS"
DEFAULT_SUBJECT_PREFIX = "flashcrowd.events"
DEFAULT_DUPLICATE_WINDOW_S = 120.0
#: Message headers every batch carries (besides the bus's own de-duplication id).
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_COUNT = "Flashcrowd-Events"
HEADER_FORMAT = "Flashcrowd-Format"


class BusUnavailable(ConnectionError):
    """The bus cannot store (or serve) messages right now; nothing of the failed call was acknowledged."""


@dataclass(frozen=True, slots=True)
class OutgoingBatch:
    """One message to publish: ``count`` events of shard ``shard``, encoded in ``payload``."""

    shard: int
    payload: bytes
    msg_id: str
    count: int
    format: str = "arrow-ipc/v1"


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The bus stored the message at ``seq``; ``duplicate`` if it had already stored the same id."""

    seq: int
    duplicate: bool


@dataclass(slots=True)
class Delivery:
    """One stored message handed to a consumer."""

    shard: int
    seq: int
    payload: bytes
    time: datetime
    count: int
    msg_id: str
    _ack: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    async def ack(self) -> None:
        """Acknowledge (only after what the message carried is durable downstream)."""
        if self._ack is not None:
            await self._ack()


class Subscription(ABC):
    """Reads messages in stream-sequence order."""

    @abstractmethod
    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Up to ``max_messages`` next messages; ``[]`` when none arrived within ``timeout`` seconds."""

    @abstractmethod
    async def close(self) -> None: ...


class EventBus(ABC):
    """A sharded, durable, de-duplicating message log."""

    #: Number of shards (subjects / partitions); batches never mix shards.
    shard_count: int
    url: str

    @abstractmethod
    async def start(self) -> None:
        """Connect (and create the stream if missing). May be retried."""

    @abstractmethod
    async def close(self) -> None: ...

    @property
    @abstractmethod
    def available(self) -> bool:
        """False while the bus is known to be unreachable (publishing would fail)."""

    @abstractmethod
    async def publish(self, batches: Sequence[OutgoingBatch], *, timeout: float) -> list[PublishResult]:
        """Store every batch; return one result per batch, in order.

        Raises ``BusUnavailable`` when any batch could not be confirmed within ``timeout``: the
        caller must not acknowledge any of them to its client (re-publishing the same ids is safe).
        """

    @abstractmethod
    async def subscribe(
        self,
        name: str,
        *,
        start_seq: int | None = None,
        start_time: datetime | None = None,
        durable: bool = False,
        shards: Sequence[int] | None = None,
        ack_wait: float = 300.0,
    ) -> Subscription:
        """Read from ``start_seq`` (inclusive) or the first message at/after ``start_time``, else all.

        ``durable``: a named consumer whose acknowledgements the bus tracks (re-created at the given
        start, so the caller's own durable checkpoint stays the truth). Otherwise acknowledgements
        are no-ops. ``shards`` restricts to those shards (default all).
        """

    @abstractmethod
    async def last_seq(self) -> int:
        """Sequence of the newest stored message (0 when empty)."""


# ---------------------------------------------------------------------------------------------------
# In-process bus


@dataclass(slots=True)
class _Stored:
    seq: int
    shard: int
    payload: bytes
    time: datetime
    mono: float
    count: int
    msg_id: str


class MemoryBus(EventBus):
    """In-process bus with the same semantics as the JetStream one (sequence, dedup window, replay)."""

    def __init__(self, shard_count: int = 4, *, duplicate_window: float = DEFAULT_DUPLICATE_WINDOW_S) -> None:
        if not 1 <= shard_count <= 256:
            raise ValueError(f"shard_count must be in 1..256, got {shard_count}")
        self.shard_count = shard_count
        self.url = "memory://"
        self.duplicate_window = duplicate_window
        self._log: list[_Stored] = []
        self._times: list[float] = []  # epoch seconds per message, for start_time lookups
        self._ids: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._changed = asyncio.Condition()
        self._closed = False
        #: Tests flip this to simulate an outage.
        self.down = False
        #: Holders of a named (shared) bus; ``close`` closes it when the last one lets go.
        self._refs = 1
        self._shared_key: str | None = None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._refs -= 1
        if self._refs > 0:
            return
        self._closed = True
        if self._shared_key is not None and _SHARED_MEMORY.get(self._shared_key) is self:
            del _SHARED_MEMORY[self._shared_key]

    @property
    def available(self) -> bool:
        return not self.down and not self._closed

    def _prune_ids(self, now: float) -> None:
        while self._ids:
            _, (_, at) = next(iter(self._ids.items()))
            if now - at <= self.duplicate_window:
                break
            self._ids.popitem(last=False)

    async def publish(self, batches: Sequence[OutgoingBatch], *, timeout: float) -> list[PublishResult]:
        if not self.available:
            raise BusUnavailable("event bus is down")
        now = time.monotonic()
        self._prune_ids(now)
        results: list[PublishResult] = []
        for batch in batches:
            if not 0 <= batch.shard < self.shard_count:
                raise ValueError(f"shard {batch.shard} outside 0..{self.shard_count - 1}")
            seen = self._ids.get(batch.msg_id)
            if seen is not None:
                results.append(PublishResult(seen[0], True))
                continue
            wall = datetime.now(UTC)
            seq = len(self._log) + 1
            self._log.append(_Stored(seq, batch.shard, batch.payload, wall, now, batch.count, batch.msg_id))
            self._times.append(wall.timestamp())
            self._ids[batch.msg_id] = (seq, now)
            results.append(PublishResult(seq, False))
        async with self._changed:
            self._changed.notify_all()
        return results

    async def subscribe(
        self,
        name: str,
        *,
        start_seq: int | None = None,
        start_time: datetime | None = None,
        durable: bool = False,
        shards: Sequence[int] | None = None,
        ack_wait: float = 300.0,
    ) -> Subscription:
        if start_seq is not None:
            position = max(0, start_seq - 1)
        elif start_time is not None:
            position = bisect.bisect_left(self._times, start_time.timestamp())
        else:
            position = 0
        return _MemorySubscription(self, position, None if shards is None else frozenset(shards))

    async def last_seq(self) -> int:
        return len(self._log)


class _MemorySubscription(Subscription):
    def __init__(self, bus: MemoryBus, position: int, shards: frozenset[int] | None) -> None:
        self._bus = bus
        self._position = position  # index into the log of the next message
        self._shards = shards

    def _take(self, max_messages: int) -> list[Delivery]:
        out: list[Delivery] = []
        log = self._bus._log
        while self._position < len(log) and len(out) < max_messages:
            m = log[self._position]
            self._position += 1
            if self._shards is None or m.shard in self._shards:
                out.append(Delivery(m.shard, m.seq, m.payload, m.time, m.count, m.msg_id))
        return out

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        if self._bus.down:
            raise BusUnavailable("event bus is down")
        out = self._take(max_messages)
        if out or timeout <= 0:
            return out
        with contextlib.suppress(TimeoutError):
            async with self._bus._changed:
                await asyncio.wait_for(
                    self._bus._changed.wait_for(lambda: self._position < len(self._bus._log)), timeout
                )
        return self._take(max_messages)

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------------
# NATS JetStream


class JetStreamBus(EventBus):
    """NATS JetStream through ``nats-py``; reconnects in the background, fails fast while down."""

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        shard_count: int = 4,
        stream: str = DEFAULT_STREAM,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
        duplicate_window: float = DEFAULT_DUPLICATE_WINDOW_S,
        max_age: float = 7 * 86_400,
        connect_timeout: float = 2.0,
        max_pending: int = 4096,
    ) -> None:
        if not 1 <= shard_count <= 256:
            raise ValueError(f"shard_count must be in 1..256, got {shard_count}")
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.url = self.servers[0]
        self.shard_count = shard_count
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self.connect_timeout = connect_timeout
        self.max_pending = max_pending
        # nats-py is imported on first use (the in-process bus needs none of it): typed loosely.
        self._nc: Any = None
        self._js: Any = None
        self._lock = asyncio.Lock()
        self._stream_ready = False

    def subject(self, shard: int) -> str:
        return f"{self.subject_prefix}.{shard}"

    @property
    def available(self) -> bool:
        return self._nc is not None and self._nc.is_connected and self._stream_ready

    async def start(self) -> None:
        """Connect and ensure the stream; raises ``BusUnavailable`` if NATS cannot be reached."""
        from nats.js import api

        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                from nats.aio.client import Client

                client = Client()
                try:
                    # Bounded: with unlimited reconnects nats-py would retry the first connect forever.
                    await asyncio.wait_for(
                        client.connect(
                            servers=self.servers,
                            # nats-py annotates these int but takes float seconds.
                            connect_timeout=self.connect_timeout,  # type: ignore[arg-type]
                            allow_reconnect=True,
                            max_reconnect_attempts=-1,
                            reconnect_time_wait=0.5,  # type: ignore[arg-type]
                            # While disconnected, publishes fail at once instead of piling up.
                            pending_size=0,
                            error_cb=self._on_error,
                            disconnected_cb=self._on_disconnect,
                            reconnected_cb=self._on_reconnect,
                        ),
                        timeout=self.connect_timeout + 0.5,
                    )
                    self._nc = client
                except Exception as error:
                    self._nc = None
                    with contextlib.suppress(Exception):
                        await client.close()
                    raise BusUnavailable(
                        f"cannot connect to NATS at {', '.join(self.servers)}: {error!r}"
                    ) from error
                self._js = self._nc.jetstream(
                    timeout=self.connect_timeout, publish_async_max_pending=self.max_pending
                )
            if not self._stream_ready:
                config = api.StreamConfig(
                    name=self.stream,
                    subjects=[f"{self.subject_prefix}.*"],
                    storage=api.StorageType.FILE,
                    retention=api.RetentionPolicy.LIMITS,
                    duplicate_window=self.duplicate_window,
                    max_age=self.max_age,
                    num_replicas=1,
                )
                try:
                    try:
                        await self._js.stream_info(self.stream)
                    except Exception:
                        await self._js.add_stream(config)
                except Exception as error:
                    raise BusUnavailable(f"JetStream stream {self.stream} unavailable: {error}") from error
                self._stream_ready = True

    async def _on_error(self, error: Exception) -> None:
        logger.debug("nats: %s", error)

    async def _on_disconnect(self) -> None:
        logger.warning("nats: disconnected from %s", self.url)

    async def _on_reconnect(self) -> None:
        logger.info("nats: reconnected to %s", self.url)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._stream_ready = False
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)

    async def _ensure(self) -> None:
        if self._nc is None or not self._stream_ready:
            await self.start()
        if not self._nc.is_connected:
            raise BusUnavailable(f"not connected to NATS at {self.url} (reconnecting)")

    async def publish(self, batches: Sequence[OutgoingBatch], *, timeout: float) -> list[PublishResult]:
        import nats.errors
        import nats.js.errors

        if not batches:
            return []
        await self._ensure()
        futures: list[asyncio.Future] = []
        # nats-py bounds publishes in flight with a semaphore and waits for it with
        # asyncio.wait_for(timeout), a task per message (~9 us). When there is room for the whole
        # batch the wait cannot stall, so skip the timeout (wait_for(None) just awaits).
        room = self._js.publish_async_pending() + len(batches) <= self.max_pending
        stall = None if room else timeout
        try:
            for batch in batches:
                headers = {
                    HEADER_MSG_ID: batch.msg_id,
                    HEADER_COUNT: str(batch.count),
                    HEADER_FORMAT: batch.format,
                }
                futures.append(
                    await self._js.publish_async(
                        self.subject(batch.shard), batch.payload, wait_stall=stall, headers=headers
                    )
                )
            _, pending = await asyncio.wait(futures, timeout=timeout)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as error:
            for f in futures:
                f.cancel()
            raise BusUnavailable(f"publish to {self.stream} failed: {error}") from error
        if pending:
            for f in pending:
                f.cancel()
            raise BusUnavailable(
                f"{len(pending)} of {len(futures)} batches not confirmed by {self.stream} in {timeout:g}s"
            )
        results: list[PublishResult] = []
        for f in futures:
            failure = f.exception()
            if failure is not None:
                raise BusUnavailable(f"publish to {self.stream} failed: {failure}") from failure
            ack = f.result()
            results.append(PublishResult(int(ack.seq), bool(ack.duplicate)))
        return results

    async def subscribe(
        self,
        name: str,
        *,
        start_seq: int | None = None,
        start_time: datetime | None = None,
        durable: bool = False,
        shards: Sequence[int] | None = None,
        ack_wait: float = 300.0,
    ) -> Subscription:
        from nats.js import api

        await self._ensure()
        policy: dict[str, Any]
        if start_seq is not None:
            policy = {
                "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                "opt_start_seq": max(1, start_seq),
            }
        elif start_time is not None:
            policy = {
                "deliver_policy": api.DeliverPolicy.BY_START_TIME,
                "opt_start_time": _rfc3339(start_time),
            }
        else:
            policy = {"deliver_policy": api.DeliverPolicy.ALL}
        filters = None if shards is None else [self.subject(s) for s in sorted(set(shards))]
        config = api.ConsumerConfig(
            durable_name=name if durable else None,
            ack_policy=api.AckPolicy.EXPLICIT if durable else api.AckPolicy.NONE,
            ack_wait=ack_wait if durable else None,
            max_ack_pending=-1 if durable else None,
            inactive_threshold=None if durable else 60.0,
            filter_subject=filters[0] if filters and len(filters) == 1 else None,
            filter_subjects=filters if filters and len(filters) > 1 else None,
            **policy,
        )
        try:
            if durable:
                # The caller's checkpoint is the truth: start the durable consumer over from it.
                with contextlib.suppress(Exception):
                    await self._js.delete_consumer(self.stream, name)
                info = await self._js.add_consumer(self.stream, config)
            else:
                info = await self._js.add_consumer(self.stream, config)
            sub = await self._js.pull_subscribe_bind(
                consumer=info.name, stream=self.stream, pending_msgs_limit=1_000_000, pending_bytes_limit=-1
            )
        except Exception as error:
            raise BusUnavailable(f"cannot subscribe to {self.stream}: {error}") from error
        return _JetStreamSubscription(self, sub, info.name, durable)

    async def last_seq(self) -> int:
        await self._ensure()
        try:
            info = await self._js.stream_info(self.stream)
        except Exception as error:
            raise BusUnavailable(str(error)) from error
        return int(info.state.last_seq)


def _rfc3339(value: datetime) -> str:
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _JetStreamSubscription(Subscription):
    def __init__(self, bus: JetStreamBus, sub, consumer: str, durable: bool) -> None:
        self._bus = bus
        self._sub = sub
        self._consumer = consumer
        self._durable = durable
        self._prefix_len = len(bus.subject_prefix) + 1

    async def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        import nats.errors

        nc = self._bus._nc
        if nc is None or not nc.is_connected:
            await asyncio.sleep(min(timeout, 0.5))
            raise BusUnavailable(f"not connected to NATS at {self._bus.url}")
        try:
            msgs = await self._sub.fetch(batch=max_messages, timeout=max(timeout, 0.01))
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        except nats.errors.Error as error:
            raise BusUnavailable(str(error)) from error
        out: list[Delivery] = []
        for msg in msgs:
            meta = msg.metadata
            headers = msg.headers or {}
            ack = msg.ack if self._durable else None
            out.append(
                Delivery(
                    shard=int(msg.subject[self._prefix_len :]),
                    seq=int(meta.sequence.stream),
                    payload=msg.data,
                    time=meta.timestamp,
                    count=int(headers.get(HEADER_COUNT, 0)),
                    msg_id=headers.get(HEADER_MSG_ID, ""),
                    _ack=ack,
                )
            )
        return out

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
        if not self._durable:
            with contextlib.suppress(Exception):
                await self._bus._js.delete_consumer(self._bus.stream, self._consumer)


#: Named in-process buses (``memory://NAME``) of this process.
_SHARED_MEMORY: dict[str, MemoryBus] = {}


def open_bus(url: str = "memory://", *, shard_count: int = 4, **options) -> EventBus:
    """``memory://[NAME]`` or ``nats://host:port[,host:port][?stream=NAME&subjects=PREFIX&dedup_window=S]``.

    ``memory://`` is a private in-process bus; ``memory://NAME`` the process's shared bus of that name.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        kwargs = {k: v for k, v in options.items() if k == "duplicate_window"}
        name = (parts.netloc + parts.path).strip("/")
        if not name:
            return MemoryBus(shard_count, **kwargs)
        bus = _SHARED_MEMORY.get(name)
        if bus is None:
            bus = _SHARED_MEMORY[name] = MemoryBus(shard_count, **kwargs)
            bus.url, bus._shared_key = f"memory://{name}", name
        elif bus.shard_count != shard_count:
            raise ValueError(f"memory://{name} is open with {bus.shard_count} shards, not {shard_count}")
        else:
            bus._refs += 1
        return bus
    if scheme in ("nats", "tls"):
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        servers = [f"{scheme}://{host}" for host in parts.netloc.split(",") if host]
        kwargs = dict(options)
        if "stream" in query:
            kwargs["stream"] = query["stream"]
        if "subjects" in query:
            kwargs["subject_prefix"] = query["subjects"]
        if "dedup_window" in query:
            kwargs["duplicate_window"] = float(query["dedup_window"])
        return JetStreamBus(servers or "nats://127.0.0.1:4222", shard_count=shard_count, **kwargs)
    raise ValueError(f"unsupported bus URL {url!r}: expected memory:// or nats://host:port")
