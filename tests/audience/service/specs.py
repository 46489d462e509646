"""Spec builders and independent reference computations (plain polars over the dataset)."""

from __future__ import annotations

from datetime import datetime

import polars as pl
from flashcrowd.audience.v1 import events_pb2, spec_pb2
from google.protobuf import timestamp_pb2
from pyroaring import BitMap

from services.events.dataset import EventDataset

ET = events_pb2.EventType
INCLUDE_BOTS = spec_pb2.BuildOptions(include_bots=True)


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def window(start: datetime, end: datetime) -> spec_pb2.TimeWindow:
    return spec_pb2.TimeWindow(absolute=spec_pb2.AbsoluteWindow(start_time=_ts(start), end_time=_ts(end)))


def behavior(types: list[int], start: datetime, end: datetime, min_count: int = 1) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(
        behavior=spec_pb2.BehaviorCondition(event_types=types, window=window(start, end), min_count=min_count)
    )


def ref(name: str, version: int = 0) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(pack=spec_pb2.PackReference(pack=name, version=version))


def union(*specs: spec_pb2.PackSpec) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(union=spec_pb2.SetOperands(operands=specs))


def intersect(*specs: spec_pb2.PackSpec) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(intersect=spec_pb2.SetOperands(operands=specs))


def exclude(base: spec_pb2.PackSpec, *subtract: spec_pb2.PackSpec) -> spec_pb2.PackSpec:
    return spec_pb2.PackSpec(exclude=spec_pb2.ExcludeOperands(base=base, subtract=subtract))


def expected_users(
    dataset: EventDataset, types: list[int], start: datetime, end: datetime, min_count: int = 1
) -> BitMap:
    """Users with >= min_count events of ``types`` in [start, end): a hand-written polars query."""
    frame = (
        dataset.scan_events(columns=None)
        .filter(pl.col("event_type").is_in(types) & (pl.col("ts") >= start) & (pl.col("ts") < end))
        .group_by("user_id")
        .len()
        .filter(pl.col("len") >= min_count)
        .collect()
    )
    return BitMap(frame.get_column("user_id").to_list())
