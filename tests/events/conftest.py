"""A small generated dataset shared by the event tests (generated once per session)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from services.events.dataset import EventDataset
from services.events.generator import GenConfig, GenResult, generate
from services.storage import LocalObjectStore

# Big enough that the hook item sells out (needs > 500 purchase attempts), small enough to take ~1 s.
STORY = GenConfig(users=30_000, days=4, seed=11, chunk_users=8_000)


@dataclass
class Generated:
    store: LocalObjectStore
    root: Path
    config: GenConfig
    result: GenResult
    dataset: EventDataset


@pytest.fixture(scope="session")
def story(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    root = tmp_path_factory.mktemp("story") / "store"
    store = LocalObjectStore(root)
    result = generate(store, STORY)
    return Generated(store, root, STORY, result, EventDataset(store, STORY.prefix))
