"""Compile a pack spec into a plan of leaf queries (polars, lazy) combined by set operations (Roaring).

``compile_spec`` turns the proto tree into a small immutable plan: leaves select users (events,
profiles, other packs), inner nodes are union / intersect / exclude. Shortcuts become leaves and set
operations here, relative windows are resolved against ``as_of``, and equal leaves are shared.

``evaluate_leaves`` runs the data leaves. Every event leaf of a plan is answered by one fused scan:
the day partitions the windows touch, only the columns the conditions need, one predicate (an
envelope on ``ts``/``event_type``/``bucket`` that Parquet statistics can prune with, and the OR of
the leaves' own predicates) pushed into the scan, then a per-leaf flag. Leaves become Roaring bitmaps
through numpy (``BitMap(array)``), never a Python loop per id. A ``Shard`` adds a ``bucket`` predicate
to every scan, so the row groups of other shards are skipped.

Owners: a build for tenant T reads only the platform's events and T's own (``tenant=T``:
``visible_owners(T)``, passed to ``EventDataset.scan_events(owners=...)``); another tenant's
conversion events never count in T's packs. Without a tenant, only the platform's events are read.

``combine`` evaluates the set algebra on the bitmaps.
"""

from __future__ import annotations

import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import numpy as np
import polars as pl
from flashcrowd.audience.v1 import events_pb2, spec_pb2
from pyroaring import BitMap

from services.events.dataset import EventDataset
from services.events.schema import visible_owners
from services.events.sharding import Shard

__all__ = [
    "EventConditions",
    "EventLeaf",
    "Leaf",
    "Node",
    "PackLeaf",
    "Plan",
    "ProfileLeaf",
    "RefundedPayersLeaf",
    "SetOp",
    "Window",
    "bitmap_to_numpy",
    "combine",
    "compile_spec",
    "evaluate_leaves",
    "event_query",
    "ids_to_bitmap",
    "profile_query",
    "query_count",
    "refunded_payers_query",
]

ET = events_pb2.EventType
UTC_US = pl.Datetime("us", "UTC")
_MICRO = timedelta(microseconds=1)

# Shortcut kinds that are one behaviour leaf: the event types they count.
SHORTCUT_EVENT_TYPES: dict[int, tuple[int, ...]] = {
    spec_pb2.Shortcut.KIND_CLICKERS: (ET.EVENT_TYPE_CLICK,),
    spec_pb2.Shortcut.KIND_VIDEO_VIEWERS: (ET.EVENT_TYPE_VIDEO_PLAY, ET.EVENT_TYPE_VIDEO_FINISH),
    spec_pb2.Shortcut.KIND_FOLLOWERS: (ET.EVENT_TYPE_FOLLOW,),
    spec_pb2.Shortcut.KIND_HIGH_INTENT: (ET.EVENT_TYPE_PRODUCT_VIEW,),
}

# --- plan --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Half-open ``[start, end)`` in UTC."""

    start: datetime
    end: datetime

    def days(self) -> list[date]:
        """The UTC day partitions the window touches."""
        first, last = self.start.date(), (self.end - _MICRO).date()
        return [first + timedelta(days=i) for i in range((last - first).days + 1)] if last >= first else []

    def predicate(self, column: str = "ts") -> pl.Expr:
        col = pl.col(column)
        return (col >= pl.lit(self.start, dtype=UTC_US)) & (col < pl.lit(self.end, dtype=UTC_US))


