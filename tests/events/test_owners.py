"""Event owners in the stored data: the schema, validation, datasets with and without the column."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from services.events.append import append_events, ingest_event_keys, read_dataset_manifest
from services.events.dataset import EventDataset, part_owners
from services.events.generator import GenConfig, generate
from services.events.schema import (
    EVENTS_SCHEMA,
    OWNER,
    PLATFORM_OWNER,
    validate_events,
    visible_owners,
)
from services.events.sharding import bucket_expr
from services.runtime.tenant_ids import valid_tenant_id
from services.storage import LocalObjectStore
from tests.events.conftest import Generated

NOW = datetime(2025, 6, 18, 2, 0, tzinfo=UTC)


def test_the_platform_owner_is_never_a_tenant_id() -> None:
    assert not valid_tenant_id(PLATFORM_OWNER)
    assert EVENTS_SCHEMA[OWNER] == pl.Utf8
    assert visible_owners("acme") == (PLATFORM_OWNER, "acme")
    assert visible_owners(None) == (PLATFORM_OWNER,)


def test_validation_stamps_the_given_owner_and_ignores_the_events_own() -> None:
    frame = pl.DataFrame(
        {
            "event_id": [1, 2],
            "user_id": [10, 11],
            "ts": [NOW - timedelta(minutes=1)] * 2,
            "event_type": ["click", "click"],
            OWNER: [PLATFORM_OWNER, "beta"],  # what a caller might try to claim
        }
    )
    valid, rejects = validate_events(frame, now=NOW, owner="acme")
    assert rejects == [] and valid.schema == EVENTS_SCHEMA
    assert valid.get_column(OWNER).to_list() == ["acme", "acme"]
    assert validate_events(frame, now=NOW)[0].get_column(OWNER).unique().to_list() == [PLATFORM_OWNER]


def test_generated_worlds_are_platform_events(story: Generated) -> None:
    events = story.dataset.scan_events(columns=[OWNER]).unique().collect()
    assert events.get_column(OWNER).to_list() == [PLATFORM_OWNER]
    assert all(part_owners(p) == {PLATFORM_OWNER} for p in story.dataset.parts("events"))
    assert story.dataset.scan_events(owners=["acme"]).select(pl.len()).collect().item() == 0


def _events(n: int, owner: str, first_id: int, when: datetime) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "event_id": pl.Series(range(first_id, first_id + n), dtype=pl.UInt64),
            "user_id": pl.Series(range(1, n + 1), dtype=pl.UInt32),
            "ts": pl.Series([when] * n, dtype=pl.Datetime("us", "UTC")),
            "event_type": pl.Series([8] * n, dtype=pl.UInt8),
            "amount_fen": pl.Series([2990] * n, dtype=pl.Int64),
            OWNER: [owner] * n,
        }
    )
    absent = [
        pl.lit(None, dtype=t).alias(c)
        for c, t in EVENTS_SCHEMA.items()
        if c not in frame.columns and c != "bucket"
    ]
    return frame.with_columns(bucket_expr("user_id").alias("bucket"), *absent).select(list(EVENTS_SCHEMA))


def _drop_owner_column(store_root: Path, manifest: dict) -> None:
    """Rewrite every event part as it was written before events had owners."""
    for part in manifest["parts"]:
        if part["table"] == "events" and part["rows"]:
            path = store_root / part["key"]
            pl.read_parquet(path).drop(OWNER).write_parquet(path)


def test_datasets_from_before_owners_read_as_platform_events(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    generate(store, GenConfig(users=1500, days=2, seed=5, chunk_users=600))
    dataset = EventDataset(store)
    total = dataset.scan_events().select(pl.len()).collect().item()
    _drop_owner_column(tmp_path / "store", dataset.manifest)
    old = EventDataset(store)
    assert pl.read_parquet(tmp_path / "store" / old.parts("events")[0]["key"]).width == len(EVENTS_SCHEMA) - 1
    events = old.scan_events().collect()
    assert events.schema == EVENTS_SCHEMA and events.height == total
    assert events.get_column(OWNER).unique().to_list() == [PLATFORM_OWNER]
    assert old.scan_events(owners=visible_owners("acme")).select(pl.len()).collect().item() == total
    assert old.scan_events(owners=["acme"]).select(pl.len()).collect().item() == 0


def test_appended_parts_keep_owners_and_scans_keep_only_the_wanted_ones(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    generate(store, GenConfig(users=1500, days=2, seed=5, chunk_users=600))
    base = EventDataset(store)
    platform_rows = base.scan_events().select(pl.len()).collect().item()
    when = base.end - timedelta(minutes=5)
    # Two tenants use the same event ids; both are stored (one part per day with both owners).
    mixed = pl.concat([_events(30, "acme", 1, when), _events(20, "beta", 1, when)])
    append_events(store, "data/", mixed, part_tag="t-1", consumer="test", checkpoint={"seq": 1})
    append_events(
        store, "data/", _events(5, PLATFORM_OWNER, 9000, when), part_tag="t-2", consumer="test", checkpoint={}
    )
    dataset = EventDataset(store)
    parts = {p["key"].rsplit("/", 1)[1]: p for p in dataset.parts("events")}
    assert parts["part-t-1.parquet"]["owners"] == ["acme", "beta"]
    assert "owners" not in parts["part-t-2.parquet"]  # platform events only

    def count(owners) -> dict[str, int]:
        frame = dataset.scan_events(owners=owners).group_by(OWNER).len().collect()
        return dict(frame.iter_rows())

    assert count(None) == {PLATFORM_OWNER: platform_rows + 5, "acme": 30, "beta": 20}
    assert count(visible_owners("acme")) == {PLATFORM_OWNER: platform_rows + 5, "acme": 30}
    assert count(visible_owners("beta")) == {PLATFORM_OWNER: platform_rows + 5, "beta": 20}
    assert count(["beta"]) == {"beta": 20}
    assert count(visible_owners("gamma")) == {PLATFORM_OWNER: platform_rows + 5}
    # The compactor's de-duplication keys: (owner, event_id).
    keys = ingest_event_keys(store, read_dataset_manifest(store, "data/"), when.date().isoformat())
    assert keys.group_by(OWNER).len().sort(OWNER).rows() == [(PLATFORM_OWNER, 5), ("acme", 30), ("beta", 20)]


def test_old_ingested_parts_are_platform_keys(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "store")
    when = NOW - timedelta(hours=1)
    manifest = append_events(
        store, "data/", _events(10, PLATFORM_OWNER, 1, when), part_tag="old", consumer="c", checkpoint={}
    )
    _drop_owner_column(tmp_path / "store", manifest)
    keys = ingest_event_keys(store, manifest, when.date().isoformat())
    assert keys.get_column(OWNER).unique().to_list() == [PLATFORM_OWNER] and keys.height == 10


@pytest.mark.parametrize("owners", [["acme", "beta"], [None]])
def test_split_batches_needs_one_owner(owners: list) -> None:
    from services.events.codec import shard_table, split_batches

    frame = pl.concat([_events(2, "x", 1, NOW)] * len(owners)).with_columns(
        pl.Series(OWNER, [o for o in owners for _ in range(2)], dtype=pl.Utf8)
    )
    with pytest.raises(ValueError, match="one owner"):
        split_batches(frame, shard_table(4))


def test_a_tenants_click_flood_does_not_make_a_user_a_bot(tmp_path: Path) -> None:
    """Bot detection reads the platform's events only: a tenant faking hundreds of clicks a day for a
    user must not get them dropped from every other tenant's packs."""
    from services.audience.bots import detect_bots

    store = LocalObjectStore(tmp_path / "store")
    generate(store, GenConfig(users=1500, days=2, seed=5, chunk_users=600))
    before = set(detect_bots(EventDataset(store)).bots)
    victim = next(u for u in range(1, 1500) if u not in before)
    end = EventDataset(store).end
    clicks = 400
    flood = _events(clicks, "acme", 10**9, end - timedelta(hours=3)).with_columns(
        pl.lit(victim, dtype=pl.UInt32).alias("user_id"),
        pl.lit(5, dtype=pl.UInt8).alias("event_type"),  # CLICK
        bucket_expr(pl.lit(victim, dtype=pl.UInt32)).alias("bucket"),
        (pl.col("ts") + pl.duration(seconds=pl.int_range(0, clicks))).alias("ts"),
    )
    append_events(store, "data/", flood, part_tag="flood", consumer="test", checkpoint={})
    dataset = EventDataset(store)
    assert dataset.scan_events(owners=["acme"]).select(pl.len()).collect().item() == clicks
    assert victim not in set(detect_bots(dataset).bots)
