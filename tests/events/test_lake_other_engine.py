"""Another engine reads the event lake and gets flashcrowd's pack: DuckDB over the snapshot's files.

"Clicked minus paid in a window" built by flashcrowd (``build_pack`` over ``EventDataset``) and by
DuckDB SQL over exactly the Parquet files the events table's current Delta snapshot lists: the same
member set, id for id. DuckDB is a test dependency only; builds stay on polars.
"""

from __future__ import annotations

from datetime import timedelta

import duckdb
import numpy as np
from flashcrowd.audience.v1 import spec_pb2

from services.audience.builder import build_pack
from services.audience.compiler import bitmap_to_numpy
from services.audience.spec_io import spec_from_data
from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate
from services.events.lake import TableWriter
from services.events.schema import EventType
from services.runtime.errors import NotFound
from services.storage import LocalObjectStore


def no_packs(name: str, version: int):
    raise NotFound("flashcrowd.dev/Pack", name)


def test_duckdb_over_the_snapshot_files_gives_the_same_pack(local_store: LocalObjectStore) -> None:
    generate(local_store, GenConfig(users=5000, days=3, seed=11, chunk_users=2000), table_format="delta")
    dataset = EventDataset(local_store)
    start = dataset.start + timedelta(days=1)
    end = dataset.end
    window = {"absolute": {"startTime": start.isoformat(), "endTime": end.isoformat()}}
    spec = spec_from_data(
        {
            "exclude": {
                "base": {"shortcut": {"kind": "clickers", "window": window}},
                "subtract": [{"behavior": {"eventTypes": ["pay"], "window": window}}],
            }
        }
    )
    result = build_pack(
        dataset, spec, spec_pb2.BuildOptions(include_bots=True), resolve_pack=no_packs, tenant="t"
    )
    ours = np.sort(bitmap_to_numpy(result.bitmap))

    table = TableWriter(local_store, "data/").open("events")
    assert table is not None
    files = table.file_uris()
    sql = """
        SELECT DISTINCT user_id FROM read_parquet($files)
        WHERE event_type = $click AND ts >= $start AND ts < $end
        EXCEPT
        SELECT DISTINCT user_id FROM read_parquet($files)
        WHERE event_type = $pay AND ts >= $start AND ts < $end
    """
    with duckdb.connect() as con:
        rows = con.execute(
            sql,
            {
                "files": files,
                "click": int(EventType.CLICK),
                "pay": int(EventType.PAY),
                "start": start,
                "end": end,
            },
        ).fetchall()
    theirs = np.sort(np.array([r[0] for r in rows], dtype=np.uint32))
    assert len(ours) > 100
    assert np.array_equal(ours, theirs)