@dataclass(frozen=True)
class EventConditions:
    """What an event must be: types and attribute filters (empty tuples and 0 bounds match anything)."""

    event_types: tuple[int, ...]
    item_ids: tuple[int, ...] = ()
    category_ids: tuple[int, ...] = ()
    campaign_ids: tuple[int, ...] = ()
    video_ids: tuple[int, ...] = ()
    min_fen: int = 0
    max_fen: int = 0

    @classmethod
    def of(cls, event_types: Iterable[int], flt: spec_pb2.EventFilter | None) -> EventConditions:
        types = tuple(sorted(set(event_types)))
        if flt is None:
            return cls(types)
        return cls(
            types,
            tuple(sorted(set(flt.item_ids))),
            tuple(sorted(set(flt.category_ids))),
            tuple(sorted(set(flt.campaign_ids))),
            tuple(sorted(set(flt.video_ids))),
            flt.amount.min_fen,
            flt.amount.max_fen,
        )

    def with_types(self, event_types: Iterable[int]) -> EventConditions:
        return EventConditions(
            tuple(sorted(set(event_types))),
            self.item_ids,
            self.category_ids,
            self.campaign_ids,
            self.video_ids,
            self.min_fen,
            self.max_fen,
        )

    def predicate(self) -> pl.Expr:
        terms = [_is_in("event_type", self.event_types, pl.UInt8)]
        for column, values in (
            ("item_id", self.item_ids),
            ("category_id", self.category_ids),
            ("campaign_id", self.campaign_ids),
            ("video_id", self.video_ids),
        ):
            if values:
                terms.append(_is_in(column, values, pl.UInt32))
        if self.min_fen > 0:
            terms.append(pl.col("amount_fen") >= self.min_fen)
        if self.max_fen > 0:
            terms.append(pl.col("amount_fen") <= self.max_fen)
        return _all(terms)

    def columns(self) -> set[str]:
        cols = {"event_type"}
        for column, values in (
            ("item_id", self.item_ids),
            ("category_id", self.category_ids),
            ("campaign_id", self.campaign_ids),
            ("video_id", self.video_ids),
        ):
            if values:
                cols.add(column)
        if self.min_fen > 0 or self.max_fen > 0:
            cols.add("amount_fen")
        return cols


@dataclass(frozen=True)
class EventLeaf:
    """Users with at least ``min_count`` events meeting ``conditions`` inside ``window``."""

    conditions: EventConditions
    window: Window
    min_count: int = 1
    path: str = field(default="", compare=False)


@dataclass(frozen=True)
class RefundedPayersLeaf:
    """Users who paid in ``window`` and whose every such order was fully refunded before ``horizon``."""

    conditions: EventConditions  # applied to the pay events
    window: Window
    horizon: datetime
    path: str = field(default="", compare=False)


@dataclass(frozen=True)
class ProfileLeaf:
    """Users whose profile matches (AND across attributes, OR inside one)."""

    age_bands: tuple[int, ...] = ()
    genders: tuple[int, ...] = ()
    regions: tuple[str, ...] = ()
    interests: tuple[str, ...] = ()
    path: str = field(default="", compare=False)


@dataclass(frozen=True)
class PackLeaf:
    """The members of another pack (``version`` 0 = latest at build time)."""

    name: str
    version: int = 0
    path: str = field(default="", compare=False)


@dataclass(frozen=True)
class SetOp:
    """``union`` / ``intersect`` of the operands, or ``exclude``: the first minus all others."""

    op: Literal["union", "intersect", "exclude"]
    operands: tuple[Node, ...]


Leaf = EventLeaf | RefundedPayersLeaf | ProfileLeaf | PackLeaf
Node = Leaf | SetOp
DataLeaf = EventLeaf | RefundedPayersLeaf | ProfileLeaf


@dataclass
class Plan:
    """A compiled spec: the tree, its distinct leaves, and the spec with windows made absolute."""

    root: Node
    as_of: datetime
    resolved_spec: spec_pb2.PackSpec
    leaves: list[Leaf]

    @property
    def references(self) -> list[PackLeaf]:
        return [leaf for leaf in self.leaves if isinstance(leaf, PackLeaf)]

    @property
    def data_leaves(self) -> list[DataLeaf]:
        return [leaf for leaf in self.leaves if not isinstance(leaf, PackLeaf)]

    def days(self) -> list[date]:
        """Every day partition some event leaf reads."""
        days: set[date] = set()
        for leaf in self.leaves:
            if isinstance(leaf, EventLeaf):
                days.update(leaf.window.days())
            elif isinstance(leaf, RefundedPayersLeaf):
                days.update(Window(leaf.window.start, leaf.horizon).days())
        return sorted(days)


