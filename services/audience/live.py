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

**Off the serving loop.** The event loop that serves CheckMembership only fetches from the bus and
hands payloads to the ``Applier`` thread through a bounded queue (a full queue slows the follower,
never the loop). The thread decodes them, merges batches that waited together, converts the columns
to numpy once per batch (``Batch``) and evaluates only the leaves ``Dispatch`` finds for the
``(item/category/campaign/video, event type)`` pairs the batch carries, updating each pack under
that pack's lock, all its series at once. It gives the GIL away every millisecond of work and, after
a pass, pauses as long as the pass took (at most 0.1 s). A read takes a pack's lock only to evaluate
a pack whose version or minute changed since its last read. So one tenant's many live packs cost
another tenant's CheckMembership at most about a millisecond, not every pack's update of every
batch (``bench/tenant_flood.py``).

**Owners.** Events carry an ``owner`` column: ``_platform`` for the platform's behaviour events, the
tenant id for a tenant's own conversion events (stamped by the gateway). A live pack of tenant T
counts the events whose owner is ``_platform`` or T; a batch without the column (the stream before
owners) is all the platform's, and so is a null owner.

**Quota.** A tenant principal may have ``FLASHCROWD_TENANT_MAX_LIVE_PACKS`` live packs (counted and
installed under one lock; RESOURCE_EXHAUSTED ``TENANT_QUOTA`` past it, nothing stored); platform
principals are exempt (``services/audience/quotas.py``).

``live_service(app)`` (picked up by ``services.audience.server``) serves LivePackService and, in
the same process, the EventService on the same bus; with the in-process bus (``memory://``, the
embedded default) it also runs the compactor, so the demo needs no servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, Protocol

import grpc
import numpy as np
import polars as pl
from flashcrowd.audience.v1 import live_pack_pb2, live_pack_pb2_grpc, pack_pb2, spec_pb2
from google.protobuf import empty_pb2, json_format, timestamp_pb2
from pyroaring import BitMap

from services.audience.compiler import SHORTCUT_EVENT_TYPES, ids_to_bitmap
from services.audience.operation_store import ReservationConflict
from services.audience.operations import PackClaims
from services.audience.privacy import is_exact_for
from services.audience.quotas import Limit, TenantQuotas, quota_refusal
from services.audience.tenancy import (
    LIVE_PACK_TYPE,
    TENANT_TYPE,
    check_id,
    parse_live_pack_name,
    parse_parent,
)
from services.events.bus import BusUnavailable, EventBus, open_bus
from services.events.codec import decode_batch
from services.events.compactor import compactor_from_settings
from services.events.config import RealtimeSettings
from services.events.follower import StreamFollower
from services.events.ingest import event_service_definition
from services.events.schema import EventType
from services.runtime import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ServiceDefinition,
    Unavailable,
    load_settings,
)
from services.storage import ObjectNotFound, ObjectStore

__all__ = [
    "LIVE_PACK_TYPE",
    "LiveDeps",
    "LivePackEngine",
    "LivePackServicer",
    "LiveParts",
    "compile_live_spec",
    "live_service",
    "open_live",
]

logger = logging.getLogger(__name__)

MAX_WINDOW_MINUTES = 24 * 60
MINUTE_US = 60_000_000
#: Applying a batch gives the GIL away for ``GIL_YIELD_SECONDS`` after every ``GIL_SLICE_SECONDS`` of
#: work: the serving loop then waits for it about a millisecond at most, not the interpreter's 5 ms
#: switch interval (a sleep releases the GIL for sure; ``sleep(0)`` would take it straight back).
GIL_SLICE_SECONDS = 0.001
GIL_YIELD_SECONDS = 0.0002
#: The events' owner column (stamped by the gateway) and the owner of the platform's own events.
OWNER_COLUMN = "owner"
PLATFORM_OWNER = "_platform"

# The batch compiler's one-leaf shortcuts, plus purchasers approximated as payers: a live window
# keeps no order history to subtract fully refunded payments from.
_SHORTCUT_TYPES = {**SHORTCUT_EVENT_TYPES, spec_pb2.Shortcut.KIND_PURCHASERS: (int(EventType.PAY),)}


#: How often a replica re-reads the stored definitions (creates and deletes made on other replicas).
DEFINITION_SYNC_SECONDS = 0.5
#: The fleet-wide reservation a tenant's live-pack creates are counted and written under.
CREATE_RESOURCE = "livePacks"


