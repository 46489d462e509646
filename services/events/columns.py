"""Event batches as numpy columns: decoded straight from the protobuf wire format, validated with numpy.

The ingest hot path (``services.events.ingest``) receives the serialized request bytes (the
EventService handlers are registered without a deserializer) and never builds one Python object
per event:

* ``columns_from_wire(buf)`` decodes ``repeated flashcrowd.audience.v1.Event events = 1`` (the
  layout of both IngestEventsRequest and IngestEventBatchRequest) with vectorised numpy: every field
  of an Event and of its Timestamp is a varint, so the whole buffer is a sequence of (tag, varint)
  pairs; length-delimited pairs (events, event_time) open nested spans whose depth a prefix sum
  gives. Decoding follows protobuf's rules (uint32/int32 fields keep the low 32 bits, int64 is
  two's complement, unknown varint fields are ignored, fields in any order). Anything beyond that
  plain shape (a field repeated inside one event - protobuf would merge it -, unknown
  length-delimited or fixed-width fields, malformed bytes) returns ``None``: the caller then parses
  with protobuf (``columns_from_proto``), which is exact and slower.
* The owner (``services.events.schema.PLATFORM_OWNER`` or a tenant id) is not on the wire: events
  carry no owner field. It is one constant per request, set by ingest from the verified caller
  after decoding (``EventColumns.owned_by``), so decoding costs nothing more.
* ``validate_columns`` applies the same rules, with the same (index, field, reason) rejects, as
  ``services.events.schema.validate_events`` does on the frame ``events_from_proto`` builds
  (the tests check both agree on random and on hand-picked bad input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta

import numpy as np

from services.events.schema import EVENT_TYPE_NAMES, PLATFORM_OWNER, Reject

__all__ = ["EventColumns", "columns_from_proto", "columns_from_wire", "validate_columns"]

_U64 = np.uint64
_LOW7 = _U64(0x7F)
_LOW32 = _U64(0xFFFFFFFF)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
#: |seconds| beyond this would overflow int64 microseconds: clamped to +-2**62 us (then rejected as in
#: the future / older than retention), where the per-event path used to fail the whole request.
_MAX_SECONDS = (2**62) // 1_000_000
_VALID_TYPE = np.zeros(256, dtype=bool)
_VALID_TYPE[list(EVENT_TYPE_NAMES)] = True

# Field numbers of flashcrowd.audience.v1.Event (events.proto) and google.protobuf.Timestamp.
_EVENT_ID, _USER_ID, _EVENT_TIME, _EVENT_TYPE = 1, 2, 3, 4
_ITEM_ID, _CATEGORY_ID, _CAMPAIGN_ID, _VIDEO_ID, _ORDER_ID, _AMOUNT = 5, 6, 7, 8, 9, 10
_SECONDS, _NANOS = 1, 2


@dataclass
class EventColumns:
    """One batch of events as arrays (proto3 zeros for unset fields; ``ts`` 0 = no event_time).

    ``owner`` is one value for the whole batch (not an array): every event of a request has the
    owner its caller may write, so it is stamped once instead of per event.
    """

    event_id: np.ndarray  # uint64
    user_id: np.ndarray  # uint64 (validation checks it fits uint32)
    ts: np.ndarray  # int64 epoch microseconds, seconds * 10**6 + nanos // 1000
    event_type: np.ndarray  # int32
    item_id: np.ndarray  # uint32
    category_id: np.ndarray  # uint32
    campaign_id: np.ndarray  # uint32
    video_id: np.ndarray  # uint32
    order_id: np.ndarray  # uint64
    amount_fen: np.ndarray  # int64
    owner: str = PLATFORM_OWNER

    def __len__(self) -> int:
        return int(self.event_id.size)

    def take(self, index: np.ndarray) -> EventColumns:
        arrays = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "owner"}
        return EventColumns(**arrays, owner=self.owner)

    def owned_by(self, owner: str) -> EventColumns:
        """The same arrays (not copied) stamped with ``owner``."""
        return replace(self, owner=owner)

    @classmethod
    def zeros(cls, n: int) -> EventColumns:
        u32 = np.uint32
        return cls(
            event_id=np.zeros(n, np.uint64),
            user_id=np.zeros(n, np.uint64),
            ts=np.zeros(n, np.int64),
            event_type=np.zeros(n, np.int32),
            item_id=np.zeros(n, u32),
            category_id=np.zeros(n, u32),
            campaign_id=np.zeros(n, u32),
            video_id=np.zeros(n, u32),
            order_id=np.zeros(n, np.uint64),
            amount_fen=np.zeros(n, np.int64),
        )


def _timestamp_us(seconds: np.ndarray, nanos: np.ndarray) -> np.ndarray:
    seconds = np.clip(seconds, -_MAX_SECONDS, _MAX_SECONDS)
    return seconds * 1_000_000 + nanos.astype(np.int64) // 1000


# ---------------------------------------------------------------------------------------------------
# Wire format


def _compact7(words: np.ndarray) -> np.ndarray:
    """Little-endian 8-byte words of varint bytes -> their 7-bit groups packed (56 bits), in place."""
    words &= _U64(0x7F7F7F7F7F7F7F7F)
    words[:] = (words & _U64(0x007F007F007F007F)) | ((words & _U64(0x7F007F007F007F00)) >> _U64(1))
    words[:] = (words & _U64(0x00003FFF00003FFF)) | ((words & _U64(0x3FFF00003FFF0000)) >> _U64(2))
    words[:] = (words & _U64(0x000000000FFFFFFF)) | ((words & _U64(0x0FFFFFFF00000000)) >> _U64(4))
    return words


#: Mask of a varint's own bytes in the 8-byte word read at its start, by extra bytes (0..9).
_OWN_BYTES = np.array([(1 << (8 * (k + 1))) - 1 if k < 7 else (1 << 64) - 1 for k in range(10)], _U64)


def _varint_values(a: np.ndarray, starts: np.ndarray, extra: np.ndarray) -> np.ndarray | None:
    """Values of the varints starting at ``starts`` with ``extra`` bytes after the first; None if bad."""
    values = a[starts].astype(_U64)  # one-byte varints: done
    multi = np.flatnonzero(extra)
    if not multi.size:
        return values
    more = extra[multi]
    if int(more.max()) > 9:
        return None  # longer than 10 bytes
    # The 8 bytes from each multi-byte varint's start as one little-endian word (an overlapping
    # strided view of the padded buffer), cut to the varint's own bytes, 7-bit groups compacted.
    padded = np.zeros(a.size + 8, np.uint8)
    padded[: a.size] = a
    words = np.ndarray((a.size,), dtype="<u8", buffer=padded, strides=(1,))
    first = starts[multi]
    decoded = _compact7(words[first] & _OWN_BYTES[more])
    long = np.flatnonzero(more >= 8)  # 9 or 10 bytes: bits 56.. come from bytes 8 and 9
    if long.size:
        at = first[long]
        decoded[long] |= (a[at + 8] & 0x7F).astype(_U64) << _U64(56)
        ten = more[long] == 9
        if ten.any():
            last = a[at[ten] + 9]
            if int(last.max()) > 1:
                return None  # a 10th byte may only carry bit 63
            decoded[long[ten]] |= last.astype(_U64) << _U64(63)
    values[multi] = decoded
    return values


_EVENTS_TAG = 1 << 3 | 2  # field 1 (events), length-delimited
_TIME_TAG = _EVENT_TIME << 3 | 2
#: Column slot of a varint: its Event field number, or 10 + its Timestamp field number.
_SLOTS = _AMOUNT + _NANOS + 1


def _tag_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per one-byte tag: allowed at all; slot as an Event field; slot as a Timestamp field.

    Slots: 1..10 Event fields, 11..12 Timestamp fields, 0 = ignored (unknown field), -1 = refuse.
    """
    allowed = np.zeros(128, bool)
    event_slot = np.zeros(128, np.int64)
    time_slot = np.zeros(128, np.int64)
    for tag in range(128):
        field, wire = tag >> 3, tag & 7
        if field == 0 or wire not in (0, 2):
            continue  # invalid field number, fixed-width or group wire types
        if wire == 2 and tag not in (_EVENTS_TAG, _TIME_TAG):
            continue  # unknown length-delimited field
        allowed[tag] = True
        if wire == 0:
            event_slot[tag] = -1 if field == _EVENT_TIME else field if field <= _AMOUNT else 0
            time_slot[tag] = _AMOUNT + field if field <= _NANOS else 0
    return allowed, event_slot, time_slot


