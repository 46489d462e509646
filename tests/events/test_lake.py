"""The event lake (Delta tables through ``TableWriter``) read by ``EventDataset``, on both stores.

Oracle: the same generated world written in the manifest format; the lake must give the same rows.
Concurrency runs on moto's S3-protocol server through the real clients (delta-rs commits by
conditional put there, exactly as on MinIO).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate
from services.events.lake import CommitConflict, TableWriter
from services.events.lake.physical import to_physical
from services.events.parts import DatasetExistsError, default_table_format
from services.events.schema import EVENTS_SCHEMA, PLATFORM_OWNER
from services.events.sharding import buckets_np
from services.events.sharding import parse as parse_shard
from services.storage import ObjectStore

CONFIG = GenConfig(users=3000, days=2, seed=5, chunk_users=1000)


def _events(n: int, first_id: int = 1, *, owner: str = PLATFORM_OWNER, day: int = 0) -> pl.DataFrame:
    ids = pl.Series([first_id + i for i in range(n)], dtype=pl.UInt64)
    users = pl.Series([1 + (i * 7919) % 5000 for i in range(n)], dtype=pl.UInt32)
    base = datetime(2025, 6, 12, tzinfo=UTC) + timedelta(days=day)
    frame = pl.DataFrame(
        {
            "event_id": ids,
            "user_id": users,
            "bucket": pl.Series(buckets_np(users.to_numpy()), dtype=pl.UInt8),
            "ts": [base + timedelta(seconds=i) for i in range(n)],
            "event_type": pl.Series([5] * n, dtype=pl.UInt8),
            "owner": [owner] * n,
        }
    )
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in EVENTS_SCHEMA.items() if c not in frame.columns]
    return frame.with_columns(missing).select(list(EVENTS_SCHEMA))


def _sorted(frame: pl.DataFrame, *keys: str) -> pl.DataFrame:
    return frame.sort(list(keys))


def test_a_generated_lake_holds_the_same_rows_as_the_manifest_dataset(any_store: ObjectStore) -> None:
    generate(any_store, CONFIG, table_format="delta")
    generate(any_store, GenConfig(**{**CONFIG.__dict__, "prefix": "old/"}), table_format="manifest")
    lake, old = EventDataset(any_store), EventDataset(any_store, "old/")
    assert lake.lake is not None and old.lake is None
    assert any_store.exists("data/lake.json") and not any_store.exists("data/manifest.json")
    assert _sorted(lake.scan_events().collect(), "event_id").equals(
        _sorted(old.scan_events().collect(), "event_id")
    )
    for scan in ("scan_profiles", "scan_identity", "scan_truth"):
        a = getattr(lake, scan)().collect()
        b = getattr(old, scan)().collect()
        assert a.schema == b.schema and _sorted(a, *a.columns[:2]).equals(_sorted(b, *b.columns[:2]))
    assert lake.days() == old.days() and lake.start == old.start and lake.end == old.end
    assert lake.population_size() == old.population_size() and lake.world == old.world
    assert lake.manifest["stats"] == old.manifest["stats"]


def test_a_shard_reads_only_its_bucket_groups_and_gets_the_same_users(local_store: ObjectStore) -> None:
    generate(local_store, CONFIG, table_format="delta")
    lake = EventDataset(local_store)
    every = lake.parts("events")
    for shard in ("0/4", "3/4", "1/3"):
        mine = lake.parts("events", shard=shard)
        assert 0 < len(mine) < len(every)
        got = lake.scan_events(shard=shard).collect()
        owned = [b for b in range(256) if parse_shard(shard).owns_bucket(b)]
        want = lake.scan_events().collect().filter(pl.col("bucket").is_in(owned))
        assert _sorted(got, "event_id").equals(_sorted(want, "event_id"))
    # One day and a time window open only that day's partition.
    day = lake.days()[0]
    assert {p["dt"] for p in lake.parts("events", days=[day])} == {day.isoformat()}


def test_generate_refuses_an_existing_lake_and_overwrite_replaces_it(local_store: ObjectStore) -> None:
    generate(local_store, CONFIG, table_format="delta")
    with pytest.raises(DatasetExistsError):
        generate(local_store, CONFIG, table_format="delta")
    generate(
        local_store, GenConfig(**{**CONFIG.__dict__, "users": 1000}), table_format="delta", overwrite=True
    )
    assert EventDataset(local_store).population_size() == 1000


def test_table_format_setting_is_checked_naming_the_variable() -> None:
    assert default_table_format({}) == "manifest"
    assert default_table_format({"FLASHCROWD_TABLE_FORMAT": "Delta"}) == "delta"
    with pytest.raises(ValueError, match="FLASHCROWD_TABLE_FORMAT"):
        default_table_format({"FLASHCROWD_TABLE_FORMAT": "iceberg"})


def test_an_application_transaction_commits_a_batch_once(any_store: ObjectStore) -> None:
    writer = TableWriter(any_store, "data/")
    assert writer.committed("events", "c1") is None
    assert writer.append("events", _events(10), app_id="c1", app_version=7) is not None
    assert writer.committed("events", "c1") == 7
    # A replay of the same batch (crash after the commit, before the acknowledgement) is skipped.
    assert writer.append("events", _events(10), app_id="c1", app_version=7) is None
    # An empty batch still moves the position (every message of it was a duplicate).
    assert writer.append("events", _events(0), app_id="c1", app_version=9) is not None
    assert writer.committed("events", "c1") == 9
    table = writer.open("events")
    assert table is not None
    assert pl.DataFrame(table.to_pyarrow_table()).height == 10
    with pytest.raises(ValueError, match="go together"):
        writer.append("events", _events(1), app_id="c1")


def test_event_ids_keep_all_64_bits(local_store: ObjectStore) -> None:
    frame = _events(3, first_id=(1 << 64) - 3)
    assert to_physical("events", frame)["event_id"].dtype == pl.Int64
    TableWriter(local_store, "data/").append("events", frame)
    from services.events.lake.descriptor import write_descriptor

    write_descriptor(local_store, "data/", {})
    got = EventDataset(local_store).scan_events().collect()
    assert sorted(got["event_id"].to_list()) == sorted(frame["event_id"].to_list())
    assert got.schema == EVENTS_SCHEMA


def test_two_writers_at_once_lose_no_commit_and_duplicate_nothing(s3_store: ObjectStore) -> None:
    TableWriter(s3_store, "data/").append("events", _events(1, first_id=10**9))  # the table exists
    errors: list[BaseException] = []
    per_writer, batch = 8, 50

    def writer(k: int) -> None:
        w = TableWriter(s3_store, "data/")
        for i in range(per_writer):
            try:
                first = 1 + (k * per_writer + i) * batch
                w.append("events", _events(batch, first_id=first), app_id=f"w{k}", app_version=i)
            except BaseException as error:  # pragma: no cover - reported below
                errors.append(error)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    table = TableWriter(s3_store, "data/").open("events")
    assert table is not None
    assert table.version() == 2 * per_writer  # version 0 + every commit, none lost
    ids = pl.DataFrame(table.to_pyarrow_table(columns=["event_id"]))["event_id"]
    assert ids.len() == ids.n_unique() == 2 * per_writer * batch + 1
    assert table.transaction_version("w0") == table.transaction_version("w1") == per_writer - 1


def test_two_writers_racing_on_one_position_commit_it_once(s3_store: ObjectStore) -> None:
    TableWriter(s3_store, "data/").append("events", _events(1, first_id=10**9))
    outcomes: list[object] = []
    barrier = threading.Barrier(2)

    def writer() -> None:
        w = TableWriter(s3_store, "data/")
        barrier.wait()
        try:
            outcomes.append(w.append("events", _events(100), app_id="same", app_version=1))
        except CommitConflict as error:
            outcomes.append(error)

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = TableWriter(s3_store, "data/").open("events")
    assert table is not None
    ids = pl.DataFrame(table.to_pyarrow_table(columns=["event_id"]))["event_id"]
    assert ids.len() == ids.n_unique() == 101  # the batch is in once
    assert len([o for o in outcomes if isinstance(o, int)]) == 1
    assert all(o is None or isinstance(o, int | CommitConflict) for o in outcomes)


def test_maintain_applies_retention_compacts_small_files_and_vacuums(local_store: ObjectStore) -> None:
    from services.events.lake.descriptor import write_descriptor
    from services.events.lake.maintenance import MaintenanceOptions, maintain

    writer = TableWriter(local_store, "data/")
    for i in range(20):
        writer.append("events", _events(50, first_id=1 + 50 * i, day=i % 2), app_id="c", app_version=i)
    write_descriptor(local_store, "data/", {})
    before = EventDataset(local_store)
    rows = before.scan_events().collect()
    day0 = rows.filter(pl.col("ts").dt.date() == before.days()[0]).height
    keys_before = {p["key"] for p in before.parts("events")}
    # "now" puts day 0 outside a 1-day retention window (day 1 stays).
    now = datetime.combine(before.days()[1], datetime.min.time(), UTC) + timedelta(days=1, hours=1)
    reports = maintain(
        local_store,
        "data/",
        MaintenanceOptions(retention_days=1, target_size=1 << 20, min_small_files=4, vacuum_hours=0),
        now=now,
    )
    events = next(r for r in reports if r.table == "events")
    assert (
        events.retention_files_removed > 0 and events.compacted_files_removed > events.compacted_files_added
    )
    assert events.checkpoint and events.vacuumed_files > 0
    after = EventDataset(local_store)
    assert after.days() == [before.days()[1]]
    kept = after.scan_events().collect()
    assert kept.height == rows.height - day0 and kept["event_id"].n_unique() == kept.height
    assert len(after.parts("events")) < len(keys_before)
    # Vacuum deleted the files no snapshot needs: only the live ones are left under the table.
    stored = {i.key for i in local_store.list("data/tables/events/") if "_delta_log" not in i.key}
    assert stored == {p["key"] for p in after.parts("events")}
    # The stream position survives compaction and checkpoints.
    assert writer.committed("events", "c") == 19


def test_migrate_converts_a_manifest_dataset_in_place_once(any_store: ObjectStore) -> None:
    from services.events.lake.migrate import MigrationError, migrate

    generate(any_store, CONFIG, table_format="manifest")
    before = EventDataset(any_store)
    events = _sorted(before.scan_events().collect(), "event_id")
    report = migrate(any_store, "data/")
    after = EventDataset(any_store)
    assert after.lake is not None and report.rows["events"] == events.height > 0
    assert _sorted(after.scan_events().collect(), "event_id").equals(events)
    assert after.population_size() == before.population_size() and after.world == before.world
    assert after.days() == before.days() and after.start == before.start and after.end == before.end
    assert report.pack_size > 0
    with pytest.raises(MigrationError, match="already an event lake"):
        migrate(any_store, "data/")
    with pytest.raises(MigrationError, match="no event dataset"):
        migrate(any_store, "nothing/")


def test_erasure_removes_a_user_from_every_lake_table_and_file(any_store: ObjectStore) -> None:
    from services.events.lake.erasure import erase_users

    generate(any_store, CONFIG, table_format="delta")
    dataset = EventDataset(any_store)
    victim = int(dataset.scan_events(columns=["user_id"]).collect()["user_id"][0])
    others = dataset.scan_events().filter(pl.col("user_id") != victim).collect()
    report = erase_users(any_store, "data/", [victim], vacuum_hours=0)
    assert report.rows["events"] > 0 and report.rows["profiles"] == 1 and report.rows["identity"] >= 1
    after = EventDataset(any_store)
    assert _sorted(after.scan_events().collect(), "event_id").equals(_sorted(others, "event_id"))
    for scan in (after.scan_profiles, after.scan_identity, after.scan_truth):
        assert scan().filter(pl.col("user_id") == victim).collect().height == 0
    # No data file left in the store holds the user's rows.
    for info in any_store.list("data/tables/"):
        if info.key.endswith(".parquet") and "_delta_log" not in info.key:
            path, options = any_store.scan_target(info.key)
            ids = pl.read_parquet(path, columns=["user_id"], storage_options=options)["user_id"]
            assert victim not in ids.to_list(), info.key
    with pytest.raises(ValueError, match=r"0\.\.4294967295"):
        erase_users(any_store, "data/", [-1])


def test_vacuum_removes_the_orphans_of_a_crashed_writer(local_store: ObjectStore) -> None:
    from services.events.lake.descriptor import write_descriptor
    from services.events.lake.maintenance import MaintenanceOptions, maintain

    writer = TableWriter(local_store, "data/")
    writer.append("events", _events(10))
    write_descriptor(local_store, "data/", {})
    # A writer killed after uploading a file and before its commit leaves it unreferenced.
    orphan = "data/tables/events/dt=2025-06-12/bucket16=0/part-orphan.parquet"
    local_store.put_bytes(orphan, b"not in any commit")
    maintain(local_store, "data/", MaintenanceOptions(retention_days=None, vacuum_hours=0))
    assert not local_store.exists(orphan)
    assert EventDataset(local_store).scan_events().collect().height == 10
