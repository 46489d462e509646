"""The in-memory directory of key ids: unknown ids cost at most one coalesced, throttled refresh."""

from __future__ import annotations

import asyncio

from services.gateway.key_directory import CLOCK_SLACK_SECONDS, KeyDirectory


class FakeStore:
    """``key_ids`` of a key store, counting queries."""

    def __init__(self) -> None:
        self.keys: dict[str, float] = {"known": 100.0}
        self.queries: list[float | None] = []

    def key_ids(self, *, created_after: float | None = None) -> list[tuple[str, float]]:
        self.queries.append(created_after)
        return [(k, t) for k, t in self.keys.items() if created_after is None or t > created_after]


async def test_unknown_ids_are_answered_from_memory_after_one_coalesced_refresh() -> None:
    store = FakeStore()
    directory = KeyDirectory(store, min_refresh_seconds=0.05)  # type: ignore[arg-type]
    assert await directory.contains("known") and store.queries == [None]  # first use: full load
    assert await directory.contains("known") and len(store.queries) == 1  # then from memory
    # A burst of 100 made-up ids: one incremental refresh serves all of them.
    answers = await asyncio.gather(*(directory.contains(f"made-up-{i}") for i in range(100)))
    assert not any(answers)
    assert store.queries[1:] == [100.0 - CLOCK_SLACK_SECONDS]
    # A key created elsewhere is found on the next question about it.
    store.keys["fresh"] = 200.0
    assert await directory.contains("fresh") and len(store.queries) == 3
    directory.add("local")
    assert await directory.contains("local") and len(store.queries) == 3
    await directory.close()


async def test_the_full_reload_runs_in_the_background() -> None:
    now = [0.0]
    store = FakeStore()
    directory = KeyDirectory(store, full_reload_seconds=10, clock=lambda: now[0])  # type: ignore[arg-type]
    assert await directory.contains("known")
    now[0] = 11.0
    assert await directory.contains("known")  # answered at once, the reload scheduled
    await asyncio.sleep(0.05)
    assert store.queries == [None, None]
    await directory.close()
