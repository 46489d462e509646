"""Bot detection against the generator's truth, and its per-dataset-version cache."""

from __future__ import annotations

import json

import polars as pl
import pytest
from pyroaring import BitMap

from services.audience.bots import BotReport, BotRule, bot_bitmap, bots_cache_key, detect_bots
from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate
from services.storage import LocalObjectStore, ObjectStore, publish
from tests.audience.conftest import World


@pytest.fixture(scope="module")
def busy_world(tmp_path_factory: pytest.TempPathFactory) -> EventDataset:
    """More users and bots than the shared world, so that precision and recall mean something."""
    store = LocalObjectStore(tmp_path_factory.mktemp("bots") / "store")
    generate(store, GenConfig(users=40_000, days=4, seed=3, chunk_users=10_000))
    return EventDataset(store)


def precision_recall(dataset: EventDataset, found: BitMap) -> tuple[float, float]:
    truth = dataset.scan_truth().collect()
    # Bots that produced no event at all cannot be seen (and never reach a behaviour pack).
    visible = BitMap(
        truth.filter(pl.col("is_bot") & (pl.col("n_events") > 0)).get_column("user_id").to_list()
    )
    hits = len(found & visible)
    return hits / max(len(found), 1), hits / max(len(visible), 1)


@pytest.mark.parametrize("rule", [BotRule(), BotRule(use_isolation_forest=True)], ids=["rule", "rule+forest"])
def test_precision_and_recall_against_truth(busy_world: EventDataset, rule: BotRule) -> None:
    report = detect_bots(busy_world, rule)
    precision, recall = precision_recall(busy_world, report.bots)
    assert len(report.bots) > 100
    assert precision > 0.9 and recall > 0.8, (precision, recall)
    assert report.threshold_rate > 10 and report.candidates >= len(report.bots)


def test_regularity_confirms_rate_outliers(busy_world: EventDataset) -> None:
    # With a loose rate threshold and no "extreme rate" shortcut, heavy human clickers become
    # candidates; the click-interval regularity check must keep them out.
    loose = detect_bots(busy_world, BotRule(k=2.0, extreme_k=1e9))
    precision, _ = precision_recall(busy_world, loose.bots)
    assert loose.candidates > len(loose.bots) and precision > 0.95


def test_cache_per_dataset_version(world_on: World) -> None:
    dataset, store = world_on.dataset, world_on.store
    key = bots_cache_key(dataset)
    assert key == "data/derived/bots/v1.roaring"
    assert not store.exists(key)
    first = bot_bitmap(dataset)
    assert store.exists(key) and BitMap.deserialize(store.get_bytes(key)) == first
    # Served from the cache: a planted (wrong) bitmap with a matching manifest is returned as is.
    manifest = store.get_bytes(key.replace(".roaring", ".json"))
    store.put_bytes(key, bytes(BitMap([1]).serialize()))
    assert bot_bitmap(dataset) == BitMap([1])
    # A cache written for other data (regenerated under the same version) is not trusted.
    stale = json.loads(manifest)
    stale["fingerprint"] = "something else"
    for field in ("files", "published_at"):
        stale.pop(field)
    publish(
        store,
        data={key: bytes(BitMap([2]).serialize())},
        manifest_key=key.replace(".roaring", ".json"),
        manifest=stale,
        overwrite=True,
    )
    assert bot_bitmap(dataset) == first
    assert bot_bitmap(dataset, use_cache=False) == first


def test_no_bots_when_there_are_none(any_store: ObjectStore) -> None:
    generate(any_store, GenConfig(users=50, days=1, seed=1, bot_share=0.0))
    report = detect_bots(EventDataset(any_store))
    assert len(report.bots) == 0


def test_a_report_without_clicks_is_strict_json() -> None:
    """Nobody clicked: no threshold, written as null (the cache manifest is strict JSON)."""
    summary = BotReport(BitMap(), 0, 0, 0.0, 0.0, float("inf")).summary()
    assert json.loads(json.dumps(summary, allow_nan=False))["threshold_clicks_per_day"] is None