class Reservations(Protocol):
    """Fleet-wide claims on a tenant's resource (``OperationManager``: the control database)."""

    def reserve(self, tenant: str, resource: str, *, lease_seconds: float = ...) -> str: ...

    def release(self, tenant: str, resource: str, holder: str) -> None: ...


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

    def dispatch_keys(self) -> set[tuple[str, int, int]]:
        """Where ``Dispatch`` files this leaf: ``(column, value, event type)`` of its first id filter
        (item, category, campaign, video), or ``("", 0, event type)`` when it has none."""
        for column, values in self._id_filters():
            return {(column, value, t) for value in values for t in self.types}
        return {("", 0, t) for t in self.types}

    def _id_filters(self) -> Iterator[tuple[str, frozenset[int]]]:
        for column, values in (
            ("item_id", self.item_ids),
            ("category_id", self.category_ids),
            ("campaign_id", self.campaign_ids),
            ("video_id", self.video_ids),
        ):
            if values:
                yield column, values

    def rows(self, batch: Batch) -> np.ndarray:
        """Indices of the batch's rows this leaf matches (numpy; no Python per row).

        The first id filter picks candidate rows through the batch's sorted index of that column
        (a binary search per value, so a leaf on one item costs O(log n + matches), not O(n));
        the other conditions are checked on the candidates only.
        """
        candidates: np.ndarray | None = None
        for column, values in self._id_filters():
            if candidates is None:
                candidates = batch.rows_with(column, values)
            else:
                ids, present = batch.column(column)
                keep = np.isin(ids[candidates], np.fromiter(values, dtype=np.int64, count=len(values)))
                if present is not None and 0 in values:  # a null id is "n/a", never the id 0
                    keep &= present[candidates]
                candidates = candidates[keep]
            if candidates.size == 0:
                return candidates
        if candidates is None:
            candidates = batch.rows_of_types(self.types)
        else:
            candidates = candidates[batch.type_mask(self.types)[candidates]]
        if candidates.size and (self.min_fen or self.max_fen):
            amounts, present = batch.column("amount_fen")
            picked = amounts[candidates]
            keep = np.ones(candidates.size, dtype=bool)
            if self.min_fen:
                keep &= picked >= self.min_fen
            if self.max_fen:
                keep &= picked <= self.max_fen
            if present is not None:  # a missing amount matches no amount filter
                keep &= present[candidates]
            candidates = candidates[keep]
        return candidates


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