_ALLOWED, _EVENT_SLOT, _TIME_SLOT = _tag_tables()


def columns_from_wire(buf: bytes | bytearray | memoryview) -> EventColumns | None:
    """Decode a serialized ``IngestEventsRequest`` / ``IngestEventBatchRequest`` into columns.

    ``None`` when the bytes are not in the plain shape this decoder handles (see the module doc);
    the caller then parses them with protobuf.
    """
    a = np.frombuffer(buf, dtype=np.uint8)
    n = a.size
    if n == 0:
        return EventColumns.zeros(0)
    term = a < 0x80
    if not term[-1]:
        return None  # the last varint is cut off
    ends = np.flatnonzero(term)  # last byte of each varint; they alternate tag, value
    if ends.size % 2:
        return None
    tag_at = np.empty(ends.size // 2, np.int64)
    tag_at[0] = 0
    tag_at[1:] = ends[1:-1:2] + 1
    if (ends[0::2] != tag_at).any():
        return None  # a tag of several bytes (field >= 16, or not minimal): left to protobuf
    tags = a[tag_at]
    if not _ALLOWED[tags].all():
        return None
    value_at = tag_at + 1
    after = ends[1::2] + 1  # first byte after each pair
    vals = _varint_values(a, value_at, after - 1 - value_at)
    if vals is None:
        return None
    pairs = tag_at.size
    is_event = tags == _EVENTS_TAG
    is_time = tags == _TIME_TAG

    # Events: the spans of the `events` pairs must tile the buffer, so every other pair is in one.
    event_at = np.flatnonzero(is_event)
    if not event_at.size or event_at[0] != 0:
        return None
    event_len = vals[event_at]
    if int(event_len.max()) > n:
        return None
    event_end = after[event_at] + event_len.astype(np.int64)
    if event_end[-1] != n or (event_end[:-1] != tag_at[event_at[1:]]).any():
        return None
    count = int(event_at.size)
    event_of = np.cumsum(is_event) - 1

    # Timestamps: spans inside their event, ending between pairs, with no length-delimited pair inside.
    time_at = np.flatnonzero(is_time)
    if time_at.size:
        time_len = vals[time_at]
        if int(time_len.max()) > n:
            return None
        time_end = after[time_at] + time_len.astype(np.int64)
        if (time_end > event_end[event_of[time_at]]).any():
            return None
        close = np.searchsorted(tag_at, time_end)  # first pair after the span
        inside = close < pairs
        if (tag_at[close[inside]] != time_end[inside]).any() or (time_end[~inside] != n).any():
            return None
        slot = _EVENT_SLOT[tags]
        inner = close - time_at - 1  # pairs inside each Timestamp
        total = int(inner.sum())
        if total:
            first = np.repeat(time_at + 1 - (np.cumsum(inner) - inner), inner)
            inner_at = first + np.arange(total)
            inner_tags = tags[inner_at]
            if ((inner_tags & 7) == 2).any():
                return None  # a length-delimited pair inside a Timestamp
            slot[inner_at] = _TIME_SLOT[inner_tags]
    else:
        slot = _EVENT_SLOT[tags]
    if (slot < 0).any():
        return None  # event_time with the wrong wire type
    use = slot > 0  # Event fields 1..10 of their event, Timestamp fields of their event's time
    key = slot[use] * count + event_of[use]
    if int(np.bincount(key, minlength=_SLOTS * count).max(initial=0)) > 1:
        return None  # a field repeated inside one event: protobuf merges, leave it to protobuf
    flat = np.zeros(_SLOTS * count, _U64)
    flat[key] = vals[use]
    table = flat.reshape(_SLOTS, count)
    return EventColumns(
        event_id=table[_EVENT_ID],
        user_id=table[_USER_ID],
        ts=_timestamp_us(
            table[_AMOUNT + _SECONDS].view(np.int64),
            (table[_AMOUNT + _NANOS] & _LOW32).astype(np.uint32).view(np.int32),
        ),
        event_type=(table[_EVENT_TYPE] & _LOW32).astype(np.uint32).view(np.int32),
        item_id=(table[_ITEM_ID] & _LOW32).astype(np.uint32),
        category_id=(table[_CATEGORY_ID] & _LOW32).astype(np.uint32),
        campaign_id=(table[_CAMPAIGN_ID] & _LOW32).astype(np.uint32),
        video_id=(table[_VIDEO_ID] & _LOW32).astype(np.uint32),
        order_id=table[_ORDER_ID],
        amount_fen=table[_AMOUNT].view(np.int64),
    )


def columns_from_proto(events: Sequence) -> EventColumns:
    """Repeated ``flashcrowd.audience.v1.Event`` messages -> columns (the exact, per-event path)."""
    n = len(events)
    out = EventColumns.zeros(n)
    seconds = np.zeros(n, np.int64)
    nanos = np.zeros(n, np.int32)
    for i, e in enumerate(events):
        out.event_id[i] = e.event_id
        out.user_id[i] = e.user_id
        t = e.event_time
        seconds[i] = max(-_MAX_SECONDS, min(_MAX_SECONDS, t.seconds))
        nanos[i] = t.nanos
        out.event_type[i] = e.event_type
        out.item_id[i] = e.item_id
        out.category_id[i] = e.category_id
        out.campaign_id[i] = e.campaign_id
        out.video_id[i] = e.video_id
        out.order_id[i] = e.order_id
        out.amount_fen[i] = e.amount_fen
    out.ts[:] = _timestamp_us(seconds, nanos)
    return out


# ---------------------------------------------------------------------------------------------------
# Validation


def _micros(value: datetime) -> int:
    return (value - _EPOCH) // _US


def validate_columns(
    c: EventColumns,
    *,
    now: datetime | None = None,
    max_future_skew: timedelta = timedelta(minutes=5),
    retention: timedelta | None = timedelta(days=400),
    not_before: datetime | None = None,
) -> tuple[np.ndarray, list[Reject]]:
    """``(valid row mask, rejects)`` with the rules and reasons of ``schema.validate_events``.

    Rejects are ``(row index, frame column, reason)`` sorted; ``ts`` names the event time.
    """
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    lower = not_before if not_before is not None else (now - retention if retention is not None else None)
    if lower is not None and lower.tzinfo is None:
        lower = lower.replace(tzinfo=UTC)
    upper = now + max_future_skew

    bad = np.zeros(len(c), dtype=bool)
    rejects: list[Reject] = []

    def flag(mask: np.ndarray, field: str, reason: str) -> None:
        nonlocal bad
        if mask.any():
            rejects.extend((int(i), field, reason) for i in np.flatnonzero(mask))
            bad |= mask

    flag(c.event_id == 0, "event_id", "missing (0)")
    flag(c.user_id > 0xFFFFFFFF, "user_id", "not a UInt32 (negative or too large)")
    flag(c.user_id == 0, "user_id", "missing (0)")
    has_ts = c.ts != 0
    flag(~has_ts, "ts", "missing")
    in_range = (c.event_type >= 0) & (c.event_type < 256)
    known = np.zeros(len(c), dtype=bool)
    known[in_range] = _VALID_TYPE[c.event_type[in_range]]
    flag(~known, "event_type", "unknown event type")
    flag(c.amount_fen < 0, "amount_fen", "negative amount")
    flag(has_ts & (c.ts > _micros(upper)), "ts", f"in the future (later than now + {max_future_skew})")
    if lower is not None:
        flag(has_ts & (c.ts < _micros(lower)), "ts", f"older than the retention bound {lower.isoformat()}")
    rejects.sort()
    return ~bad, rejects
