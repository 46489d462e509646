from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from services.events.dataset import EventDataset
from services.events.generator import DatasetExistsError, GenConfig, generate, synthetic_identities
from services.events.identity import hash_identifier, key_identifier
from services.events.pepper import Pepper, load_pepper
from services.events.schema import EVENTS_SCHEMA, IDENTITY_SCHEMA, PROFILES_SCHEMA, SEGMENTS_SCHEMA, EventType
from services.events.sharding import bucket_expr
from services.storage import LocalObjectStore
from tests.events.conftest import Generated

E = EventType


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith("manifest.json")
    }


def _manifest(root: Path) -> dict:
    doc = json.loads((root / "data" / "manifest.json").read_bytes())
    doc.pop("published_at")
    return doc


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    cfg = GenConfig(users=3000, days=3, seed=5, chunk_users=1000)
    roots = [tmp_path / name for name in ("a", "b", "c")]
    generate(LocalObjectStore(roots[0]), cfg)
    generate(LocalObjectStore(roots[1]), cfg)
    generate(LocalObjectStore(roots[2]), GenConfig(users=3000, days=3, seed=6, chunk_users=1000))
    assert _tree(roots[0]) == _tree(roots[1])
    assert _manifest(roots[0]) == _manifest(roots[1])
    assert _tree(roots[0]) != _tree(roots[2])


def test_chunking_changes_files_not_events(tmp_path: Path) -> None:
    frames = []
    for chunk in (700, 5000):
        store = LocalObjectStore(tmp_path / str(chunk))
        generate(store, GenConfig(users=3000, days=3, seed=2, chunk_users=chunk))
        frames.append(EventDataset(store).scan_events().sort("event_id").collect())
    assert frames[0].equals(frames[1])


def test_schemas_and_sorting(story: Generated) -> None:
    ds = story.dataset
    assert ds.scan_events().collect_schema() == EVENTS_SCHEMA
    assert ds.scan_profiles().collect_schema() == PROFILES_SCHEMA
    assert ds.scan_identity().collect_schema() == IDENTITY_SCHEMA
    assert ds.scan_truth().collect_schema() == SEGMENTS_SCHEMA
    for part in ds.parts("events")[:6]:
        df = pl.read_parquet(story.root / part["key"])
        assert df.schema == EVENTS_SCHEMA
        assert df.equals(df.sort("bucket", "user_id", "ts", maintain_order=True))
        assert (df.get_column("bucket") == df.select(bucket_expr()).to_series()).all()
    ev = ds.scan_events().collect()
    assert ev.get_column("event_id").is_unique().all()
    assert ev.get_column("event_type").is_between(1, 12).all()
    assert ev.filter(pl.col("amount_fen") < 0).height == 0
    money = ev.filter(pl.col("event_type").is_in([E.ORDER, E.PAY, E.REFUND]))
    assert money.get_column("amount_fen").null_count() == 0 and money.get_column("order_id").null_count() == 0
    assert ev.filter(pl.col("event_type") == E.LIVE_ENTER).get_column("item_id").null_count() > 0
    assert ds.scan_profiles().collect().height == story.config.users == ds.population_size()


def test_average_volume_and_inactive_users(story: Generated) -> None:
    truth = story.dataset.scan_truth().collect()
    per_user = story.result.events / story.config.users * 8 / story.config.days
    assert 14 <= per_user <= 28, per_user  # ~20 events per user over 8 days
    assert (truth.get_column("n_events") == 0).sum() > 0.05 * truth.height  # population > active set
    assert 0.002 < truth.get_column("is_bot").mean() < 0.01  # type: ignore[operator]


def _sale(story: Generated) -> tuple[datetime, datetime, dict]:
    sale = story.dataset.world["sale"]
    t0 = datetime.fromisoformat(sale["start"].replace("Z", "+00:00"))
    return t0, t0 + timedelta(hours=1), sale


def test_hook_stock_is_never_oversold(story: Generated) -> None:
    t0, t1, sale = _sale(story)
    assert t0.hour == 2 and t0.tzinfo == UTC  # 10:00 Beijing
    ev = story.dataset.scan_events().collect()
    hook_pays = ev.filter(
        pl.col("event_type") == E.PAY,
        pl.col("item_id") == sale["hook_item_id"],
        pl.col("amount_fen") == sale["hook_sale_price_fen"],
    )
    assert hook_pays.height == sale["hook_stock"] == 500  # sells out at this population
    assert hook_pays.get_column("ts").is_between(t0, t1, closed="left").all()
    assert hook_pays.get_column("user_id").is_unique().all()
    story_stats = story.result.story
    assert story_stats["hook_attempts"] > 500 and story_stats["hook_sold_out_after_s"] < 3600
    # Later clickers could not buy it: hook clickers far outnumber buyers.
    clickers = (
        ev.filter(
            pl.col("event_type") == E.CLICK,
            pl.col("item_id") == sale["hook_item_id"],
            pl.col("ts").is_between(t0, t1, closed="left"),
        )
        .get_column("user_id")
        .n_unique()
    )
    assert clickers > 2 * 500


