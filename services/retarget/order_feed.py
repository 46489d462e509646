"""The order feed: paid orders, refunds and funnel events from the event stream into attribution.

Every retarget replica runs one. Each reads the stream (JetStream, or the in-process bus) from the
shared checkpoint in the ledger and applies a fetched group of messages in **one transaction** that
locks the checkpoint row, skips what another replica already applied (``seq <= checkpoint``),
attributes the group's ``pay`` events, undoes its ``refund`` events, counts the funnel stages of
its ``product_view`` / ``click`` / ``add_cart`` / ``order`` events (services/retarget/attribution.py),
and moves the checkpoint. The checkpoint commits with its
effects, so a crash anywhere repeats nothing and loses nothing, and any number of replicas may run:
they take turns on the checkpoint row and the loser of a race finds its messages applied.

Events are the platform's (``owner`` ``_platform``: visible to every tenant's campaigns) or a
tenant's own conversion events (only that tenant's campaigns). Order ids are the events' ``order_id``
(platform-wide ids). A message whose transaction keeps failing is retried with backoff and holds the
feed (logged): attribution never skips an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import polars as pl

from services.events.bus import BusUnavailable, EventBus, Subscription
from services.events.codec import decode_batch
from services.events.schema import EventType
from services.retarget import attribution
from services.retarget.attribution import OrderFact
from services.retarget.db import Database, TransientError, Tx
from services.retarget.repository import ORDER_FEED

logger = logging.getLogger(__name__)

_KINDS = (int(EventType.PAY), int(EventType.REFUND))


def apply_messages(tx: Tx, messages: Sequence[tuple[int, pl.DataFrame]], now: int) -> int:
    """Apply decoded messages ``(stream seq, frame)`` past the checkpoint; returns the new checkpoint."""
    done, _ = attribution.checkpoint(tx, ORDER_FEED, lock=True)
    newest_seq, newest_us = done, 0
    for seq, frame in messages:
        if seq <= done:
            continue
        newest_seq = max(newest_seq, seq)
        if frame.height:
            newest_us = max(newest_us, int(frame.select(pl.col("ts").dt.epoch("us").max()).item() or 0))
        stages = frame.filter(pl.col("event_type").is_in(list(attribution.FUNNEL_STAGES)))
        if stages.height:
            rows = stages.select(
                "owner", "event_type", "user_id", "item_id", pl.col("ts").dt.epoch("us")
            ).unique(subset=["owner", "event_type", "user_id", "item_id"], keep="first", maintain_order=True)
            attribution.record_funnel(tx, rows.rows(), now)
        money = frame.filter(pl.col("event_type").is_in(_KINDS) & pl.col("order_id").is_not_null())
        if not money.height:
            continue
        orders = money.select(
            "owner",
            "event_type",
            "user_id",
            "order_id",
            pl.col("amount_fen").fill_null(0),
            pl.col("ts").dt.epoch("us").alias("ts_us"),
            pl.col("item_id"),
        ).iter_rows()
        for owner, kind, user, order_id, amount, ts_us, item in orders:
            order = OrderFact(str(order_id), int(user), int(amount), int(ts_us), (int(item),) if item else ())
            if kind == EventType.PAY:
                attribution.record_orders(tx, owner, [order], now)
            else:
                attribution.record_refund(tx, owner, order, int(ts_us), now)
    if newest_seq > done:
        attribution.advance(tx, ORDER_FEED, newest_seq, newest_us, now)
    return newest_seq


class OrderFeed:
    """Follows the stream and applies it to the ledger (see the module doc)."""

    def __init__(
        self,
        bus: EventBus,
        database: Database,
        clock: Callable[[], int],
        *,
        name: str,
        batch: int = 200,
        fetch_timeout: float = 0.5,
    ) -> None:
        self.bus = bus
        self.db = database
        self.clock = clock
        self.name = name
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        #: The checkpoint this replica last committed or saw (tests and health read it).
        self.seq = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="order-feed")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self.bus.close()

    async def _subscribe(self) -> Subscription:
        await self.bus.start()
        self.seq, _ = await self.db.run(attribution.checkpoint, ORDER_FEED, write=False)
        return await self.bus.subscribe(self.name, start_seq=self.seq + 1)

    async def run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                await self._follow()
                backoff = 0.5
                continue
            except (BusUnavailable, TransientError, ConnectionError, OSError) as error:
                logger.warning("order feed: %s; retrying in %.1fs", error, backoff)
            except Exception:  # a bad message must not end attribution for good: log, back off
                logger.exception("order feed failed; retrying in %.1fs", backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, 10.0)

    async def _follow(self) -> None:
        """Apply the stream from the checkpoint until stopped, or until another replica is far ahead."""
        subscription = await self._subscribe()
        try:
            while not self._stopping.is_set():
                deliveries = await subscription.fetch(self.batch, self.fetch_timeout)
                if not deliveries:
                    continue
                messages = [(d.seq, decode_batch(d.payload)) for d in deliveries]
                self.seq = await self.db.run(apply_messages, messages, self.clock())
                if self.seq > deliveries[-1].seq + 10 * self.batch:
                    return  # resubscribe at the shared checkpoint instead of reading what is done
        finally:
            with contextlib.suppress(Exception):
                await subscription.close()


__all__ = ["OrderFeed", "apply_messages"]