def compile_spec(spec: spec_pb2.PackSpec, *, as_of: datetime, field: str = "spec") -> Plan:
    """Compile a *validated* spec. ``as_of`` (UTC) anchors relative windows."""
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    resolved = spec_pb2.PackSpec()
    resolved.CopyFrom(spec)
    leaves: dict[Leaf, Leaf] = {}
    root = _Compiler(as_of, leaves).node(resolved, field)
    return Plan(root=root, as_of=as_of, resolved_spec=resolved, leaves=list(leaves))


class _Compiler:
    def __init__(self, as_of: datetime, leaves: dict[Leaf, Leaf]) -> None:
        self.as_of = as_of
        self.leaves = leaves

    def leaf(self, leaf: Leaf) -> Leaf:
        # Equal leaves (same conditions, window...) are computed once.
        return self.leaves.setdefault(leaf, leaf)

    def window(self, owner: spec_pb2.BehaviorCondition | spec_pb2.Shortcut) -> Window:
        """Resolve the window and write it back as absolute (for the resolved spec)."""
        if owner.window.WhichOneof("window") == "last":
            start = self.as_of - owner.window.last.ToTimedelta()
            owner.window.absolute.start_time.FromDatetime(start)
            owner.window.absolute.end_time.FromDatetime(self.as_of)  # setting absolute clears last
            return Window(start, self.as_of)
        absolute = owner.window.absolute
        return Window(absolute.start_time.ToDatetime(UTC), absolute.end_time.ToDatetime(UTC))

    def node(self, spec: spec_pb2.PackSpec, path: str) -> Node:
        kind = spec.WhichOneof("node")
        if kind == "behavior":
            cond = spec.behavior
            conditions = EventConditions.of(
                cond.event_types, cond.filter if cond.HasField("filter") else None
            )
            return self.leaf(
                EventLeaf(conditions, self.window(cond), max(1, cond.min_count), f"{path}.behavior")
            )
        if kind == "profile":
            p = spec.profile
            return self.leaf(
                ProfileLeaf(
                    tuple(sorted(set(p.age_bands))),
                    tuple(sorted(set(p.genders))),
                    tuple(sorted(set(p.regions))),
                    tuple(sorted(set(p.interests))),
                    f"{path}.profile",
                )
            )
        if kind == "pack":
            return self.leaf(PackLeaf(spec.pack.pack, spec.pack.version, f"{path}.pack"))
        if kind in ("union", "intersect"):
            ops = getattr(spec, kind).operands
            return SetOp(kind, tuple(self.node(o, f"{path}.{kind}.operands[{i}]") for i, o in enumerate(ops)))
        if kind == "exclude":
            ex = spec.exclude
            base = self.node(ex.base, f"{path}.exclude.base")
            subs = tuple(self.node(s, f"{path}.exclude.subtract[{i}]") for i, s in enumerate(ex.subtract))
            return SetOp("exclude", (base, *subs))
        if kind == "shortcut":
            return self.shortcut(spec.shortcut, f"{path}.shortcut")
        raise ValueError(f"{path}: empty spec (validate before compiling)")

    def shortcut(self, shortcut: spec_pb2.Shortcut, path: str) -> Node:
        window = self.window(shortcut)
        flt = shortcut.filter if shortcut.HasField("filter") else None
        kind = shortcut.kind
        if kind in SHORTCUT_EVENT_TYPES:
            return self.leaf(EventLeaf(EventConditions.of(SHORTCUT_EVENT_TYPES[kind], flt), window, 1, path))
        if kind == spec_pb2.Shortcut.KIND_CART_ABANDONERS:
            carted = EventLeaf(
                EventConditions.of([ET.EVENT_TYPE_ADD_CART], flt), window, 1, f"{path}[add_cart]"
            )
            ordered = EventLeaf(EventConditions.of([ET.EVENT_TYPE_ORDER], flt), window, 1, f"{path}[order]")
            return SetOp("exclude", (self.leaf(carted), self.leaf(ordered)))
        if kind == spec_pb2.Shortcut.KIND_PURCHASERS:
            pay = EventConditions.of([ET.EVENT_TYPE_PAY], flt)
            # Refunds of orders paid in the window count until as_of (a refund comes after the pay).
            horizon = max(window.end, self.as_of)
            payers = EventLeaf(pay, window, 1, f"{path}[pay]")
            refunded = RefundedPayersLeaf(pay, window, horizon, f"{path}[fully_refunded]")
            return SetOp("exclude", (self.leaf(payers), self.leaf(refunded)))
        raise ValueError(f"{path}: unknown shortcut kind {kind} (validate before compiling)")