def test_sale_hour_concentrates_clicks(story: Generated) -> None:
    t0, _, _ = _sale(story)
    ev = story.dataset.scan_events().join(story.dataset.scan_truth(), on="user_id").filter(~pl.col("is_bot"))
    hourly = (
        ev.filter(pl.col("event_type") == E.CLICK)
        .group_by(pl.col("ts").dt.truncate("1h").alias("hour"))
        .len()
        .collect()
    )
    sale_hour = hourly.filter(pl.col("hour") == t0).get_column("len").item()
    other = hourly.filter(pl.col("hour") != t0).get_column("len")
    assert sale_hour > 4 * other.median()  # type: ignore[operator]
    assert sale_hour > other.max()  # type: ignore[operator]


def test_refunds_reference_paid_orders(story: Generated) -> None:
    ev = story.dataset.scan_events().collect()
    pays = ev.filter(pl.col("event_type") == E.PAY).select("order_id", "user_id", "amount_fen", pay_ts="ts")
    refunds = ev.filter(pl.col("event_type") == E.REFUND)
    assert refunds.height > 0
    joined = refunds.join(pays, on="order_id", how="left")
    assert joined.get_column("pay_ts").null_count() == 0
    assert (joined.get_column("user_id") == joined.get_column("user_id_right")).all()
    assert (joined.get_column("amount_fen") == joined.get_column("amount_fen_right")).all()
    assert (joined.get_column("ts") > joined.get_column("pay_ts")).all()
    orders = ev.filter(pl.col("event_type") == E.ORDER)
    assert orders.get_column("order_id").is_unique().all()
    assert pays.join(orders, on="order_id", how="anti").height == 0
    # Cart abandoners exist, and paid share of orders is realistic.
    carts = ev.filter(pl.col("event_type") == E.ADD_CART).get_column("user_id").unique()
    buyers = orders.get_column("user_id").unique()
    assert len(set(carts) - set(buyers)) > 100
    assert 0.8 < pays.height / orders.height < 1.0


def test_bots_click_far_more_and_barely_buy(story: Generated) -> None:
    ds = story.dataset
    stats = (
        ds.scan_events()
        .group_by("user_id")
        .agg(
            clicks=(pl.col("event_type") == E.CLICK).sum(),
            pays=(pl.col("event_type") == E.PAY).sum(),
            days=pl.col("ts").dt.date().n_unique(),
        )
        .join(ds.scan_truth(), on="user_id")
        .group_by("is_bot")
        .agg((pl.col("clicks") / pl.col("days")).median().alias("clicks_per_day"), pl.col("pays").mean())
        .collect()
    )
    bot = stats.filter(pl.col("is_bot")).row(0, named=True)
    human = stats.filter(~pl.col("is_bot")).row(0, named=True)
    assert bot["clicks_per_day"] >= 100 and bot["clicks_per_day"] > 20 * human["clicks_per_day"]
    assert bot["pays"] < 0.05


def test_segments_differ_in_behaviour_and_profile(story: Generated) -> None:
    ds = story.dataset
    world = ds.world
    names = {s["code"]: s["name"] for s in world["segments"]}
    apparel = [c["category_id"] for c in world["categories"] if c["tag"] == "apparel"]
    ev = (
        ds.scan_events()
        .join(ds.scan_truth(), on="user_id")
        .filter(~pl.col("is_bot"))
        .group_by("segment")
        .agg(
            per_user=pl.len() / pl.col("user_id").n_unique(),
            apparel=pl.col("category_id").is_in(apparel).mean(),
            electronics=pl.col("category_id").is_in([6, 7, 8]).mean(),
            live=(pl.col("event_type") == E.LIVE_ENTER).mean(),
        )
        .collect()
    )
    seg = {names[r["segment"]]: r for r in ev.iter_rows(named=True)}
    assert seg["fashion_fans"]["apparel"] > 2 * seg["tech_buyers"]["apparel"]
    assert seg["tech_buyers"]["electronics"] > 3 * seg["fashion_fans"]["electronics"]
    assert seg["live_loyalists"]["live"] > 3 * seg["casual_browsers"]["live"]
    assert seg["live_loyalists"]["per_user"] > 2 * seg["casual_browsers"]["per_user"]
    prof = (
        ds.scan_profiles()
        .join(ds.scan_truth(), on="user_id")
        .filter(~pl.col("is_bot"))
        .group_by("segment")
        .agg(
            female=(pl.col("gender") == 1).mean(),
            young=pl.col("age_band").is_in([2, 3]).mean(),
            mother_baby=pl.col("interests").list.contains("mother_baby").mean(),
        )
        .collect()
    )
    p = {names[r["segment"]]: r for r in prof.iter_rows(named=True)}
    assert p["fashion_fans"]["female"] > p["tech_buyers"]["female"] + 0.4
    assert p["fashion_fans"]["young"] > p["live_loyalists"]["young"] + 0.3
    assert p["young_parents"]["mother_baby"] > 3 * p["tech_buyers"]["mother_baby"]