class Batch:
    """One decoded bus batch as numpy columns, converted once and shared by every pack it is applied to.

    Columns are converted when first asked for (``memory()`` frames of the benchmark carry only a
    few); per-batch caches hold the masks of event-type sets, sorted indexes of id columns (a leaf on
    one item finds its rows by binary search) and tenants' visibility. ``visible(tenant)`` is the
    owner filter.
    """

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame
        self.height = frame.height
        self._columns: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self._masks: dict[Any, np.ndarray] = {}
        self._indexes: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._visible: dict[str, np.ndarray | None] = {}
        self._users: np.ndarray | None = None
        self._minutes: np.ndarray | None = None
        self._micros: np.ndarray | None = None
        self._type_codes: np.ndarray | None = None

    @property
    def users(self) -> np.ndarray:
        if self._users is None:
            self._users = self.frame.get_column("user_id").to_numpy().astype(np.uint32, copy=False)
        return self._users

    @property
    def micros(self) -> np.ndarray:
        """Event time of each row, UTC epoch microseconds."""
        if self._micros is None:
            ts = self.frame.get_column("ts")
            if ts.dtype != pl.Datetime("us", "UTC"):
                ts = ts.cast(pl.Datetime("us", "UTC"))
            self._micros = ts.to_physical().to_numpy()
        return self._micros

    @property
    def minutes(self) -> np.ndarray:
        """Minute of each event (event time, UTC epoch minutes)."""
        if self._minutes is None:
            self._minutes = self.micros // MINUTE_US
        return self._minutes

    def newest_us(self) -> int | None:
        return int(self.micros.max()) if self.height else None

    def column(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(values with nulls as 0, presence mask or None when nothing is null)``."""
        found = self._columns.get(name)
        if found is None:
            series = self.frame.get_column(name)
            present = series.is_not_null().to_numpy() if series.null_count() else None
            found = self._columns[name] = (series.fill_null(0).to_numpy(), present)
        return found

    def type_mask(self, types: frozenset[int]) -> np.ndarray:
        mask = self._masks.get(types)
        if mask is None:
            if self._type_codes is None:
                self._type_codes = self.frame.get_column("event_type").to_numpy().astype(np.uint8, copy=False)
            table = np.zeros(256, dtype=bool)
            table[[t for t in types if 0 <= t < 256]] = True
            mask = self._masks[types] = table[self._type_codes]
        return mask

    def rows_of_types(self, types: frozenset[int]) -> np.ndarray:
        key = ("rows", types)
        rows = self._masks.get(key)
        if rows is None:
            rows = self._masks[key] = np.flatnonzero(self.type_mask(types))
        return rows

    def rows_with(self, column: str, values: frozenset[int]) -> np.ndarray:
        """Indices of the rows whose ``column`` is one of ``values`` (null never matches)."""
        index = self._indexes.get(column)
        if index is None:
            ids, present = self.column(column)
            order = np.argsort(ids, kind="stable")
            if present is not None:  # nulls (filled with 0) out of the index
                order = order[present[order]]
            index = self._indexes[column] = (order, ids[order])
        order, ordered = index
        if len(values) == 1:
            value = next(iter(values))
            lo, hi = np.searchsorted(ordered, value, "left"), np.searchsorted(ordered, value, "right")
            return order[lo:hi]
        wanted = np.fromiter(values, dtype=np.int64, count=len(values))
        los, his = np.searchsorted(ordered, wanted, "left"), np.searchsorted(ordered, wanted, "right")
        hit = his > los
        if not hit.any():
            return order[:0]
        return np.concatenate([order[lo:hi] for lo, hi in zip(los[hit], his[hit], strict=True)])

    def present_keys(self, column: str) -> list[tuple[str, int, int]]:
        """The distinct ``(column, value, event type)`` of the rows (``("", 0, type)`` for ``""``)."""
        if self._type_codes is None:
            self._type_codes = self.frame.get_column("event_type").to_numpy().astype(np.uint8, copy=False)
        if not column:
            return [("", 0, int(t)) for t in np.flatnonzero(np.bincount(self._type_codes, minlength=256))]
        ids, present = self.column(column)
        codes = ids.astype(np.int64) * 256 + self._type_codes
        if present is not None:
            codes = codes[present]
        return [(column, int(c) >> 8, int(c) & 0xFF) for c in np.unique(codes)]

    def visible(self, tenant: str) -> np.ndarray | None:
        """Rows a live pack of ``tenant`` may count: owner ``_platform`` or ``tenant``; None = every row.

        Without an ``owner`` column every event is the platform's (the stream before owners were
        stamped); a null owner counts as the platform's for the same reason. Another tenant's events
        (its own conversions, stamped by the gateway) are never counted.
        """
        if tenant in self._visible:
            return self._visible[tenant]
        if OWNER_COLUMN not in self.frame.columns:
            mask = None
        else:
            owner = self.frame.get_column(OWNER_COLUMN).cast(pl.Utf8)
            shown = (owner.is_null() | (owner == PLATFORM_OWNER) | (owner == tenant)).fill_null(True)
            mask = None if shown.all() else shown.to_numpy()
        self._visible[tenant] = mask
        return mask


class Series:
    """Per-minute bitmaps of the users matching one leaf."""

    def __init__(self, leaf: Leaf) -> None:
        self.leaf = leaf
        self.buckets: dict[int, BitMap] = {}

    def apply(
        self, batch: Batch | pl.DataFrame, floor_minute: int, visible: np.ndarray | None = None
    ) -> bool:
        """Add the batch's matching users (rows in ``visible``, default all) to their minute buckets.

        Returns whether any bucket changed.
        """
        if isinstance(batch, pl.DataFrame):
            batch = Batch(batch)
        rows = self.leaf.rows(batch)
        if visible is not None and rows.size:
            rows = rows[visible[rows]]
        if rows.size == 0:
            return False
        minutes = batch.minutes[rows]
        users = batch.users[rows]
        keep = minutes >= floor_minute
        if not keep.all():
            minutes, users = minutes[keep], users[keep]
        if minutes.size == 0:
            return False
        first, last = int(minutes.min()), int(minutes.max())
        if first == last:  # the usual case of a live stream: one minute per batch
            self._add(first, users)
            return True
        order = np.argsort(minutes, kind="stable")
        minutes, users = minutes[order], users[order]
        cuts = np.flatnonzero(np.diff(minutes)) + 1
        for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [minutes.size])), strict=True):
            self._add(int(minutes[lo]), users[lo:hi])
        return True

    def _add(self, minute: int, users: np.ndarray) -> None:
        bucket = self.buckets.get(minute)
        added = ids_to_bitmap(users) if users.size > 64 else BitMap(users.tolist())
        if bucket is None:
            self.buckets[minute] = added
        else:
            bucket |= added

    def members(self, now_minute: int) -> BitMap:
        first = now_minute - self.leaf.minutes
        chosen = [b for m, b in self.buckets.items() if first <= m <= now_minute]
        if not chosen:
            return BitMap()
        return BitMap.union(*chosen) if len(chosen) > 1 else BitMap(chosen[0])

    def prune(self, now_minute: int) -> bool:
        """Drop buckets older than the window; returns whether any was dropped."""
        first = now_minute - self.leaf.minutes
        old = [m for m in self.buckets if m < first]
        for minute in old:
            del self.buckets[minute]
        return bool(old)

    def memory_bytes(self) -> int:
        total = 0
        for bucket in list(self.buckets.values()):
            stats = bucket.get_statistics()
            total += (
                stats["n_bytes_array_containers"]
                + stats["n_bytes_bitset_containers"]
                + stats["n_bytes_run_containers"]
            )
        return total


class Dispatch:
    """Which series of which packs a batch can touch, so a batch costs its matching leaves, not all.

    Every series is filed under its leaf's ``dispatch_keys``; a batch looks up the keys its rows
    carry (``Batch.present_keys``). Changed by the engine under its ``_packs_lock``.
    """

    def __init__(self) -> None:
        self._table: dict[tuple[str, int, int], list[tuple[LivePackState, Series]]] = {}
        self._columns: dict[str, int] = {}  # column -> series filed under it

    def add(self, state: LivePackState) -> None:
        for series in state.series.values():
            for key in series.leaf.dispatch_keys():
                self._table.setdefault(key, []).append((state, series))
                self._columns[key[0]] = self._columns.get(key[0], 0) + 1

    def remove(self, state: LivePackState) -> None:
        for series in state.series.values():
            for key in series.leaf.dispatch_keys():
                entries = [e for e in self._table.get(key, ()) if e[0] is not state]
                if entries:
                    self._table[key] = entries
                else:
                    self._table.pop(key, None)
                left = self._columns.get(key[0], 0) - 1
                if left > 0:
                    self._columns[key[0]] = left
                else:
                    self._columns.pop(key[0], None)

    def candidates(self, batch: Batch) -> dict[LivePackState, set[Series]]:
        found: dict[LivePackState, set[Series]] = {}
        for column in list(self._columns):
            for key in batch.present_keys(column):
                for state, series in self._table.get(key, ()):
                    found.setdefault(state, set()).add(series)
        return found


@dataclass(eq=False)
class LivePackState:
    """One live pack. Its series change only under ``lock`` (the applier thread, one pack at a time);
    readers evaluate under the same lock, so a read sees every batch applied to this pack wholly or
    not at all (both sides of "clicked and not paid" from the same batches)."""

    tenant: str
    pack_id: str
    display_name: str
    spec: spec_pb2.PackSpec
    create_time: datetime
    expr: Node
    series: dict[Leaf, Series] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Bumped by every change of a series (new members, dropped buckets): the read cache's key.
    version: int = 0
    #: Minute of the clock when buckets older than the window were last dropped.
    pruned_minute: int = -1
    _cache: tuple[tuple[int, int], BitMap] | None = None

    @property
    def name(self) -> str:
        return f"tenants/{self.tenant}/livePacks/{self.pack_id}"

    @cached_property
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


@dataclass
class _Work:
    payload: bytes | None = None
    seq: int = 0
    targets: tuple[LivePackState, ...] | None = None
    done: asyncio.Future | None = None  # a barrier: set once everything before it is applied
    stop: bool = False


class Applier:
    """The thread that applies batches to live packs, fed through a bounded queue.

    ``submit`` waits (asynchronously) for a free slot, so a slow applier slows the stream follower,
    never the event loop. Batches of the main stream waiting together are applied as one (fewer
    passes over the packs under a flood); ``barrier()`` resolves once everything submitted before it
    is applied. Batches are decoded in the thread too.
    """

    #: Rows of waiting batches merged into one pass at most.
    MAX_MERGED_ROWS = 50_000
    #: Longest pause between passes (the pause is as long as the previous pass, so the thread holds
    #: the GIL at most about half the time under a flood, and merges what arrives meanwhile).
    MAX_PAUSE_SECONDS = 0.1

    def __init__(self, engine: LivePackEngine, max_pending: int = 64) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self._queue: queue.Queue[_Work] = queue.Queue()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._slots = asyncio.Semaphore(self.max_pending)
            self._thread = threading.Thread(target=self._run, name="live-pack-applier", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    async def submit(
        self, payload: bytes, seq: int, targets: tuple[LivePackState, ...] | None = None
    ) -> None:
        assert self._slots is not None, "Applier.start() first"
        await self._slots.acquire()
        self._queue.put(_Work(payload, seq, targets))

    async def barrier(self) -> None:
        assert self._loop is not None and self._slots is not None, "Applier.start() first"
        done = self._loop.create_future()
        await self._slots.acquire()
        self._queue.put(_Work(done=done))
        await done

    async def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_Work(stop=True))
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    def _release(self, count: int) -> None:
        assert self._loop is not None and self._slots is not None
        slots = self._slots

        def release() -> None:
            for _ in range(count):
                slots.release()

        with contextlib.suppress(RuntimeError):  # loop closed
            self._loop.call_soon_threadsafe(release)

    def _run(self) -> None:
        pending: deque[_Work] = deque()  # taken from the queue while merging, not yet applied
        resume = 0.0  # monotonic time the next pass may start
        while True:
            work = pending.popleft() if pending else self._queue.get()
            if work.stop:
                return
            taken = 1
            try:
                if work.done is not None:
                    self._resolve(work.done)
                    continue
                pause = resume - time.monotonic()
                if pause > 0:
                    time.sleep(pause)  # the GIL is the serving loop's meanwhile
                started = time.monotonic()
                frames = [decode_batch(work.payload or b"")]
                seq, rows = work.seq, frames[0].height
                while work.targets is None and rows < self.MAX_MERGED_ROWS:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more.stop or more.done is not None or more.targets is not None:
                        pending.append(more)  # handled after this pass, in order
                        break
                    taken += 1
                    frames.append(decode_batch(more.payload or b""))
                    seq, rows = max(seq, more.seq), rows + frames[-1].height
                frame = frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")
                self.engine.apply(frame, seq, targets=work.targets)
                took = time.monotonic() - started
                resume = time.monotonic() + min(took, self.MAX_PAUSE_SECONDS)
            except Exception:
                logger.exception("live packs: applying batch %s failed; skipped", work.seq)
            finally:
                self._release(taken)

    def _resolve(self, done: asyncio.Future) -> None:
        assert self._loop is not None

        def resolve() -> None:
            if not done.done():
                done.set_result(None)

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(resolve)


class LivePackEngine(StreamFollower):
    """All live packs of a process, fed from the bus.

    Threads: definitions (``packs``) change on the event loop under ``_packs_lock``; once started,
    batches are applied by the ``Applier`` thread, one pack at a time under that pack's lock, so the
    event loop that serves CheckMembership only ever waits for one pack's update of one batch.
    ``apply`` may also be called directly (tests, tools): it then runs in the caller's thread.
    """

    consumer = "live-packs"

    def __init__(
        self,
        bus: EventBus,
        store: ObjectStore | None = None,
        *,
        prefix: str = "live/",
        margin: timedelta = timedelta(minutes=5),
        clock=time.monotonic,
        max_pending_batches: int = 64,
        reservations: Reservations | None = None,
        sync_seconds: float = DEFINITION_SYNC_SECONDS,
    ) -> None:
        super().__init__(bus, clock=clock)
        self.store = store
        self.prefix = prefix
        self.margin = margin
        self.reservations = reservations
        self.sync_seconds = sync_seconds
        self.packs: dict[tuple[str, str], LivePackState] = {}
        # Definition sync (every replica serves every live pack): when each installed definition was
        # known to be stored, keys being created here, and keys deleted here (with when), so that a
        # listing taken before a local create or delete never undoes it.
        self._stored_at: dict[str, float] = {}
        self._creating: set[str] = set()
        self._deleted_at: dict[str, float] = {}
        self._unreadable: set[str] = set()
        self._create_lock = asyncio.Lock()
        self._sync_task: asyncio.Task | None = None
        self._packs_lock = threading.Lock()
        self._dispatch = Dispatch()
        self._watermark: tuple[int, float] | None = None  # (newest event time, clock when seen)
        self._fetched = 0  # last stream sequence handed to the applier
        self.applier = Applier(self, max_pending_batches)

    # ---- clock ----------------------------------------------------------------------------------

    def now_us(self) -> int:
        watermark = self._watermark  # one tuple: read atomically against the applier's writes
        if watermark is None:
            return int(datetime.now(UTC).timestamp() * 1_000_000)
        return watermark[0] + int((self.clock() - watermark[1]) * 1_000_000)

    def observe(self, newest_us: int) -> None:
        watermark = self._watermark
        if watermark is None or newest_us > watermark[0]:
            self._watermark = (newest_us, self.clock())

    def now_minute(self) -> int:
        return self.now_us() // MINUTE_US

    # ---- definitions ----------------------------------------------------------------------------

    def _key(self, tenant: str, pack_id: str) -> str:
        return f"{self.prefix}{tenant}/{pack_id}.json"

    def load_definitions(self) -> int:
        """Install every stored definition (at start-up, before following). Blocking."""
        return len(self.sync_definitions())

    def _load(self, key: str) -> LivePackState | None:
        """Install the definition stored at ``key`` (None if it vanished or is unreadable). Blocking."""
        assert self.store is not None
        try:
            doc = json.loads(self.store.get_bytes(key))
            spec = json_format.ParseDict(doc["spec"], spec_pb2.PackSpec())
            tenant, pack_id = doc["tenant"], doc["pack_id"]
            if (tenant, pack_id) in self.packs:
                return None
            return self._install(tenant, pack_id, doc.get("display_name", ""), spec,
                                 datetime.fromisoformat(doc["create_time"]))  # fmt: skip
        except (ObjectNotFound, AlreadyExists):  # deleted meanwhile, or installed by a local create
            return None
        except Exception:
            if key not in self._unreadable:
                self._unreadable.add(key)
                logger.exception("live pack definition %s unreadable; skipped", key)
            return None

    def sync_definitions(self) -> list[LivePackState]:
        """Make the installed packs those stored: install what other replicas created, drop what they
        deleted. Returns the packs installed (the caller backfills them). Blocking."""
        if self.store is None:
            return []
        started = self.clock()
        stored = {info.key for info in self.store.list(self.prefix) if info.key.endswith(".json")}
        with self._packs_lock:
            installed = {self._key(t, p): (t, p) for t, p in self.packs}
        added = []
        for key in sorted(stored - installed.keys()):
            if key in self._creating or self._deleted_at.get(key, -1.0) >= started:
                continue  # created here right now, or deleted here after the listing began
            state = self._load(key)
            if state is not None:
                self._stored_at[key] = started
                added.append(state)
        for key, (tenant, pack_id) in installed.items():
            if (
                key not in stored
                and key not in self._creating
                and self._stored_at.get(key, started) < started
            ):
                self._uninstall(tenant, pack_id)  # deleted by another replica
                self._stored_at.pop(key, None)
        return added

    async def load_one(self, tenant: str, pack_id: str) -> LivePackState | None:
        """Install one pack another replica created just now (a read of it arrived before the sync)."""
        if self.store is None:
            return None
        key = self._key(tenant, pack_id)
        started = self.clock()
        state = await asyncio.to_thread(self._load, key)
        if state is not None:
            self._stored_at[key] = started
            if self._task is not None and self.applier.running:
                await self._backfill(state)
        return state

    async def follow_definitions(self) -> None:
        """Every ``sync_seconds``: ``sync_definitions`` and backfill what it installed (until stopped)."""
        while True:
            await asyncio.sleep(self.sync_seconds)
            now = self.clock()  # forget old tombstones here, on the loop that writes them
            for key in [k for k, t in self._deleted_at.items() if now - t > 60.0]:
                del self._deleted_at[key]
            try:
                added = await asyncio.to_thread(self.sync_definitions)
            except Exception as error:  # store unreachable: keep serving what is installed
                logger.warning("live pack definitions not synced: %s", error)
                continue
            for state in added:
                if self._task is not None and self.applier.running:
                    await self._backfill(state)

    def _install(
        self,
        tenant: str,
        pack_id: str,
        display_name: str,
        spec: spec_pb2.PackSpec,
        created: datetime,
        limit: Limit | None = None,
    ) -> LivePackState:
        expr = compile_live_spec(spec)
        state = LivePackState(tenant, pack_id, display_name, spec, created, expr)
        state.series = {leaf: Series(leaf) for leaf in expr.leaves()}
        with self._packs_lock:
            if (tenant, pack_id) in self.packs:
                raise AlreadyExists(LIVE_PACK_TYPE, f"tenants/{tenant}/livePacks/{pack_id}")
            if limit is not None:  # counted and taken under one lock: two creates never both get the last
                owned = sum(1 for t, _ in self.packs if t == tenant)
                if owned >= limit.value:
                    raise quota_refusal(tenant, limit, used=owned, retry_after_seconds=60.0)
            self.packs[(tenant, pack_id)] = state
            self._dispatch.add(state)
        return state

    def count(self, tenant: str) -> int:
        with self._packs_lock:
            return sum(1 for t, _ in self.packs if t == tenant)

    async def create(
        self,
        tenant: str,
        pack_id: str,
        display_name: str,
        spec: spec_pb2.PackSpec,
        *,
        limit: Limit | None = None,
    ) -> LivePackState:
        """Define a live pack (and backfill it from the stream when following); ``limit``: the
        tenant's live-pack quota (RESOURCE_EXHAUSTED ``TENANT_QUOTA`` at it, nothing stored).

        With a store the id and the quota are checked against the stored definitions, under a
        fleet-wide reservation of the tenant's creates: two replicas never both create one id or
        both take the last unit of quota.
        """
        if self.store is None:
            return self._install(tenant, pack_id, display_name, spec, datetime.now(UTC), limit)
        compile_live_spec(spec)  # INVALID_ARGUMENT before anything is claimed
        key = self._key(tenant, pack_id)
        created = datetime.now(UTC)
        doc = {
            "tenant": tenant,
            "pack_id": pack_id,
            "display_name": display_name,
            "spec": json_format.MessageToDict(spec),
            "create_time": created.isoformat(),
        }
        self._creating.add(key)
        try:
            async with self._tenant_creates(tenant):
                ids = await asyncio.to_thread(self._stored_ids, tenant)
                if pack_id in ids or (tenant, pack_id) in self.packs:
                    raise AlreadyExists(LIVE_PACK_TYPE, f"tenants/{tenant}/livePacks/{pack_id}")
                if limit is not None and len(ids) >= limit.value:
                    raise quota_refusal(tenant, limit, used=len(ids), retry_after_seconds=60.0)
                await asyncio.to_thread(self.store.put_bytes, key, json.dumps(doc).encode())
            self._stored_at[key] = self.clock()
            state = self._install(tenant, pack_id, display_name, spec, created)
        finally:
            self._creating.discard(key)
        if self._task is not None and self.applier.running:
            await self._backfill(state)
        return state

    def _stored_ids(self, tenant: str) -> set[str]:
        assert self.store is not None
        base = f"{self.prefix}{tenant}/"
        return {
            info.key[len(base) : -len(".json")]
            for info in self.store.list(base)
            if info.key.endswith(".json")
        }

    @contextlib.asynccontextmanager
    async def _tenant_creates(self, tenant: str):
        """Hold the tenant's create reservation (fleet-wide), or a local lock without reservations."""
        if self.reservations is None:
            async with self._create_lock:
                yield
            return
        deadline = time.monotonic() + 5.0
        while True:
            try:
                holder = await asyncio.to_thread(
                    self.reservations.reserve, tenant, CREATE_RESOURCE, lease_seconds=30.0
                )
                break
            except ReservationConflict:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        "another create of this tenant's live packs holds its reservation; retry"
                    ) from None
                await asyncio.sleep(0.02)
        try:
            yield
        finally:
            await asyncio.to_thread(self.reservations.release, tenant, CREATE_RESOURCE, holder)

    def _uninstall(self, tenant: str, pack_id: str) -> LivePackState | None:
        with self._packs_lock:
            removed = self.packs.pop((tenant, pack_id), None)
            if removed is not None:
                self._dispatch.remove(removed)
        return removed

    async def delete(self, tenant: str, pack_id: str) -> None:
        """Remove the definition from the store (every replica drops it at its next sync) and here."""
        key = self._key(tenant, pack_id)
        stored = self.store is not None and await asyncio.to_thread(self.store.exists, key)
        removed = self._uninstall(tenant, pack_id)
        if removed is None and not stored:
            raise NotFound(LIVE_PACK_TYPE, f"tenants/{tenant}/livePacks/{pack_id}")
        if self.store is not None:
            with contextlib.suppress(ObjectNotFound):
                await asyncio.to_thread(self.store.delete, key)
            self._deleted_at[key] = self.clock()
            self._stored_at.pop(key, None)

    def get(self, tenant: str, pack_id: str) -> LivePackState:
        state = self.packs.get((tenant, pack_id))
        if state is None:
            raise NotFound(LIVE_PACK_TYPE, f"tenants/{tenant}/livePacks/{pack_id}")
        return state

    def of_tenant(self, tenant: str) -> list[str]:
        with self._packs_lock:
            return sorted(p for t, p in self.packs if t == tenant)

    # ---- reading --------------------------------------------------------------------------------

    def members(self, state: LivePackState) -> BitMap:
        """Current members: cached until the pack changes or the minute turns; else evaluated under
        the pack's lock (held by the applier only while it updates this one pack)."""
        now_minute = self.now_minute()
        cached = state._cache
        if cached is not None and cached[0] == (state.version, now_minute):
            return cached[1]
        with state.lock:
            key = (state.version, now_minute)
            bitmap = state.evaluate(state.expr, now_minute)
            state._cache = (key, bitmap)
        return bitmap

    def live_members(self, tenant: str, pack_id: str) -> tuple[int, BitMap]:
        """``AudienceServicer.live_packs`` protocol: ``(last stream sequence applied, members)``."""
        state = self.get(tenant, pack_id)
        return self.seq, self.members(state)

    def memory_bytes(self, state: LivePackState) -> int:
        with state.lock:
            return sum(s.memory_bytes() for s in state.series.values())

    # ---- feeding --------------------------------------------------------------------------------

    def apply(self, frame: pl.DataFrame, seq: int, targets: Iterable[LivePackState] | None = None) -> None:
        """Apply one decoded batch (stream sequence ``seq``) to every pack (or ``targets``).

        Only the series ``Dispatch`` finds for the batch's rows are evaluated; each pack counts only
        the events its tenant may see (``Batch.visible``) and is updated under its lock, all its
        series at once. Runs in the calling thread (the applier's, once started). ``seq`` is the
        stream sequence up to which every pack is applied once this returns (not for ``targets``).
        """
        batch = Batch(frame)
        newest = batch.newest_us()
        if newest is not None:
            self.observe(newest)
        now_minute = self.now_minute()
        with self._packs_lock:
            if targets is None:
                touched = self._dispatch.candidates(batch) if batch.height else {}
                everyone = list(self.packs.values())
            else:
                everyone = list(targets)
                touched = {state: set(state.series.values()) for state in everyone} if batch.height else {}
        slice_start = time.perf_counter()
        for state, series_set in touched.items():
            if time.perf_counter() - slice_start > GIL_SLICE_SECONDS:
                time.sleep(GIL_YIELD_SECONDS)  # hand the GIL to the serving loop if it waits for it
                slice_start = time.perf_counter()
            floor = now_minute - state.window_minutes
            visible = batch.visible(state.tenant)
            with state.lock:
                changed = False
                for series in series_set:
                    changed = series.apply(batch, floor, visible) or changed
                if changed:
                    state.version += 1
        for state in everyone:  # drop buckets that left the window, once per minute of the clock
            if state.pruned_minute != now_minute:
                with state.lock:
                    dropped = [series.prune(now_minute) for series in state.series.values()]
                    state.pruned_minute = now_minute
                    if any(dropped):
                        state.version += 1
        if targets is None:
            self.seq = max(self.seq, seq)

    def _start_time(self, minutes: int) -> datetime:
        return datetime.now(UTC) - timedelta(minutes=minutes) - self.margin

    # The follower loop (``StreamFollower.run``), handing batches to the applier thread: ``ready`` is
    # set once the stream is caught up *and* everything fetched is applied.

    def resume_seq(self) -> int:
        return self._fetched

    async def deliver(self, payload: bytes, seq: int) -> None:
        await self.applier.submit(payload, seq)
        self._fetched = max(self._fetched, seq)

    async def caught_up(self) -> None:
        await self.applier.barrier()

    async def run(self) -> None:
        self.applier.start()
        await super().run()

    def start(self) -> None:
        if self._task is None:
            self.applier.start()
        super().start()
        if self.store is not None and self._sync_task is None:
            self._sync_task = asyncio.get_running_loop().create_task(
                self.follow_definitions(), name="live-definitions"
            )

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
            self._sync_task = None
        await super().stop()
        await self.applier.stop()

    async def _backfill(self, state: LivePackState) -> None:
        """Fill a new pack from the stream up to what the follower has handed to the applier.

        Later batches reach the pack through the main stream (it is installed already); batches
        applied twice change nothing (unions), so the overlap needs no care.
        """
        until = self._fetched
        if until == 0:  # nothing fetched yet: the main stream will bring everything
            return
        sub = await self.bus.subscribe(
            f"live-backfill-{state.tenant}-{state.pack_id}", start_time=self._start_time(state.window_minutes)
        )
        try:
            reached = False
            while not reached:
                batch = await sub.fetch(256, 0.2)
                if not batch:
                    break
                for d in batch:
                    if d.seq > until:
                        reached = True
                        break
                    await self.applier.submit(d.payload, d.seq, targets=(state,))
                    if d.seq == until:
                        reached = True
                        break
        finally:
            await sub.close()
        await self.applier.barrier()

    def first_start_time(self) -> datetime:
        """Replay from the longest window back (at least an hour) when there is no checkpoint."""
        with self._packs_lock:
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


