"""Which API key ids exist, in memory: an unknown id is refused without a key-store lookup.

A flood of made-up keys (``fc_<random id>_<random secret>``) must not turn into one store query per
request, whatever address it comes from, while a valid key must never be refused because of such a
flood. The key store never deletes a key row (revocation and expiry are times), so the set of ids
only grows, and this directory can answer "no such id" from memory:

* the first question loads every id (``SELECT key_id, create_time``: ~70 bytes per key in memory);
* an id not in the set makes the directory refresh (ids created since the newest it knows, minus
  ``CLOCK_SLACK_SECONDS`` for replicas whose clocks differ) before answering, so a key created a
  moment ago on another replica is found; refreshes are coalesced and start at most every
  ``min_refresh_seconds``, so a flood costs at most a few small queries per second in all;
* every ``full_reload_seconds`` the whole set is read again in the background (a safety net for
  clock skew beyond the slack);
* keys created through this replica are added at once (``add``).

Only existence is answered here; revocation, expiry and the secret are checked on the (cached)
row, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from services.gateway.keystore import KeyStore

logger = logging.getLogger(__name__)

CLOCK_SLACK_SECONDS = 300.0


class KeyDirectory:
    """The ids of every key in the store; one instance per gateway process."""

    def __init__(
        self,
        store: KeyStore,
        *,
        min_refresh_seconds: float = 0.25,
        full_reload_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.min_refresh_seconds = min_refresh_seconds
        self.full_reload_seconds = full_reload_seconds
        self.clock = clock
        self._ids: set[str] = set()
        self._newest: float | None = None  # newest create_time seen (store clock); None: not loaded
        self._refresh_started = float("-inf")  # monotonic start of the last completed refresh
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        #: Refresh queries made (tests read it).
        self.refreshes = 0

    def add(self, key_id: str) -> None:
        self._ids.add(key_id)

    def __len__(self) -> int:
        return len(self._ids)

    async def contains(self, key_id: str) -> bool:
        """Does a key with this id exist? Refreshes (coalesced) before answering no."""
        if key_id in self._ids:
            if self.clock() - self._loaded_at >= self.full_reload_seconds and self._background is None:
                self._background = asyncio.get_running_loop().create_task(
                    self._reload(), name="key-ids-reload"
                )
            return True
        asked = self.clock()
        while key_id not in self._ids and self._refresh_started < asked:
            async with self._lock:
                if self._refresh_started >= asked:
                    break  # a refresh that started after the question has completed: the answer stands
                pause = self._refresh_started + self.min_refresh_seconds - self.clock()
                if pause > 0:
                    await asyncio.sleep(pause)
                await self._refresh()
        return key_id in self._ids

    async def _reload(self) -> None:
        """The periodic full reload, off the call path (a known id never waits for it)."""
        try:
            async with self._lock:
                if self.clock() - self._loaded_at >= self.full_reload_seconds:
                    await self._refresh()
        except Exception:
            logger.exception("reloading the key ids failed; retried on a later call")
        finally:
            self._background = None

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)

    async def _refresh(self) -> None:
        started = self.clock()
        full = self._newest is None or started - self._loaded_at >= self.full_reload_seconds
        since = None if full or self._newest is None else self._newest - CLOCK_SLACK_SECONDS
        rows = await asyncio.to_thread(self.store.key_ids, created_after=since)
        self.refreshes += 1
        if full:
            self._ids = {key_id for key_id, _ in rows} | self._ids
            self._loaded_at = started
        else:
            self._ids.update(key_id for key_id, _ in rows)
        if rows:
            newest = max(created for _, created in rows)
            self._newest = newest if self._newest is None else max(self._newest, newest)
        elif self._newest is None:
            self._newest = 0.0
        self._refresh_started = started


__all__ = ["CLOCK_SLACK_SECONDS", "KeyDirectory"]