def test_preheat_teasers_and_follows_precede_the_sale(story: Generated) -> None:
    t0, _, sale = _sale(story)
    ev = story.dataset.scan_events().filter(pl.col("campaign_id") == sale["preheat_campaign_id"]).collect()
    plays = ev.filter(pl.col("event_type") == E.VIDEO_PLAY)
    assert plays.height > 100 and (plays.get_column("ts") < t0).all()
    assert set(plays.get_column("video_id").unique()) == set(sale["teaser_video_ids"])
    assert ev.filter(pl.col("event_type") == E.FOLLOW).height > 10
    # Teaser watchers join the live room far more often than others.
    live = story.dataset.scan_events().filter(
        pl.col("event_type") == E.LIVE_ENTER, pl.col("campaign_id") == sale["live_campaign_id"]
    )
    watchers = set(plays.get_column("user_id"))
    joined = set(live.collect().get_column("user_id"))
    assert len(watchers & joined) / len(watchers) > 0.3


def test_identity_map_matches_synthetic_raw_ids(story: Generated) -> None:
    ident = story.dataset.scan_identity().collect()
    pepper = load_pepper()  # what generate() used: the variable, else the shared ./var file
    assert ident.get_column("pepper_id").unique().to_list() == [pepper.id]
    assert story.result.manifest["identity_keys"]["pepper_id"] == pepper.id
    users = np.array([1, 2, 3, 50, 999], dtype=np.int64)
    raws = synthetic_identities(users, story.config.seed)
    assert any(t == 1 for _, t, _ in raws)
    plain: set[str] = set()
    for uid, id_type, raw in raws:
        key_sha256, key_md5 = key_identifier(pepper, id_type, raw)
        row = ident.filter(pl.col("user_id") == uid, pl.col("id_type") == int(id_type))
        assert row.get_column("key_sha256").to_list() == [key_sha256]
        assert row.get_column("key_md5").to_list() == [key_md5]
        plain.update(hash_identifier(id_type, raw))
    for column in ("key_sha256", "key_md5"):  # keyed hashes only: no plain digest anywhere
        assert ident.get_column(column).str.len_chars().eq(64).all()
        assert plain.isdisjoint(ident.get_column(column).to_list())
    phones = ident.filter(pl.col("id_type") == 1)
    assert phones.get_column("key_sha256").is_unique().all()
    assert 0.8 < phones.height / story.config.users < 0.9


def test_another_pepper_changes_only_the_identity_map(tmp_path: Path) -> None:
    cfg = GenConfig(users=2000, days=2, seed=5)
    peppers = (Pepper(b"a" * 32), Pepper(b"b" * 32))
    trees = []
    for name, pepper in zip("ab", peppers, strict=True):
        generate(LocalObjectStore(tmp_path / name), cfg, pepper=pepper)
        trees.append(_tree(tmp_path / name))
    differ = {key for key in trees[0] if trees[0][key] != trees[1][key]}
    assert differ and all(key.startswith("data/identity/") for key in differ)
    keys = [
        set(EventDataset(LocalObjectStore(tmp_path / name)).scan_identity().collect()["key_sha256"])
        for name in "ab"
    ]
    assert keys[0].isdisjoint(keys[1])


def test_refuses_to_overwrite_without_flag(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    cfg = GenConfig(users=500, days=2, seed=1)
    generate(store, cfg)
    with pytest.raises(DatasetExistsError, match="overwrite"):
        generate(store, cfg)
    (tmp_path / "data" / "events" / "dt=2025-06-12" / "part-00099.parquet").write_bytes(b"stale")
    generate(store, GenConfig(users=400, days=2, seed=1), overwrite=True)
    assert not (tmp_path / "data" / "events" / "dt=2025-06-12" / "part-00099.parquet").exists()
    assert EventDataset(store).population_size() == 400


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="sale day"):
        GenConfig(users=10, days=3, sale_day=3)
    assert GenConfig(users=10, days=3, sale_day=-1).sale_day_index == 2
    assert GenConfig(users=10, days=1).sale_day_index == 0
    assert GenConfig(users=10, days=8).sale_day_index == 6
    assert GenConfig(users=10, days=2, prefix="x").prefix == "x/"