# --- queries -----------------------------------------------------------------------------------------


def _is_in(column: str, values: Sequence[int], dtype: pl.DataType | type[pl.DataType]) -> pl.Expr:
    if len(values) == 1:
        return pl.col(column) == pl.lit(values[0], dtype=dtype)
    return pl.col(column).is_in(pl.Series(values, dtype=dtype).implode())


def _all(terms: Sequence[pl.Expr]) -> pl.Expr:
    out = terms[0]
    for term in terms[1:]:
        out = out & term
    return out


def _any(terms: Sequence[pl.Expr]) -> pl.Expr:
    out = terms[0]
    for term in terms[1:]:
        out = out | term
    return out


def _scan(
    dataset: EventDataset,
    days: Sequence[date],
    columns: Iterable[str],
    shard: Shard,
    tenant: str | None = None,
) -> pl.LazyFrame | None:
    """Only the day partitions the dataset has; ``None`` when the windows miss the data entirely.

    The dataset skips files outside the shard's bucket range and adds the ``bucket`` predicate, and
    keeps only the events ``tenant`` may build on (the platform's and its own).
    """
    available = set(dataset.days())
    wanted = [d for d in days if d in available]
    if not wanted:
        return None
    return dataset.scan_events(
        days=wanted, columns=sorted(set(columns)), shard=shard, owners=visible_owners(tenant)
    )


#: Above this many rows in the scanned files, leaves are aggregated per user inside the (streaming)
#: query instead of collecting one row per matching event: memory then grows with users, not events.
GROUP_ABOVE_ROWS = 30_000_000


def event_query(
    dataset: EventDataset,
    leaves: Sequence[EventLeaf],
    shard: Shard | None = None,
    *,
    grouped: bool | None = None,
    tenant: str | None = None,
) -> tuple[pl.LazyFrame, bool] | None:
    """One lazy query answering every leaf; ``None`` if no leaf's window touches the data.

    Returns ``(query, grouped)``. Not grouped: one row per matching event with ``user_id`` and a
    boolean ``f{k}`` per leaf (fastest; only when every ``min_count`` is 1). Grouped: one row per user
    with the count ``f{k}`` of each leaf's events. ``grouped=None`` picks by ``min_count`` and by the
    rows of the files to scan (``GROUP_ABOVE_ROWS``).
    """
    shard = shard or Shard.whole()
    days = sorted({d for leaf in leaves for d in leaf.window.days()})
    columns = {"user_id", "ts"} | {c for leaf in leaves for c in leaf.conditions.columns()}
    lf = _scan(dataset, days, columns, shard, tenant)
    if lf is None:
        return None
    preds = [leaf.window.predicate() & leaf.conditions.predicate() for leaf in leaves]
    # The envelope is a plain conjunction, so Parquet min/max statistics prune with it even when
    # the OR of the leaves' predicates is too complex to.
    start = min(leaf.window.start for leaf in leaves)
    end = max(leaf.window.end for leaf in leaves)
    types = sorted({t for leaf in leaves for t in leaf.conditions.event_types})
    envelope = [Window(start, end).predicate(), _is_in("event_type", types, pl.UInt8)]
    scan = lf.filter(_all([*envelope, _any(preds)]) if len(preds) > 1 else _all([*envelope, preds[0]]))
    if grouped is None:
        rows = sum(p["rows"] for p in dataset.parts("events", days=days, shard=shard))
        grouped = any(leaf.min_count > 1 for leaf in leaves) or rows > GROUP_ABOVE_ROWS
    if not grouped:
        if len(leaves) == 1:
            return scan.select("user_id"), False
        return scan.select("user_id", *[pred.alias(f"f{k}") for k, pred in enumerate(preds)]), False
    counts = [pred.cast(pl.UInt32).sum().alias(f"f{k}") for k, pred in enumerate(preds)]
    return scan.group_by("user_id").agg(*counts, pl.len().alias("_events")), True


