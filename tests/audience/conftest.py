"""Fixtures of the audience tests: a small generated world (5k users, 3 days) and pack stores.

``world`` is generated once per session into a local store; ``world_on`` generates the same world
into the store a test is parametrized with (``any_store``: local and the moto S3 server), for the
tests that must read events through S3 as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pytest
from pyroaring import BitMap

from services.events.dataset import EventDataset
from services.events.generator import GenConfig, generate
from services.storage import LocalObjectStore, ObjectStore

WORLD = GenConfig(users=5_000, days=3, seed=7)


@dataclass
class World:
    store: ObjectStore
    dataset: EventDataset
    #: Every event of the dataset, eager: the independent reference computations read this.
    events: pl.DataFrame
    profiles: pl.DataFrame
    bots: BitMap  # ground truth from truth/segments


def make_world(store: ObjectStore, config: GenConfig = WORLD) -> World:
    generate(store, config)
    dataset = EventDataset(store, config.prefix)
    truth = dataset.scan_truth().collect()
    bots = BitMap(truth.filter(pl.col("is_bot")).get_column("user_id").to_list())
    return World(store, dataset, dataset.scan_events().collect(), dataset.scan_profiles().collect(), bots)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(LocalObjectStore(tmp_path_factory.mktemp("audience-world") / "store"))


@pytest.fixture
def world_on(any_store: ObjectStore) -> World:
    return make_world(any_store)
