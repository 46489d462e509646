"""Builders of proto events for the real-time tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flashcrowd.audience.v1 import events_pb2


def make_event(
    event_id: int,
    user_id: int,
    event_type: int = events_pb2.EVENT_TYPE_CLICK,
    when: datetime | None = None,
    **fields,
) -> events_pb2.Event:
    event = events_pb2.Event(event_id=event_id, user_id=user_id, event_type=event_type, **fields)
    event.event_time.FromDatetime(when or datetime.now(UTC) - timedelta(seconds=1))
    return event


def make_events(n: int, *, first_id: int = 1, users: int = 1000, when: datetime | None = None) -> list:
    when = when or datetime.now(UTC) - timedelta(seconds=1)
    return [make_event(first_id + i, 1 + (i * 7919) % users, when=when, item_id=100001) for i in range(n)]