def refunded_payers_query(
    dataset: EventDataset, leaf: RefundedPayersLeaf, shard: Shard | None = None, *, tenant: str | None = None
) -> pl.LazyFrame | None:
    """``user_id`` of payers in the window whose every paid order was fully refunded by the horizon."""
    shard = shard or Shard.whole()
    span = Window(leaf.window.start, leaf.horizon)
    columns = {"user_id", "ts", "order_id", "amount_fen"} | leaf.conditions.columns()
    lf = _scan(dataset, span.days(), columns, shard, tenant)
    if lf is None:
        return None
    pay, refund = ET.EVENT_TYPE_PAY, ET.EVENT_TYPE_REFUND
    events = lf.filter(span.predicate() & _is_in("event_type", [pay, refund], pl.UInt8))
    paid = (
        events.filter(leaf.window.predicate() & leaf.conditions.predicate())
        .group_by("user_id", "order_id")
        .agg(pl.col("amount_fen").sum().alias("paid"))
    )
    refunded = (
        events.filter(pl.col("event_type") == refund)
        .group_by("user_id", "order_id")
        .agg(pl.col("amount_fen").sum().alias("refunded"))
    )
    return (
        paid.join(refunded, on=["user_id", "order_id"], how="left")
        .group_by("user_id")
        .agg((pl.col("refunded").fill_null(0) >= pl.col("paid")).all().alias("all_refunded"))
        .filter(pl.col("all_refunded"))
        .select("user_id")
    )


def profile_query(dataset: EventDataset, leaf: ProfileLeaf, shard: Shard | None = None) -> pl.LazyFrame:
    shard = shard or Shard.whole()
    columns = {"user_id"}
    terms: list[pl.Expr] = []
    if leaf.age_bands:
        terms.append(_is_in("age_band", leaf.age_bands, pl.UInt8))
        columns.add("age_band")
    if leaf.genders:
        terms.append(_is_in("gender", leaf.genders, pl.UInt8))
        columns.add("gender")
    if leaf.regions:
        terms.append(pl.col("region").is_in(pl.Series(leaf.regions, dtype=pl.Utf8).implode()))
        columns.add("region")
    if leaf.interests:
        tags = pl.Series(leaf.interests, dtype=pl.Utf8).implode()
        terms.append(pl.col("interests").list.eval(pl.element().is_in(tags)).list.any())
        columns.add("interests")
    lf = dataset.scan_profiles(sorted(columns), shard=shard)
    return (lf.filter(_all(terms)) if terms else lf).select("user_id")


# --- evaluation --------------------------------------------------------------------------------------


def ids_to_bitmap(ids: np.ndarray | pl.Series) -> BitMap:
    """User ids (any integer array, duplicates allowed) -> bitmap, without a Python loop per id."""
    if isinstance(ids, pl.Series):
        ids = ids.to_numpy()
    if len(ids) == 0:
        return BitMap()
    # pyroaring bulk-adds an array.array('I') through the buffer protocol; from a numpy array it
    # falls back to iterating, about 5-10x slower. The copy is one memcpy.
    buffer = array.array("I")
    contiguous = np.ascontiguousarray(ids, dtype=np.uint32)
    buffer.frombytes(memoryview(contiguous).cast("B"))  # type: ignore[arg-type]  # stubs miss __buffer__
    return BitMap(buffer)


