"""Live packs: sliding-window audiences maintained from the event stream.

A live pack's spec is compiled to a small set expression whose leaves are *behaviour series*:
"users with an event of these types (and attribute filters) in the last W minutes". A series keeps
one Roaring bitmap per minute of event time; the leaf's members are the union of the buckets of
the window; union / intersect / exclude are applied at read time, so "clicked in the last 15 min
and not paid in the last 15 min" ages both sides correctly. Buckets older than the window are
dropped as the clock moves.

Window granularity is one minute: "last W minutes" at time ``now`` is the buckets of minutes
``floor(now - W) .. floor(now)``, so members are kept up to one minute longer than W, never shorter.

The clock is event time: the newest event time applied, advanced by the wall time elapsed since it
was seen (so a replay faster than real time slides its windows with the replay, and a quiet stream
still ages them). Definitions are stored in the object store (``live/{tenant}/{id}.json``); the
state is rebuilt on start-up by replaying the stream from ``now - (longest window + margin)``.

``live_service(app)`` (picked up by ``services.audience.server``) serves LivePackService and, in
the same process, the EventService on the same bus; with the in-process bus (``memory://``, the
embedded default) it also runs the compactor, so the demo needs no servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import numpy as np
import polars as pl
from flashcrowd.audience.v1 import live_pack_pb2, live_pack_pb2_grpc, pack_pb2, spec_pb2
from google.protobuf import empty_pb2, json_format, timestamp_pb2
from pyroaring import BitMap

from services.audience.compiler import SHORTCUT_EVENT_TYPES
from services.audience.tenancy import (
    LIVE_PACK_TYPE,
    TENANT_TYPE,
    check_id,
    parse_live_pack_name,
    parse_parent,
)
from services.events.bus import BusUnavailable, EventBus, open_bus
from services.events.codec import decode_batch
from services.events.config import RealtimeSettings
from services.events.follower import StreamFollower
from services.events.schema import EventType
from services.runtime import AlreadyExists, InvalidArgument, NotFound, ServiceDefinition, load_settings
from services.storage import ObjectNotFound, ObjectStore

__all__ = [
    "LIVE_PACK_TYPE",
    "LivePackEngine",
    "LivePackServicer",
    "compile_live_spec",
    "live_service",
]

logger = logging.getLogger(__name__)

MAX_WINDOW_MINUTES = 24 * 60
MINUTE_US = 60_000_000

# The batch compiler's one-leaf shortcuts, plus purchasers approximated as payers: a live window
# keeps no order history to subtract fully refunded payments from.
_SHORTCUT_TYPES = {**SHORTCUT_EVENT_TYPES, spec_pb2.Shortcut.KIND_PURCHASERS: (int(EventType.PAY),)}


# ---------------------------------------------------------------------------------------------------
# Spec -> expression


@dataclass(frozen=True)
class Leaf:
    """Users with an event of ``types`` matching the filters in the last ``minutes`` minutes."""

    types: frozenset[int]
    minutes: int
    item_ids: frozenset[int] = frozenset()
    category_ids: frozenset[int] = frozenset()
    campaign_ids: frozenset[int] = frozenset()
    video_ids: frozenset[int] = frozenset()
    min_fen: int = 0
    max_fen: int = 0

    def mask(self, frame: pl.DataFrame) -> pl.Series:
        expr = pl.col("event_type").is_in(sorted(self.types))
        for column, values in (
            ("item_id", self.item_ids),
            ("category_id", self.category_ids),
            ("campaign_id", self.campaign_ids),
            ("video_id", self.video_ids),
        ):
            if values:
                expr = expr & pl.col(column).is_in(sorted(values))
        if self.min_fen:
            expr = expr & (pl.col("amount_fen") >= self.min_fen)
        if self.max_fen:
            expr = expr & (pl.col("amount_fen") <= self.max_fen)
        return frame.select(expr.fill_null(False)).to_series()


@dataclass(frozen=True)
class Node:
    op: str  # "leaf" | "union" | "intersect" | "exclude"
    leaf: Leaf | None = None
    children: tuple[Node, ...] = ()

    def leaves(self) -> Iterable[Leaf]:
        if self.leaf is not None:
            yield self.leaf
        for child in self.children:
            yield from child.leaves()


def _minutes(window: spec_pb2.TimeWindow, path: str) -> int:
    if window.WhichOneof("window") != "last":
        raise InvalidArgument(f"{path}.last", "live packs need a relative window (`last`, e.g. 15m)")
    seconds = window.last.ToTimedelta().total_seconds()
    if seconds <= 0 or seconds % 60 or seconds / 60 > MAX_WINDOW_MINUTES:
        raise InvalidArgument(f"{path}.last", f"must be whole minutes between 1m and {MAX_WINDOW_MINUTES}m")
    return int(seconds // 60)


def _leaf(types: Iterable[int], window: spec_pb2.TimeWindow, flt: spec_pb2.EventFilter, path: str) -> Leaf:
    return Leaf(
        types=frozenset(int(t) for t in types),
        minutes=_minutes(window, f"{path}.window"),
        item_ids=frozenset(flt.item_ids),
        category_ids=frozenset(flt.category_ids),
        campaign_ids=frozenset(flt.campaign_ids),
        video_ids=frozenset(flt.video_ids),
        min_fen=flt.amount.min_fen,
        max_fen=flt.amount.max_fen,
    )


def compile_live_spec(spec: spec_pb2.PackSpec, path: str = "live_pack.spec") -> Node:
    """Check a spec for live use and compile it; ``InvalidArgument`` names the offending field."""
    kind = spec.WhichOneof("node")
    if kind == "behavior":
        b = spec.behavior
        if not b.event_types:
            raise InvalidArgument(f"{path}.behavior.event_types", "at least one event type")
        known = {t.value for t in EventType}
        for i, t in enumerate(b.event_types):
            if t not in known:
                raise InvalidArgument(f"{path}.behavior.event_types[{i}]", f"unknown event type {t}")
        if b.min_count > 1:
            raise InvalidArgument(f"{path}.behavior.min_count", "live packs support min_count 1 only")
        return Node("leaf", _leaf(b.event_types, b.window, b.filter, f"{path}.behavior"))
    if kind == "shortcut":
        s = spec.shortcut
        sub = f"{path}.shortcut"
        if s.kind == spec_pb2.Shortcut.KIND_CART_ABANDONERS:
            carts = _leaf((EventType.ADD_CART,), s.window, s.filter, sub)
            orders = _leaf((EventType.ORDER,), s.window, s.filter, sub)
            return Node("exclude", children=(Node("leaf", carts), Node("leaf", orders)))
        if s.kind not in _SHORTCUT_TYPES:
            raise InvalidArgument(f"{sub}.kind", "unknown shortcut")
        return Node("leaf", _leaf(_SHORTCUT_TYPES[s.kind], s.window, s.filter, sub))
    if kind in ("union", "intersect"):
        operands = getattr(spec, kind).operands
        if len(operands) < 2:
            raise InvalidArgument(f"{path}.{kind}.operands", "at least two operands")
        return Node(
            kind,
            children=tuple(
                compile_live_spec(o, f"{path}.{kind}.operands[{i}]") for i, o in enumerate(operands)
            ),
        )
    if kind == "exclude":
        e = spec.exclude
        if not e.HasField("base") or not e.subtract:
            raise InvalidArgument(f"{path}.exclude", "needs a base and at least one subtract")
        base = compile_live_spec(e.base, f"{path}.exclude.base")
        subs = tuple(compile_live_spec(s, f"{path}.exclude.subtract[{i}]") for i, s in enumerate(e.subtract))
        return Node("exclude", children=(base, *subs))
    if kind in ("profile", "pack"):
        raise InvalidArgument(f"{path}.{kind}", f"{kind} nodes are not supported in live packs")
    raise InvalidArgument(path, "exactly one node kind must be set")


# ---------------------------------------------------------------------------------------------------
# State


class Series:
    """Per-minute bitmaps of the users matching one leaf."""

    def __init__(self, leaf: Leaf) -> None:
        self.leaf = leaf
        self.buckets: dict[int, BitMap] = {}

    def apply(self, frame: pl.DataFrame, floor_minute: int) -> None:
        matched = frame.filter(self.leaf.mask(frame))
        if matched.height == 0:
            return
        minutes = matched.get_column("ts").dt.epoch("us").to_numpy() // MINUTE_US
        users = matched.get_column("user_id").to_numpy()
        keep = minutes >= floor_minute
        if not keep.all():
            minutes, users = minutes[keep], users[keep]
        if minutes.size == 0:
            return
        order = np.argsort(minutes, kind="stable")
        minutes, users = minutes[order], users[order].astype(np.uint32)
        cuts = np.flatnonzero(np.diff(minutes)) + 1
        for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [minutes.size])), strict=True):
            minute = int(minutes[lo])
            bucket = self.buckets.get(minute)
            if bucket is None:
                bucket = self.buckets[minute] = BitMap()
            bucket.update(users[lo:hi])

    def members(self, now_minute: int) -> BitMap:
        first = now_minute - self.leaf.minutes
        chosen = [b for m, b in self.buckets.items() if first <= m <= now_minute]
        if not chosen:
            return BitMap()
        return BitMap.union(*chosen) if len(chosen) > 1 else BitMap(chosen[0])

    def prune(self, now_minute: int) -> None:
        first = now_minute - self.leaf.minutes
        for minute in [m for m in self.buckets if m < first]:
            del self.buckets[minute]

    def memory_bytes(self) -> int:
        total = 0
        for bucket in self.buckets.values():
            stats = bucket.get_statistics()
            total += (
                stats["n_bytes_array_containers"]
                + stats["n_bytes_bitset_containers"]
                + stats["n_bytes_run_containers"]
            )
        return total


@dataclass
class LivePackState:
    tenant: str
    pack_id: str
    display_name: str
    spec: spec_pb2.PackSpec
    create_time: datetime
    expr: Node
    series: dict[Leaf, Series] = field(default_factory=dict)
    _cache: tuple[tuple[int, int], BitMap] | None = None

    @property
    def name(self) -> str:
        return f"tenants/{self.tenant}/livePacks/{self.pack_id}"

    @property
    def window_minutes(self) -> int:
        return max(leaf.minutes for leaf in self.expr.leaves())

    def evaluate(self, node: Node, now_minute: int) -> BitMap:
        if node.op == "leaf":
            assert node.leaf is not None
            return self.series[node.leaf].members(now_minute)
        parts = [self.evaluate(c, now_minute) for c in node.children]
        if node.op == "union":
            return BitMap.union(*parts)
        if node.op == "intersect":
            return BitMap.intersection(*parts)
        base = parts[0]
        for other in parts[1:]:
            base -= other
        return base


class LivePackEngine(StreamFollower):
    """All live packs of a process, fed from the bus."""

    consumer = "live-packs"

    def __init__(
        self,
        bus: EventBus,
        store: ObjectStore | None = None,
        *,
        prefix: str = "live/",
        margin: timedelta = timedelta(minutes=5),
        clock=time.monotonic,
    ) -> None:
        super().__init__(bus, clock=clock)
        self.store = store
        self.prefix = prefix
        self.margin = margin
        self.packs: dict[tuple[str, str], LivePackState] = {}

    # ---- clock ----------------------------------------------------------------------------------

    def now_minute(self) -> int:
        return self.now_us() // MINUTE_US

    # ---- definitions ----------------------------------------------------------------------------

    def _key(self, tenant: str, pack_id: str) -> str:
        return f"{self.prefix}{tenant}/{pack_id}.json"

    def load_definitions(self) -> int:
        if self.store is None:
            return 0
        count = 0
        for info in self.store.list(self.prefix):
            if not info.key.endswith(".json"):
                continue
            try:
                doc = json.loads(self.store.get_bytes(info.key))
                spec = json_format.ParseDict(doc["spec"], spec_pb2.PackSpec())
                self._install(doc["tenant"], doc["pack_id"], doc.get("display_name", ""), spec,
                              datetime.fromisoformat(doc["create_time"]))  # fmt: skip
                count += 1
            except Exception:
                logger.exception("live pack definition %s unreadable; skipped", info.key)
        return count

    def _install(
        self, tenant: str, pack_id: str, display_name: str, spec: spec_pb2.PackSpec, created: datetime
    ) -> LivePackState:
        expr = compile_live_spec(spec)
        state = LivePackState(tenant, pack_id, display_name, spec, created, expr)
        state.series = {leaf: Series(leaf) for leaf in expr.leaves()}
        self.packs[(tenant, pack_id)] = state
        return state

    async def create(
        self, tenant: str, pack_id: str, display_name: str, spec: spec_pb2.PackSpec
    ) -> LivePackState:
        if (tenant, pack_id) in self.packs:
            raise AlreadyExists(LIVE_PACK_TYPE, f"tenants/{tenant}/livePacks/{pack_id}")
        state = self._install(tenant, pack_id, display_name, spec, datetime.now(UTC))
        if self.store is not None:
            doc = {
                "tenant": tenant,
                "pack_id": pack_id,
                "display_name": display_name,
                "spec": json_format.MessageToDict(spec),
                "create_time": state.create_time.isoformat(),
            }
            await asyncio.to_thread(
                self.store.put_bytes, self._key(tenant, pack_id), json.dumps(doc).encode()
            )
        if self._task is not None:
            await self._backfill(state)
        return state

    async def delete(self, tenant: str, pack_id: str) -> None:
        if self.packs.pop((tenant, pack_id), None) is None:
            raise NotFound(LIVE_PACK_TYPE, f"tenants/{tenant}/livePacks/{pack_id}")
        if self.store is not None:
            with contextlib.suppress(ObjectNotFound):
                await asyncio.to_thread(self.store.delete, self._key(tenant, pack_id))

    def get(self, tenant: str, pack_id: str) -> LivePackState:
        state = self.packs.get((tenant, pack_id))
        if state is None:
            raise NotFound(LIVE_PACK_TYPE, f"tenants/{tenant}/livePacks/{pack_id}")
        return state

    # ---- reading --------------------------------------------------------------------------------

    def members(self, state: LivePackState) -> BitMap:
        """Current members (cached until the next applied message or minute)."""
        key = (self.seq, self.now_minute())
        if state._cache is not None and state._cache[0] == key:
            return state._cache[1]
        bitmap = state.evaluate(state.expr, key[1])
        state._cache = (key, bitmap)
        return bitmap

    def live_members(self, tenant: str, pack_id: str) -> tuple[int, BitMap]:
        """``AudienceServicer.live_packs`` protocol: ``(last stream sequence applied, members)``."""
        return self.seq, self.members(self.get(tenant, pack_id))

    def memory_bytes(self, state: LivePackState) -> int:
        return sum(s.memory_bytes() for s in state.series.values())

    # ---- feeding --------------------------------------------------------------------------------

    def apply(self, frame: pl.DataFrame, seq: int, targets: Iterable[LivePackState] | None = None) -> None:
        """Apply one decoded batch (stream sequence ``seq``) to every pack (or ``targets``)."""
        if frame.height:
            self.observe(int(frame.get_column("ts").dt.epoch("us").max()))
        now_minute = self.now_minute()
        for state in list(targets if targets is not None else self.packs.values()):
            floor = now_minute - state.window_minutes
            for series in state.series.values():
                series.apply(frame, floor)
                series.prune(now_minute)
            state._cache = None
        if targets is None:
            self.seq = max(self.seq, seq)

    def _start_time(self, minutes: int) -> datetime:
        return datetime.now(UTC) - timedelta(minutes=minutes) - self.margin

    async def _backfill(self, state: LivePackState) -> None:
        """Fill a new pack from the stream up to the sequence the main loop has reached."""
        until = self.seq
        sub = await self.bus.subscribe(
            f"live-backfill-{state.pack_id}", start_time=self._start_time(state.window_minutes)
        )
        try:
            while True:
                batch = await sub.fetch(256, 0.2)
                if not batch:
                    break
                for d in batch:
                    if d.seq > until:
                        return
                    self.apply(decode_batch(d.payload), d.seq, targets=[state])
        finally:
            await sub.close()

    def first_start_time(self) -> datetime:
        """Replay from the longest window back (at least an hour) when there is no checkpoint."""
        longest = max((s.window_minutes for s in self.packs.values()), default=60)
        return self._start_time(max(longest, 60))


# ---------------------------------------------------------------------------------------------------
# gRPC


def _ts(value: datetime | int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if isinstance(value, int):
        ts.FromMicroseconds(value)
    else:
        ts.FromDatetime(value)
    return ts


class LivePackServicer(live_pack_pb2_grpc.LivePackServiceServicer):
    def __init__(self, engine: LivePackEngine, app: Any) -> None:
        self.engine = engine
        self.app = app  # AudienceApp: packs (snapshots), membership cache, tenancy

    def _tenant(self, parent: str, context) -> str:
        tenant = parse_parent(parent)
        return self.app.tenancy.authorize(context, tenant, resource_type=TENANT_TYPE)

    def _named(self, name: str, context) -> LivePackState:
        tenant, pack_id = parse_live_pack_name(name)
        self.app.tenancy.authorize(context, tenant, resource_type=LIVE_PACK_TYPE, name=name)
        return self.engine.get(tenant, pack_id)

    def to_pb(self, state: LivePackState) -> live_pack_pb2.LivePack:
        members = self.engine.members(state)
        return live_pack_pb2.LivePack(
            name=state.name,
            display_name=state.display_name,
            spec=state.spec,
            size=len(members),
            as_of=_ts(self.engine.now_us()),
            stream_sequence=self.engine.seq,
            create_time=_ts(state.create_time),
            memory_bytes=self.engine.memory_bytes(state),
        )

    async def CreateLivePack(self, request, context):
        tenant = self._tenant(request.parent, context)
        check_id(request.live_pack_id, "live_pack_id")
        if not request.live_pack.HasField("spec"):
            raise InvalidArgument("live_pack.spec", "required")
        state = await self.engine.create(
            tenant, request.live_pack_id, request.live_pack.display_name, request.live_pack.spec
        )
        return self.to_pb(state)

    async def GetLivePack(self, request, context):
        return self.to_pb(self._named(request.name, context))

    async def ListLivePacks(self, request, context):
        tenant = self._tenant(request.parent, context)
        if request.page_size < 0 or request.page_size > 1000:
            raise InvalidArgument("page_size", "must be 0..1000")
        size = request.page_size or 50
        ids = sorted(p for t, p in self.engine.packs if t == tenant)
        start = int(request.page_token) if request.page_token.isdigit() else 0
        page = ids[start : start + size]
        token = str(start + size) if start + size < len(ids) else ""
        return live_pack_pb2.ListLivePacksResponse(
            live_packs=[self.to_pb(self.engine.get(tenant, p)) for p in page], next_page_token=token
        )

    async def DeleteLivePack(self, request, context):
        state = self._named(request.name, context)
        await self.engine.delete(state.tenant, state.pack_id)
        return empty_pb2.Empty()

    async def SnapshotLivePack(self, request, context):
        state = self._named(request.name, context)
        check_id(request.pack_id, "pack_id")
        bitmap = BitMap(self.engine.members(state))
        pack = pack_pb2.Pack(
            display_name=request.display_name or state.display_name or state.pack_id,
            spec=state.spec,
            source=pack_pb2.Pack.SOURCE_LIVE_SNAPSHOT,
            labels={"live-pack": state.pack_id},
        )
        stats = pack_pb2.BuildStats(shard="0/1")
        stats.as_of.CopyFrom(_ts(self.engine.now_us()))
        # The pack id is claimed like a build's, so a concurrent CreatePack of the same id waits its turn.
        reservation = self.app.servicer.reserve_pack(
            state.tenant, request.pack_id, f"snapshot of {state.name}"
        )
        try:
            stored = await asyncio.to_thread(
                self.app.packs.publish_version, state.tenant, request.pack_id, bitmap, pack, stats
            )
        finally:
            self.app.servicer.release_pack(state.tenant, request.pack_id, reservation)
        self.app.membership.invalidate(state.tenant, request.pack_id)
        return stored


# ---------------------------------------------------------------------------------------------------
# Wiring into the audience process


def live_service(app: Any) -> ServiceDefinition:
    """LivePackService + EventService (+ the compactor on the in-process bus) for the audience server."""
    from services.events.compactor import compactor_from_settings
    from services.events.ingest import event_service_definition

    settings = load_settings(RealtimeSettings)
    bus = open_bus(settings.bus_url, shard_count=settings.bus_shards)
    engine = LivePackEngine(bus, app.store)
    engine.load_definitions()
    app.live_packs = engine
    app.servicer.live_packs = (
        engine  # CheckMembership answers live pack names from the engine (LiveMembership)
    )
    servicer = LivePackServicer(engine, app)
    event_names, register_events = event_service_definition(settings, bus)
    compactor = compactor_from_settings(settings, app.store, bus) if bus.url.startswith("memory") else None
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        try:
            await bus.start()
        except BusUnavailable as error:
            logger.warning("event bus not reachable at start: %s", error)
        engine.start()
        if compactor is not None:
            tasks.append(asyncio.get_running_loop().create_task(compactor.run(), name="compactor"))

    with contextlib.suppress(RuntimeError):  # no running loop: the caller starts it
        tasks.append(asyncio.get_running_loop().create_task(start(), name="live-start"))

    async def stop() -> None:
        await engine.stop()
        if compactor is not None:
            compactor.stop()
        for task in tasks:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 30)
        await bus.close()

    def register(server: grpc.aio.Server) -> None:
        live_pack_pb2_grpc.add_LivePackServiceServicer_to_server(servicer, server)
        register_events(server)

    names = [live_pack_pb2.DESCRIPTOR.services_by_name["LivePackService"].full_name, *event_names]
    return ServiceDefinition(names=names, register=register, on_stop=[stop])
