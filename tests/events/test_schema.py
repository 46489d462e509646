from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from services.events.schema import (
    EVENTS_SCHEMA,
    EventType,
    event_type_code,
    event_type_name,
    parse_event_types,
    validate_events,
)
from services.events.sharding import bucket_of

NOW = datetime(2025, 6, 20, 12, 0, tzinfo=UTC)


def test_event_type_codes_are_stable() -> None:
    expected = [
        "video_play",
        "video_finish",
        "live_enter",
        "product_view",
        "click",
        "add_cart",
        "order",
        "pay",
        "refund",
        "follow",
        "coupon_claim",
        "coupon_redeem",
    ]
    assert [event_type_name(c) for c in range(1, 13)] == expected
    assert EventType.ADD_CART == 6 and EventType.ADD_CART.label == "add_cart"
    assert event_type_code("EVENT_TYPE_PAY") == 8 == event_type_code("pay") == event_type_code(8)
    assert parse_event_types(["click", 5, "order"]) == [5, 7]
    for bad in (0, 13, "purchase", True):
        with pytest.raises(ValueError):
            event_type_code(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        event_type_name(0)


def test_schema_is_compact() -> None:
    assert EVENTS_SCHEMA["user_id"] == pl.UInt32 and EVENTS_SCHEMA["bucket"] == pl.UInt8
    assert EVENTS_SCHEMA["ts"] == pl.Datetime("us", "UTC") and EVENTS_SCHEMA["amount_fen"] == pl.Int64


def _batch() -> pl.DataFrame:
    ts = NOW - timedelta(hours=1)
    return pl.DataFrame(
        {
            "event_id": [1, 2, 3, 4, 5, 6, 7, 8, 9],
            "user_id": [10, None, 12, 13, 14, 15, -3, 18, 19],
            "ts": [ts, ts, ts, ts, NOW + timedelta(hours=2), NOW - timedelta(days=500), ts, ts, ts],
            "event_type": ["click", "click", "teleport", "pay", "click", "click", "click", "order", "order"],
            "item_id": [5, 5, 5, 5, 5, 5, 5, 0, 7],
            "amount_fen": [None, None, None, -100, None, None, None, None, 2990],
        }
    )


def test_validate_events_rejects_bad_rows_only() -> None:
    valid, rejects = validate_events(_batch(), now=NOW)
    by_row = {row: (field, reason) for row, field, reason in rejects}
    assert by_row[1][0] == "user_id" and "missing" in by_row[1][1]
    assert by_row[2] == ("event_type", "unknown event type")
    assert by_row[3] == ("amount_fen", "negative amount")
    assert by_row[4][0] == "ts" and "future" in by_row[4][1]
    assert by_row[5][0] == "ts" and "retention" in by_row[5][1]
    assert by_row[6][0] == "user_id"
    assert by_row[7] == ("amount_fen", "missing on order/pay/refund")
    assert 0 not in by_row and 8 not in by_row
    assert valid.schema == EVENTS_SCHEMA
    assert valid.get_column("event_id").to_list() == [1, 9]
    assert valid.get_column("bucket").to_list() == [bucket_of(10), bucket_of(19)]
    assert valid.get_column("event_type").to_list() == [5, 7]


def test_validate_events_missing_columns_and_proto_zero_ids() -> None:
    df = pl.DataFrame({"event_id": [1, 0], "user_id": [0, 4], "event_type": [5, 5], "item_id": [0, 9]})
    valid, rejects = validate_events(df, now=NOW)
    assert valid.height == 0
    fields = {(r, f) for r, f, _ in rejects}
    assert {(0, "ts"), (1, "ts"), (0, "user_id"), (1, "event_id")} <= fields
    ok = pl.DataFrame(
        {
            "event_id": [7],
            "user_id": [4],
            "ts": [int((NOW.timestamp() - 60) * 1e6)],
            "event_type": [5],
            "item_id": [0],
        }
    )
    valid, rejects = validate_events(ok, now=NOW)
    assert rejects == [] and valid.get_column("item_id").to_list() == [None]


def test_codes_match_the_proto_enums() -> None:
    from flashcrowd.audience.v1 import audience_service_pb2, events_pb2

    from services.events.schema import IdType

    proto = events_pb2.EventType
    assert {n: v for n, v in proto.items() if v} == {f"EVENT_TYPE_{t.name}": t.value for t in EventType}
    ids = audience_service_pb2.IdType
    # USER_ID is an upload format of platform principals (plain platform user ids), not an
    # external identifier kind of the identity map.
    external = {n: v for n, v in ids.items() if v and n != "ID_TYPE_USER_ID"}
    assert external == {f"ID_TYPE_{t.name}": t.value for t in IdType}
    assert ids.Value("ID_TYPE_USER_ID") not in {t.value for t in IdType}