def bitmap_to_numpy(bitmap: BitMap) -> np.ndarray:
    """Members as a sorted uint32 numpy array (zero-copy view of ``to_array``'s buffer)."""
    return np.frombuffer(bitmap.to_array(), dtype=np.uint32)


def _collect(lf: pl.LazyFrame) -> pl.DataFrame:
    # The streaming engine keeps memory bounded by batches instead of whole row groups of all files.
    return lf.collect(engine="streaming")


@dataclass
class LeafStats:
    events_matched: int = 0


def query_count(leaves: Sequence[DataLeaf]) -> int:
    """How many queries ``evaluate_leaves`` runs: event leaves share one."""
    events = any(isinstance(leaf, EventLeaf) for leaf in leaves)
    return int(events) + sum(1 for leaf in leaves if not isinstance(leaf, EventLeaf))


def evaluate_leaves(
    dataset: EventDataset,
    leaves: Sequence[DataLeaf],
    shard: Shard | None = None,
    *,
    on_leaf: Callable[[int, int], None] | None = None,
    stats: LeafStats | None = None,
    tenant: str | None = None,
) -> dict[DataLeaf, BitMap]:
    """Bitmap of every data leaf, over the events ``tenant`` may build on. ``on_leaf(k, n)`` after
    each query (k of n done)."""
    stats = stats if stats is not None else LeafStats()
    out: dict[DataLeaf, BitMap] = {}
    event_leaves = [leaf for leaf in leaves if isinstance(leaf, EventLeaf)]
    others = [leaf for leaf in leaves if not isinstance(leaf, EventLeaf)]
    total = query_count(leaves)
    done = 0
    if event_leaves:
        compiled = event_query(dataset, event_leaves, shard, tenant=tenant)
        if compiled is None:
            out.update({leaf: BitMap() for leaf in event_leaves})
        else:
            query, grouped = compiled
            frame = _collect(query)
            ids = frame.get_column("user_id").to_numpy()
            if grouped:
                stats.events_matched += int(frame.get_column("_events").sum() or 0)
                for k, leaf in enumerate(event_leaves):
                    counts = frame.get_column(f"f{k}").to_numpy()
                    out[leaf] = ids_to_bitmap(ids[counts >= leaf.min_count])
            else:
                stats.events_matched += frame.height
                if len(event_leaves) == 1:
                    out[event_leaves[0]] = ids_to_bitmap(ids)
                else:
                    for k, leaf in enumerate(event_leaves):
                        out[leaf] = ids_to_bitmap(ids[frame.get_column(f"f{k}").to_numpy()])
        done += 1
        if on_leaf:
            on_leaf(done, total)
    for other in others:
        if isinstance(other, RefundedPayersLeaf):
            refunds = refunded_payers_query(dataset, other, shard, tenant=tenant)
            out[other] = (
                BitMap() if refunds is None else ids_to_bitmap(_collect(refunds).get_column("user_id"))
            )
        else:
            out[other] = ids_to_bitmap(_collect(profile_query(dataset, other, shard)).get_column("user_id"))
        done += 1
        if on_leaf:
            on_leaf(done, total)
    return out


def combine(node: Node, bitmaps: dict[Any, BitMap]) -> BitMap:
    """Evaluate the set algebra; leaves come from ``bitmaps`` (never mutated)."""
    if not isinstance(node, SetOp):
        return bitmaps[node]
    first, *rest = node.operands
    if node.op == "union":
        return BitMap.union(*(combine(o, bitmaps) for o in node.operands))
    if node.op == "intersect":
        # Smallest first keeps the running intersection small.
        parts = sorted((combine(o, bitmaps) for o in node.operands), key=len)
        out = parts[0].copy()
        for part in parts[1:]:
            if not out:
                break
            out &= part
        return out
    out = combine(first, bitmaps).copy()
    for sub in rest:
        if not out:
            break
        out -= combine(sub, bitmaps)
    return out