@dataclass(frozen=True)
class LiveDeps:
    """What LivePackService needs of the audience process besides the engine."""

    tenancy: Any  # Tenancy: who calls, which tenant they may act on
    discloser: Any  # Discloser: the sizes a tenant may learn
    packs: Any  # PackStore: snapshots become pack versions
    membership: Any  # MembershipCache: invalidated when a snapshot lands
    claims: PackClaims
    quotas: TenantQuotas | None = None


class LivePackServicer(live_pack_pb2_grpc.LivePackServiceServicer):
    def __init__(self, engine: LivePackEngine, deps: LiveDeps) -> None:
        self.engine = engine
        self.deps = deps

    def _tenant(self, parent: str, context) -> str:
        tenant = parse_parent(parent)
        return self.deps.tenancy.authorize(context, tenant, resource_type=TENANT_TYPE)

    async def _named(self, name: str, context) -> LivePackState:
        tenant, pack_id = parse_live_pack_name(name)
        self.deps.tenancy.authorize(context, tenant, resource_type=LIVE_PACK_TYPE, name=name)
        try:
            return self.engine.get(tenant, pack_id)
        except NotFound:  # created on another replica since this one's last sync?
            if await self.engine.load_one(tenant, pack_id) is None:
                raise
            return self.engine.get(tenant, pack_id)

    def to_pb(self, state: LivePackState, context: Any = None) -> live_pack_pb2.LivePack:
        """The live pack as the caller may see it: tenants get its size disclosed (privacy.py)."""
        members = self.engine.members(state)
        size = len(members)
        if not is_exact_for(self.deps.tenancy.caller(context)):
            size, _ = self.deps.discloser.live_size(state.name, self.engine.now_us() // MINUTE_US, size)
        return live_pack_pb2.LivePack(
            name=state.name,
            display_name=state.display_name,
            spec=state.spec,
            size=size,
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
        quotas = self.deps.quotas
        limited = quotas is not None and TenantQuotas.applies_to(self.deps.tenancy.caller(context))
        state = await self.engine.create(
            tenant,
            request.live_pack_id,
            request.live_pack.display_name,
            request.live_pack.spec,
            limit=quotas.limits.live_packs if limited else None,  # platform principals are exempt
        )
        return self.to_pb(state, context)

    async def GetLivePack(self, request, context):
        return self.to_pb(await self._named(request.name, context), context)

    async def ListLivePacks(self, request, context):
        tenant = self._tenant(request.parent, context)
        if request.page_size < 0 or request.page_size > 1000:
            raise InvalidArgument("page_size", "must be 0..1000")
        size = request.page_size or 50
        ids = self.engine.of_tenant(tenant)
        start = int(request.page_token) if request.page_token.isdigit() else 0
        page = ids[start : start + size]
        token = str(start + size) if start + size < len(ids) else ""
        return live_pack_pb2.ListLivePacksResponse(
            live_packs=[self.to_pb(self.engine.get(tenant, p), context) for p in page],
            next_page_token=token,
        )

    async def DeleteLivePack(self, request, context):
        state = await self._named(request.name, context)
        await self.engine.delete(state.tenant, state.pack_id)
        return empty_pb2.Empty()

    async def SnapshotLivePack(self, request, context):
        state = await self._named(request.name, context)
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
        reservation = self.deps.claims.reserve_pack(
            state.tenant, request.pack_id, f"snapshot of {state.name}"
        )
        try:
            stored = await asyncio.to_thread(
                self.deps.packs.publish_version, state.tenant, request.pack_id, bitmap, pack, stats
            )
        finally:
            self.deps.claims.release_pack(state.tenant, request.pack_id, reservation)
        self.deps.membership.invalidate(state.tenant, request.pack_id)
        return stored


# ---------------------------------------------------------------------------------------------------
# Wiring into the audience process


@dataclass
class LiveParts:
    """The audience process's live-pack engine and the bus it follows (``open_live``)."""

    settings: RealtimeSettings
    bus: EventBus
    engine: LivePackEngine


def open_live(store: ObjectStore, reservations: Reservations) -> LiveParts:
    """The bus (``FLASHCROWD_BUS_URL``) and the engine with the stored definitions (blocking)."""
    settings = load_settings(RealtimeSettings)
    bus = open_bus(settings.bus_url, shard_count=settings.bus_shards)
    engine = LivePackEngine(bus, store, reservations=reservations)
    engine.load_definitions()
    return LiveParts(settings, bus, engine)


def live_service(live: LiveParts, deps: LiveDeps, store: ObjectStore) -> ServiceDefinition:
    """LivePackService + EventService (+ the compactor on the in-process bus) for the audience server."""
    settings, bus, engine = live.settings, live.bus, live.engine
    servicer = LivePackServicer(engine, deps)
    event_names, register_events = event_service_definition(settings, bus)
    compactor = compactor_from_settings(settings, store, bus) if bus.url.startswith("memory") else None
    tasks: list[asyncio.Task] = []

    async def start() -> None:
        try:
            await bus.start()
        except BusUnavailable as error:
            logger.warning("event bus not reachable at start: %s", error)
        engine.start()
        if compactor is not None:
            tasks.append(asyncio.get_running_loop().create_task(compactor.run(), name="compactor"))

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
    return ServiceDefinition(names=names, register=register, on_start=[start], on_stop=[stop])
