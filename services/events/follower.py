"""Follow the event stream from a checkpoint: the shared loop of live packs and the sale monitor.

A follower replays the stream from ``first_start_time()`` (or just after ``seq`` when it has a
checkpoint), then tails it, handing each decoded batch to ``apply(frame, seq)``. While the bus is
down it retries with capped exponential backoff; ``ready`` is set once it has caught up. Its clock
follows event time (the newest ``ts`` seen, advanced by wall time since), so that a replay faster
than real time slides windows with it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import polars as pl

from services.events.bus import BusUnavailable, EventBus, Subscription
from services.events.codec import decode_batch

logger = logging.getLogger(__name__)


class StreamFollower(abc.ABC):
    """Base of stream consumers kept in memory; subclasses implement ``apply``."""

    #: Durable consumer name on the bus.
    consumer: str = "follower"

    def __init__(self, bus: EventBus, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.clock = clock
        self.seq = 0
        self.ready = asyncio.Event()
        self._watermark_us: int | None = None
        self._watermark_at = 0.0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    # ---- event-time clock ------------------------------------------------------------------------

    def now_us(self) -> int:
        if self._watermark_us is None:
            return int(datetime.now(UTC).timestamp() * 1_000_000)
        return self._watermark_us + int((self.clock() - self._watermark_at) * 1_000_000)

    def observe(self, newest_us: int) -> None:
        """Move the event-time clock forward to the newest event time seen."""
        if self._watermark_us is None or newest_us > self._watermark_us:
            self._watermark_us, self._watermark_at = newest_us, self.clock()

    # ---- what subclasses provide -----------------------------------------------------------------

    @abc.abstractmethod
    def first_start_time(self) -> datetime:
        """Where to start replaying when there is no checkpoint yet."""

    @abc.abstractmethod
    def apply(self, frame: pl.DataFrame, seq: int) -> None:
        """Fold one decoded batch (stream sequence ``seq``) into the state."""

    # ---- hooks with defaults (live packs hand batches to a thread instead) ---------------------------

    def resume_seq(self) -> int:
        """The stream sequence everything up to which is handled: a resubscription starts after it."""
        return self.seq

    async def deliver(self, payload: bytes, seq: int) -> None:
        """Handle one bus message (stream sequence ``seq``)."""
        self.apply(decode_batch(payload), seq)

    async def caught_up(self) -> None:
        """Called once, when the first empty fetch shows the stream is caught up (before ``ready``)."""
        return None

    # ---- the loop ----------------------------------------------------------------------------------

    async def _subscribe(self) -> Subscription:
        resume = self.resume_seq()
        if resume:
            return await self.bus.subscribe(self.consumer, start_seq=resume + 1)
        return await self.bus.subscribe(self.consumer, start_time=self.first_start_time())

    async def run(self) -> None:
        sub: Subscription | None = None
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if sub is None:
                    sub = await self._subscribe()
                batch = await sub.fetch(256, 0.5 if self.ready.is_set() else 0.2)
                if not batch and not self.ready.is_set():
                    await self.caught_up()
                    self.ready.set()  # caught up with the stream
                for d in batch:
                    await self.deliver(d.payload, d.seq)
                backoff = 0.5
            except BusUnavailable as error:
                logger.warning("%s: bus unavailable (%s); retrying", self.consumer, error)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.close()
                sub = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, 10.0)
        if sub is not None:
            await sub.close()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name=self.consumer)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)
