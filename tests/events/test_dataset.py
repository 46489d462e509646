from __future__ import annotations

from datetime import date, datetime, timedelta

import polars as pl
import pytest

from services.events.dataset import DatasetNotFound, EventDataset
from services.events.generator import GenConfig, generate
from services.events.sharding import Shard, bucket_expr
from services.storage import LocalObjectStore, ObjectStore
from tests.events.conftest import Generated


def test_layout_and_manifest_list_everything(story: Generated) -> None:
    store, cfg = story.store, story.config
    manifest = story.dataset.manifest
    stored = {info.key for info in store.list("data/")} - {"data/manifest.json"}
    listed = {f["key"] for f in manifest["files"]}
    assert stored == listed
    assert {p["key"] for p in manifest["parts"]} | {"data/world.json"} == listed
    days = [(cfg.start_date + timedelta(days=i)).isoformat() for i in range(cfg.days)]
    assert [d.isoformat() for d in story.dataset.days()] == days
    for key in listed - {"data/world.json"}:
        assert key.startswith(
            ("data/events/dt=", "data/profiles/part-", "data/identity/part-", "data/truth/segments/part-")
        ) and key.endswith(".parquet")
    rows = 0
    for part in story.dataset.parts("events"):
        assert part["key"].startswith(f"data/events/dt={part['dt']}/part-")
        df = pl.read_parquet(story.root / part["key"])
        assert df.height == part["rows"]
        assert df.get_column("user_id").min() == part["min_user_id"]
        assert df.get_column("bucket").max() == part["max_bucket"]
        assert df.get_column("ts").dt.date().unique().to_list() == [date.fromisoformat(part["dt"])]
        rows += part["rows"]
    assert rows == manifest["stats"]["events"] == story.result.events
    assert manifest["version"] == 1


def test_row_groups_let_statistics_prune_shards(story: Generated) -> None:
    import pyarrow.parquet as pq

    part = max(story.dataset.parts("events"), key=lambda p: p["rows"])
    meta = pq.ParquetFile(story.root / part["key"]).metadata
    assert all(meta.row_group(i).num_rows <= story.config.row_group_size for i in range(meta.num_row_groups))
    bucket_col = meta.schema.names.index("bucket")
    stats = meta.row_group(0).column(bucket_col).statistics
    assert stats is not None and stats.has_min_max


def test_world_has_the_story_constants(story: Generated) -> None:
    world = story.dataset.world
    sale = world["sale"]
    assert (sale["hook_list_price_fen"], sale["hook_sale_price_fen"], sale["hook_stock"]) == (
        19900,
        2990,
        500,
    )
    items = {i["item_id"]: i for i in world["items"]}
    assert len(items) == 2000 and len(world["categories"]) == 20
    hook, jacket = items[sale["hook_item_id"]], items[sale["retarget_item_id"]]
    assert hook["category_id"] == jacket["category_id"] == sale["hook_category_id"]
    assert jacket["price_fen"] > hook["price_fen"]
    assert sale["start"].endswith("T02:00:00Z") and sale["start_beijing"].endswith("T10:00:00+08:00")
    assert sale["day"] == (story.config.start_date + timedelta(days=story.config.days - 2)).isoformat()
    assert world["event_types"]["add_cart"] == 6


def test_scan_days_window_and_columns(story: Generated) -> None:
    ds = story.dataset
    day = ds.days()[1]
    one = ds.scan_events(days=[day], columns=["user_id", "ts"]).collect()
    assert one.columns == ["user_id", "ts"]
    assert one.get_column("ts").dt.date().unique().to_list() == [day]
    assert ds.scan_events(days=[date(2001, 1, 1)]).collect().height == 0
    t0 = datetime.fromisoformat(ds.world["sale"]["start"])
    window = ds.scan_events(start=t0, end=t0 + timedelta(hours=1)).collect()
    assert window.height > 0
    assert window.get_column("ts").min() >= t0 and window.get_column("ts").max() < t0 + timedelta(hours=1)  # type: ignore[operator]


def test_shard_scans_partition_the_events(story: Generated) -> None:
    ds = story.dataset
    total = ds.scan_events(columns=["event_id"]).collect().height
    seen = 0
    for shard in Shard.all(3):
        lo, hi = shard.bucket_range()
        parts = ds.parts("events", shard=shard)
        assert 0 < len(parts) < len(ds.parts("events"))  # whole files skipped by the manifest
        ev = ds.scan_events(shard=shard, columns=["user_id", "bucket"]).collect()
        assert ev.get_column("bucket").is_between(lo, hi - 1).all()
        seen += ev.height
        prof = ds.scan_profiles(shard=str(shard)).collect()
        assert prof.select(bucket_expr().is_between(lo, hi - 1).all()).item()
    assert seen == total


def test_readers_trust_only_the_manifest(story: Generated, tmp_path) -> None:
    # A stray part file (e.g. from a dead append) is not read.
    stray = story.root / "data" / "events" / f"dt={story.dataset.days()[0]}" / "part-99999.parquet"
    before = story.dataset.scan_events().select(pl.len()).collect().item()
    stray.write_bytes((story.root / story.dataset.parts("events")[0]["key"]).read_bytes())
    try:
        assert EventDataset(story.store).scan_events().select(pl.len()).collect().item() == before
    finally:
        stray.unlink()
    with pytest.raises(DatasetNotFound, match="flashcrowd gen"):
        EventDataset(LocalObjectStore(tmp_path / "empty"))


def test_generate_and_read_through_any_store(any_store: ObjectStore) -> None:
    cfg = GenConfig(users=1500, days=2, seed=4, chunk_users=600, prefix="ds/")
    result = generate(any_store, cfg)
    ds = EventDataset(any_store, "ds/")
    assert ds.scan_events().select(pl.len()).collect().item() == result.events > 0
    assert ds.scan_profiles().collect().height == 1500
    shard = Shard(1, 2)
    ev = ds.scan_events(shard=shard, columns=["bucket"]).collect()
    lo, hi = shard.bucket_range()
    assert ev.height > 0 and ev.get_column("bucket").is_between(lo, hi - 1).all()
    assert ds.world["sale"]["hook_stock"] == 500
