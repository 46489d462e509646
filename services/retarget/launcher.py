"""Launch runner: resolves a campaign's audience page by page and issues coupons in batches.

Crash safety rests on the ledger, not on this process:

* every batch is one transaction that inserts member rows, coupons and outbox rows, moves the
  template counters and compare-and-sets the persisted cursor ``(page_token, offset)``; a batch
  either happened entirely or not at all;
* the export is of the pack *version pinned at launch*, so re-reading a page from its token after
  a restart yields the same ids, and the first batch of every run also filters out members
  already processed (belt and braces: ``campaign_members`` has the primary key anyway);
* a lease (owner + expiry on the campaign row) keeps two processes from working the same launch
  at once; were it ever violated, the cursor compare-and-set turns the loser's batch into a no-op.

The server resumes every RUNNING campaign at start, so a SIGKILL mid-launch costs at most the
batch in flight, which rolled back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import numpy as np

from services.retarget import domain as d
from services.retarget import repository as repo
from services.retarget.audience import AudienceClient, AudienceError
from services.retarget.config import RetargetSettings
from services.retarget.db import Database, TransientError, UniqueConflict
from services.runtime import Aborted, ServiceError, Unavailable, attributes, current_telemetry

logger = logging.getLogger(__name__)

#: Consecutive failures (audience unreachable, database busy) before a launch is paused loudly.
MAX_ATTEMPTS = 8


class Launcher:
    """Runs at most one launch task per campaign in this process."""

    def __init__(
        self,
        database: Database,
        audience: AudienceClient,
        settings: RetargetSettings,
        *,
        clock: Callable[[], int] = d.now_us,
        on_delivered: Callable[[], None] = lambda: None,
    ) -> None:
        self.db = database
        self.audience = audience
        self.settings = settings
        self.clock = clock
        self.on_delivered = on_delivered
        self.owner = settings.instance_id or socket.gethostname()
        self.lease_us = int(settings.launch_lease_seconds * 1_000_000)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._again: set[int] = set()
        self._closing = False
        telemetry = current_telemetry()
        self._issued_counter = (
            telemetry.meter(__name__).create_counter(attributes.METRIC_COUPONS_ISSUED, unit="{coupon}")
            if telemetry
            else None
        )

    def ensure(self, campaign_pk: int) -> None:
        """Start the launch task of a RUNNING campaign unless one is running here; a task that is
        still winding down (a pause followed at once by a resume) looks at the campaign again
        when it ends."""
        if self._closing:
            return
        task = self._tasks.get(campaign_pk)
        if task is not None and not task.done():
            self._again.add(campaign_pk)
            return
        task = asyncio.create_task(self._run(campaign_pk), name=f"launch-{campaign_pk}")
        self._tasks[campaign_pk] = task

    async def resume_all(self) -> list[int]:
        pks = await self.db.run(repo.running_campaigns, write=False)
        for pk in pks:
            self.ensure(pk)
        if pks:
            logger.info("resuming launches", extra={"campaigns": pks})
        return pks

    async def wait(self, campaign_pk: int) -> None:
        task = self._tasks.get(campaign_pk)
        if task is not None:
            await asyncio.shield(task)

    async def close(self) -> None:
        self._closing = True
        tasks = [task for task in self._tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            # Hand the leases back so another instance can continue at once.
            def release(tx: Any) -> None:
                tx.execute(
                    "UPDATE campaigns SET launch_lease_until_us = 0 WHERE launch_owner = ? AND"
                    " state = 'RUNNING'",
                    (self.owner,),
                )

            try:
                await self.db.run(release)
            except Exception:  # shutting down: the lease expires by itself
                logger.warning("could not release launch leases", exc_info=True)

    # -- the task ----------------------------------------------------------------------------

    async def _run(self, campaign_pk: int) -> None:
        while True:
            self._again.discard(campaign_pk)
            await self._run_once(campaign_pk)
            if campaign_pk not in self._again or self._closing:
                return

    async def _run_once(self, campaign_pk: int) -> None:
        failures = 0
        while True:
            try:
                await self._launch(campaign_pk)
                return
            except asyncio.CancelledError:
                raise
            except (Unavailable, Aborted, AudienceError, TransientError, UniqueConflict) as error:
                # A run that issued something before failing starts the count afresh.
                failures = 1 if getattr(error, "progressed", False) else failures + 1
                if failures >= MAX_ATTEMPTS:
                    await self._fail(campaign_pk, f"gave up after {failures} attempts: {error}")
                    return
                delay = min(30.0, 0.25 * 2**failures)
                logger.warning(
                    "launch interrupted; retrying",
                    extra={"campaign_pk": campaign_pk, "error": str(error), "retry_in_seconds": delay},
                )
                await asyncio.sleep(delay)
            except ServiceError as error:  # pack gone, version expired, not ready
                await self._fail(campaign_pk, f"{error.reason}: {error.message}")
                return
            except Exception as error:
                logger.exception("launch failed", extra={"campaign_pk": campaign_pk})
                await self._fail(campaign_pk, f"internal error: {type(error).__name__}")
                return

    async def _fail(self, campaign_pk: int, reason: str) -> None:
        logger.error("launch paused", extra={"campaign_pk": campaign_pk, "reason": reason})
        try:
            await self.db.run(repo.fail_launch, campaign_pk, self.owner, reason, self.clock())
        except Exception:
            logger.exception("could not record the launch failure", extra={"campaign_pk": campaign_pk})

    async def _lease(self, campaign_pk: int) -> dict[str, Any] | None:
        return await self.db.run(repo.acquire_lease, campaign_pk, self.owner, self.clock(), self.lease_us)

    async def _launch(self, campaign_pk: int) -> bool:
        campaign = await self._lease(campaign_pk)
        while campaign is None:
            # Not RUNNING any more, or another process holds the lease: if that process died,
            # its lease expires and this one takes over.
            current = await self.db.run(repo.campaign_by_pk, campaign_pk, write=False)
            if current is None or current["state"] != d.RUNNING:
                return False
            wait = (current["launch_lease_until_us"] - self.clock()) / 1e6
            await asyncio.sleep(min(max(wait, 0.05), self.settings.launch_lease_seconds))
            campaign = await self._lease(campaign_pk)
        # Issuing starts at start_time: wait for it, renewing the lease meanwhile.
        while campaign["start_us"] is not None and self.clock() < campaign["start_us"]:
            wait = min((campaign["start_us"] - self.clock()) / 1e6, self.settings.launch_lease_seconds / 3)
            await asyncio.sleep(max(wait, 0.01))
            campaign = await self._lease(campaign_pk)
            if campaign is None:
                return False
        if campaign["end_us"] is not None and self.clock() >= campaign["end_us"]:
            await self.db.run(repo.stop_launch, campaign_pk, self.owner, "END_TIME", self.clock())
            return False
        arms = json.loads(campaign["arms"])
        weights = [arm["weight"] for arm in arms]
        seed, holdout_bp = campaign["hash_seed"], campaign["holdout_bp"]
        tenant, pack, version = campaign["tenant"], campaign["audience_pack"], campaign["pack_version"]
        # Pacing is re-read from every batch's result: UpdateCampaign (a BOOST rule) may change
        # the delivery rate or the end time of a running launch.
        rate: int = campaign["delivery_rate"]
        end_us: int | None = campaign["end_us"]

        def size_for(rate: int) -> int:
            limit = self.settings.launch_batch_size
            return limit if not rate else max(1, min(limit, rate))

        batch_size = size_for(rate)
        cursor: tuple[str, int] = (campaign["launch_page_token"], campaign["launch_page_offset"])
        check_existing = True
        loop = asyncio.get_running_loop()
        #: Earliest loop time of the next batch: each issued coupon books 1/rate s at its rate.
        next_at = loop.time()
        progressed = False

        async def batch(
            users: np.ndarray, arm_idx: np.ndarray, hold: np.ndarray, nxt: tuple[str, int], last: bool
        ) -> bool:
            nonlocal cursor, check_existing, progressed, rate, end_us, batch_size, next_at
            args = dict(
                campaign_pk=campaign_pk,
                owner=self.owner,
                cursor=cursor,
                next_cursor=nxt,
                exhausted=last,
                user_ids=users.tolist(),
                arm_indexes=arm_idx.tolist(),
                holdout=hold.tolist(),
                now=self.clock(),
                lease_us=self.lease_us,
            )
            try:
                result = await self.db.run(
                    repo.issue_batch, check_existing=check_existing, conflict_retries=0, **args
                )
            except UniqueConflict:
                # Overlap with rows written before a crash that the cursor did not cover: redo the
                # batch filtering out members already processed.
                result = await self.db.run(repo.issue_batch, check_existing=True, conflict_retries=0, **args)
            if result.status != "ok":
                logger.info(
                    "launch stops",
                    extra={"campaign_pk": campaign_pk, "status": result.status, "state": result.state},
                )
                return False
            check_existing = False
            cursor = nxt
            progressed = True
            if result.issued:
                self.on_delivered()
                if self._issued_counter is not None:
                    self._issued_counter.add(
                        result.issued,
                        {attributes.CAMPAIGN_NAME: d.campaign_name(tenant, campaign["campaign_id"])},
                    )
            if result.completed:
                logger.info(
                    "launch completed",
                    extra={"campaign_pk": campaign_pk, "stop_reason": result.stop_reason},
                )
                return True  # the caller reads the stream to its end
            if result.delivery_rate != rate:
                logger.info(
                    "delivery rate changed",
                    extra={"campaign_pk": campaign_pk, "from": rate, "to": result.delivery_rate},
                )
            rate, end_us = result.delivery_rate, result.end_us
            batch_size = size_for(rate)
            if rate:  # pace deliveries: this batch's coupons at the rate in force for it
                next_at = max(next_at, loop.time() - 1.0) + result.issued / rate
                if next_at > loop.time():
                    await asyncio.sleep(next_at - loop.time())
            else:
                next_at = loop.time()
            if end_us is not None and self.clock() >= end_us:
                await self.db.run(repo.stop_launch, campaign_pk, self.owner, "END_TIME", self.clock())
                return False
            return True

        pages = self.audience.export(
            tenant, pack, version, page_token=cursor[0], page_size=self.settings.launch_page_size
        )
        finished = False
        try:
            async with aclosing(pages):
                async for page in pages:
                    if finished:
                        continue  # read the stream to its end
                    ids = np.asarray(page.user_ids, dtype=np.uint64)
                    offset = cursor[1] if page.token == cursor[0] else 0
                    arm_idx, hold = d.assign_arms(ids, seed, holdout_bp, weights)
                    last_page = not page.next_token
                    start = offset
                    while True:
                        end = min(start + batch_size, len(ids))
                        page_done = end >= len(ids)
                        nxt = (page.next_token, 0) if page_done and not last_page else (page.token, end)
                        last = page_done and last_page
                        if not await batch(ids[start:end], arm_idx[start:end], hold[start:end], nxt, last):
                            return progressed  # paused, cancelled or taken over
                        if page_done:
                            break
                        start = end
                    finished = last_page
            if not finished:
                # The stream ended without a last page (an empty pack): finish with an empty batch.
                empty = np.asarray([], dtype=np.uint64)
                await batch(empty, empty.astype(np.int64), empty.astype(bool), cursor, True)
            return progressed
        except (Unavailable, Aborted, AudienceError, TransientError, UniqueConflict) as error:
            error.progressed = progressed  # type: ignore[union-attr]
            raise
