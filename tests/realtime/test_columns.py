"""The ingest fast path against the exact one: wire decoding, numpy validation, Arrow encoding.

Reference: protobuf's own parser + the per-event ``events_from_proto`` + the polars
``validate_events`` + ``split_batches`` (the path ingest used before). The vectorised decoder must
either agree with protobuf or step aside (``None``), on random events, hand-made odd encodings and
random corruptions of valid requests.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest
from flashcrowd.audience.v1 import event_service_pb2, events_pb2
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.events.codec import (
    batches_from_columns,
    decode_batch,
    events_from_proto,
    shard_table,
    split_batches,
)
from services.events.columns import EventColumns, columns_from_proto, columns_from_wire, validate_columns
from services.events.ingest import to_columns
from services.events.schema import validate_events
from services.events.sharding import buckets_np
from services.runtime import InvalidArgument

NOW = datetime(2026, 6, 18, 2, 0, tzinfo=UTC)
U32, U64 = 2**32 - 1, 2**64 - 1
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _same(a: EventColumns, b: EventColumns) -> None:
    assert a.owner == b.owner
    for name in EventColumns.__dataclass_fields__:
        if name == "owner":
            continue
        left, right = getattr(a, name), getattr(b, name)
        assert left.dtype == right.dtype and np.array_equal(left, right), name


def _parsed(buf: bytes) -> EventColumns:
    return columns_from_proto(event_service_pb2.IngestEventsRequest.FromString(buf).events)


# Values near the edges of each type, and typical ones.
ids64 = st.one_of(st.just(0), st.integers(1, 2**20), st.integers(0, U64))
ids32 = st.one_of(st.just(0), st.integers(1, 200_000), st.integers(0, U32))
seconds = st.one_of(
    st.integers(int((NOW - timedelta(days=500)).timestamp()), int((NOW + timedelta(days=1)).timestamp())),
    st.integers(-(2**40), 2**40),
)


@st.composite
def events(draw, seconds=seconds) -> events_pb2.Event:
    event = events_pb2.Event(
        event_id=draw(ids64),
        user_id=draw(st.one_of(ids32, ids64)),
        event_type=draw(st.one_of(st.integers(0, 13), st.integers(-(2**31), 2**31 - 1))),
        item_id=draw(ids32),
        category_id=draw(ids32),
        campaign_id=draw(ids32),
        video_id=draw(ids32),
        order_id=draw(ids64),
        amount_fen=draw(st.one_of(st.just(0), st.integers(-5, 10**6), st.integers(-(2**63), 2**63 - 1))),
    )
    if draw(st.booleans()):
        event.event_time.seconds = draw(seconds)
        event.event_time.nanos = draw(
            st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1))
        )
    return event


def _request(evs) -> bytes:
    return event_service_pb2.IngestEventsRequest(events=evs).SerializeToString()


@SETTINGS
@given(st.lists(events(), min_size=1, max_size=40))
def test_wire_decoding_matches_protobuf(evs) -> None:
    buf = _request(evs)
    decoded = columns_from_wire(buf)
    assert decoded is not None  # what protobuf itself writes is always the plain shape
    _same(decoded, _parsed(buf))
    _same(columns_from_proto(evs), decoded)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _message(number: int, *fields: bytes) -> bytes:
    body = b"".join(fields)
    return _field(number, 2, _varint(len(body)) + body)


def _event_bytes(*fields: bytes) -> bytes:
    return _message(1, *fields)


def _v(number: int, value: int) -> bytes:
    return _field(number, 0, _varint(value))


@pytest.mark.parametrize(
    ("body", "fast"),
    [
        # Fields in any order, unknown varint fields ignored: the fast decoder handles these.
        ((_v(4, 5), _v(2, 7), _v(1, 9), _v(11, 1)), True),
        ((_v(1, 9), _message(3, _v(1, 1_700_000_000), _v(7, 2))), True),
        ((_field(1, 0, _varint(9)), _message(3)), True),  # an empty Timestamp: seconds 0
        # Non-minimal varints in values: still the fast path.
        ((_field(1, 0, b"\x89\x80\x00"), _field(2, 0, b"\x87\x00")), True),
        # event_time twice with disjoint fields: protobuf merges them, which is what the slots give.
        ((_message(3, _field(1, 0, _varint(1_700_000_000))), _message(3, _field(2, 0, _varint(5)))), True),
        # Left to protobuf: a repeated scalar (last wins), the same Timestamp field twice, multi-byte
        # tags, unknown length-delimited / fixed-width fields.
        ((_field(1, 0, _varint(9)), _field(1, 0, _varint(10))), False),
        ((_message(3, _field(1, 0, _varint(1_700_000_000))), _message(3, _field(1, 0, _varint(5)))), False),
        ((_field(1, 0, _varint(9)), _field(20, 0, _varint(3))), False),
        ((_field(1, 0, _varint(9)), _message(12, b"ab")), False),
        ((_field(1, 0, _varint(9)), _field(13, 1, bytes(8))), False),
        ((_field(1, 0, _varint(9)), _field(14, 5, bytes(4))), False),
    ],
)  # fmt: skip
def test_odd_but_valid_encodings_decode_like_protobuf(body, fast) -> None:
    buf = _event_bytes(*body) + _event_bytes(_field(1, 0, _varint(42)))
    decoded = columns_from_wire(buf)
    assert (decoded is not None) == fast
    _same(to_columns(buf), _parsed(buf))
    if decoded is not None:
        _same(decoded, _parsed(buf))


@SETTINGS
@given(
    st.lists(events(), min_size=1, max_size=8),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 10**6),
)
def test_corrupted_requests_are_decoded_like_protobuf_or_refused(evs, flips, cut) -> None:
    buf = bytearray(_request(evs))
    for at, byte in flips:
        buf[at % len(buf)] = byte
    buf = bytes(buf[: max(1, len(buf) - cut % 6)])
    try:
        reference = _parsed(buf)
    except DecodeError:
        reference = None
    decoded = columns_from_wire(buf)
    if decoded is not None:
        assert reference is not None, "the fast decoder accepted bytes protobuf refuses"
        _same(decoded, reference)
    if reference is None:
        with pytest.raises(InvalidArgument):
            to_columns(buf)
    else:
        _same(to_columns(buf), reference)


def _reference(evs, now: datetime) -> tuple[pl.DataFrame, list]:
    return validate_events(events_from_proto(evs), now=now)


near_now = st.integers(
    int((NOW - timedelta(days=420)).timestamp()), int((NOW + timedelta(minutes=10)).timestamp())
)


@SETTINGS
@given(st.lists(events(seconds=near_now), min_size=1, max_size=60))
def test_numpy_validation_and_encoding_match_the_polars_path(evs) -> None:
    columns = columns_from_wire(_request(evs))
    ok, rejects = validate_columns(columns, now=NOW)
    valid_frame, expected = _reference(evs, NOW)
    assert rejects == expected
    assert int(ok.sum()) == valid_frame.height
    valid = columns.take(np.flatnonzero(ok))
    shards = shard_table(4)
    new = batches_from_columns(valid, buckets_np(valid.user_id), shards, max_events=7)
    old = split_batches(valid_frame, shards, max_events=7)
    assert [(b.shard, b.msg_id, b.count) for b in new] == [(b.shard, b.msg_id, b.count) for b in old]
    for a, b in zip(new, old, strict=True):
        assert decode_batch(a.payload).equals(decode_batch(b.payload))


def test_reject_reasons_are_the_documented_ones() -> None:
    good = dict(event_id=1, user_id=5, event_type=events_pb2.EVENT_TYPE_CLICK)
    evs = [events_pb2.Event(**good) for _ in range(7)]
    evs[1].event_type = 0
    evs[2].user_id = 2**40
    evs[3].event_id = 0
    evs[4].amount_fen = -1
    evs[5].event_time.FromDatetime(NOW + timedelta(hours=1))
    evs[6].event_time.FromDatetime(NOW - timedelta(days=401))
    for e in evs[:5]:
        e.event_time.FromDatetime(NOW - timedelta(seconds=5))
    ok, rejects = validate_columns(columns_from_proto(evs), now=NOW)
    assert ok.tolist() == [True] + [False] * 6
    assert [(i, f) for i, f, _ in rejects] == [
        (1, "event_type"),
        (2, "user_id"),
        (3, "event_id"),
        (4, "amount_fen"),
        (5, "ts"),
        (6, "ts"),
    ]
    assert rejects == _reference(evs, NOW)[1]


def test_timestamps_beyond_int64_microseconds_are_clamped_and_rejected() -> None:
    evs = [events_pb2.Event(event_id=i + 1, user_id=1, event_type=5) for i in range(2)]
    evs[0].event_time.seconds = 2**62
    evs[1].event_time.seconds = -(2**62)
    columns = columns_from_wire(_request(evs))
    _same(columns, columns_from_proto(evs))
    _, rejects = validate_columns(columns, now=NOW)
    assert [(i, f, r.split(" ")[0]) for i, f, r in rejects] == [(0, "ts", "in"), (1, "ts", "older")]


def test_empty_and_large_requests() -> None:
    assert len(columns_from_wire(b"")) == 0
    evs = [events_pb2.Event(event_id=i + 1, user_id=i + 1, event_type=5) for i in range(10_000)]
    _same(columns_from_wire(_request(evs)), columns_from_proto(evs))
