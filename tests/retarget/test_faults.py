"""Faults: the retarget service as a real process (``python -m services.retarget``) on a throwaway
PostgreSQL database and a real audience server, SIGKILLed at random points during a launch and
during redemption retries, restarted each time, then finished. The ledger is checked afterwards:
no duplicates, no lost coupons, caps never exceeded, every audience member processed once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from flashcrowd.retarget.v1 import campaign_pb2, coupon_pb2, retarget_service_pb2, retarget_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.retarget import repository as repo
from services.retarget.db import Database
from services.runtime import error_details
from tests.fixtures.channels import backend_channel

from .conftest import Audience

api = retarget_service_pb2
Campaign = campaign_pb2.Campaign
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.postgres

#: Reconnect quickly after a kill (the default backoff starts at 1 s and grows to minutes).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """One retarget process at a time on a fixed port, killed and restarted at will."""

    def __init__(self, database_url: str, audience_target: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "FLASHCROWD_DATABASE_URL": database_url,
            "FLASHCROWD_AUDIENCE_TARGET": audience_target,
            "FLASHCROWD_PORT": str(self.port),
            "FLASHCROWD_LOG_JSON": "false",
            "FLASHCROWD_GRACE_SECONDS": "0.5",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.retarget"], cwd=ROOT, env=self.env, stdout=log, stderr=log
        )
        self.starts += 1
        deadline = time.monotonic() + 30
        async with backend_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"retarget exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                    )
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                assert time.monotonic() < deadline, "retarget did not start in 30 s"
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
async def ledger(pg_url: str) -> AsyncIterator[Database]:
    database = Database.open(pg_url, pool_min=1, pool_max=2)
    try:
        yield database
    finally:
        await database.aclose()


async def _invariants(ledger: Database) -> dict[str, int]:
    return await ledger.run(repo.ledger_invariants, write=False)


async def test_sigkill_during_launch_resumes_without_duplicates(
    pg_url: str, audience: Audience, ledger: Database, tmp_path: Path
) -> None:
    rng = random.Random(5)
    tenant = f"fault{rng.randrange(10**6)}"
    users = audience.users[:12_000]
    pack = await audience.upload(tenant, users)
    service = Service(
        pg_url,
        audience.target,
        tmp_path / "retarget.log",
        FLASHCROWD_LAUNCH_BATCH_SIZE="8",
        FLASHCROWD_LAUNCH_PAGE_SIZE="1500",
    )
    await service.start()
    try:
        channel = backend_channel(service.target, options=CHANNEL_OPTIONS)
        stub = retarget_service_pb2_grpc.RetargetServiceStub(channel)
        parent = f"tenants/{tenant}"
        ten = await stub.CreateCouponTemplate(
            api.CreateCouponTemplateRequest(
                parent=parent,
                coupon_template_id="ten",
                coupon_template=coupon_pb2.CouponTemplate(
                    fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=10), total_stock=4000
                ),
            )
        )
        pct = await stub.CreateCouponTemplate(
            api.CreateCouponTemplateRequest(
                parent=parent,
                coupon_template_id="pct",
                coupon_template=coupon_pb2.CouponTemplate(
                    percent_off=coupon_pb2.PercentOff(basis_points=1500, cap_fen=300),
                    budget_cap_fen=1_500_000,
                ),
            )
        )
        campaign = await stub.CreateCampaign(
            api.CreateCampaignRequest(
                parent=parent,
                campaign_id="after-sale",
                campaign=campaign_pb2.Campaign(
                    audience_pack=pack.name,
                    coupon_template=ten.name,
                    arms=[
                        campaign_pb2.Arm(arm_id="ten", weight=1),
                        campaign_pb2.Arm(arm_id="pct", weight=1, coupon_template=pct.name),
                    ],
                    holdout_basis_points=1000,
                ),
            )
        )
        await stub.LaunchCampaign(api.LaunchCampaignRequest(name=campaign.name))
        mid_launch_kills = 0
        last_processed = 0
        for _ in range(6):
            await asyncio.sleep(rng.uniform(0.15, 0.7))
            state = await stub.GetCampaign(api.GetCampaignRequest(name=campaign.name))
            if state.state != Campaign.STATE_RUNNING:
                break
            service.kill()
            mid_launch_kills += 1
            # what survived the kill is consistent, and progress never goes backwards
            counts = await _invariants(ledger)
            assert all(v == 0 for v in counts.values()), counts
            processed = await ledger.run(
                lambda tx: tx.scalar("SELECT processed FROM campaigns WHERE campaign_id = 'after-sale'"),
                write=False,
            )
            assert processed >= last_processed
            last_processed = processed
            await service.start()  # resumes the RUNNING launch by itself
        assert mid_launch_kills >= 3, f"the launch finished before enough kills ({mid_launch_kills})"
        deadline = time.monotonic() + 120
        while True:
            finished = await stub.GetCampaign(api.GetCampaignRequest(name=campaign.name))
            if finished.state == Campaign.STATE_COMPLETED:
                break
            assert finished.state == Campaign.STATE_RUNNING, finished
            assert time.monotonic() < deadline, finished.progress
            await asyncio.sleep(0.1)
        await channel.close()
    finally:
        service.stop()

    progress = finished.progress
    assert progress.audience_size == progress.processed == len(users)
    assert progress.issued + progress.held_out + progress.skipped == len(users)

    def facts(tx: Any) -> dict[str, Any]:
        return {
            "members": tx.scalar("SELECT COUNT(*) FROM campaign_members"),
            "distinct_members": tx.scalar("SELECT COUNT(DISTINCT user_id) FROM campaign_members"),
            "member_ids": [
                r["user_id"] for r in tx.all("SELECT user_id FROM campaign_members ORDER BY user_id")
            ],
            "coupons": tx.scalar("SELECT COUNT(*) FROM coupons WHERE source = 'LAUNCH'"),
            "coupon_users": tx.scalar("SELECT COUNT(DISTINCT user_id) FROM coupons WHERE source = 'LAUNCH'"),
            "outbox": tx.scalar("SELECT COUNT(*) FROM outbox"),
            "templates": {r["template_id"]: r for r in tx.all("SELECT * FROM coupon_templates")},
            "issued_members": tx.scalar("SELECT COUNT(*) FROM campaign_members WHERE coupon_id IS NOT NULL"),
        }

    stored = await ledger.run(facts, write=False)
    assert stored["members"] == stored["distinct_members"] == len(users)
    assert stored["member_ids"] == sorted(users)  # every member processed exactly once
    assert (
        stored["coupons"] == stored["coupon_users"] == stored["outbox"] == progress.issued
    )  # no duplicates, none lost
    assert stored["issued_members"] == progress.issued
    ten_row, pct_row = stored["templates"]["ten"], stored["templates"]["pct"]
    assert ten_row["issued_count"] <= 4000 and pct_row["issued_value_fen"] <= 1_500_000
    assert ten_row["issued_count"] == 4000  # the stock cap was reached and held
    counts = await _invariants(ledger)
    assert all(v == 0 for v in counts.values()), counts
    assert service.kills == mid_launch_kills and service.starts == mid_launch_kills + 1


async def test_sigkill_during_redemption_retries(
    pg_url: str, audience: Audience, ledger: Database, tmp_path: Path
) -> None:
    rng = random.Random(9)
    tenant = "redeemers"
    service = Service(pg_url, audience.target, tmp_path / "retarget.log")
    await service.start()
    channel = backend_channel(service.target, options=CHANNEL_OPTIONS)
    stub = retarget_service_pb2_grpc.RetargetServiceStub(channel)
    try:
        template = await stub.CreateCouponTemplate(
            api.CreateCouponTemplateRequest(
                parent=f"tenants/{tenant}",
                coupon_template_id="fan",
                coupon_template=coupon_pb2.CouponTemplate(
                    percent_off=coupon_pb2.PercentOff(basis_points=1500, cap_fen=2000), total_stock=400
                ),
            )
        )
        coupons = [
            await stub.ClaimCoupon(
                api.ClaimCouponRequest(
                    coupon_template=template.name, user_id=user, request_id=f"claim-{user}"
                )
            )
            for user in range(1, 401)
        ]
        first_answers: dict[str, list[api.RedeemCouponResponse]] = {}
        attempts = 0

        async def call_until_answered(request: Any, method: Any) -> Any:
            nonlocal attempts
            while True:
                attempts += 1
                try:
                    return await method(request, timeout=10, wait_for_ready=True)
                except grpc.aio.AioRpcError as error:
                    # the process died under the call: retry the very same request
                    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), (
                        error_details(error)
                    )
                    await asyncio.sleep(0.02)

        async def worker(share: list[coupon_pb2.Coupon]) -> None:
            for coupon in share:
                request = api.RedeemCouponRequest(
                    coupon=coupon.name,
                    user_id=coupon.user_id,
                    order_id=f"order-{coupon.user_id}",
                    order_amount_fen=5_000 + coupon.user_id,
                    item_ids=[1001],
                    idempotency_key=f"redeem-{coupon.user_id}",
                )
                answers = first_answers.setdefault(coupon.name, [])
                # every request is sent twice more after its answer: a client that lost the answer
                for _ in range(3):
                    answers.append(await call_until_answered(request, stub.RedeemCoupon))
                if coupon.user_id % 4 == 0:
                    refund = api.RefundRedemptionRequest(
                        coupon=coupon.name,
                        order_id=request.order_id,
                        idempotency_key=f"refund-{coupon.user_id}",
                    )
                    for _ in range(2):
                        released = await call_until_answered(refund, stub.RefundRedemption)
                        assert released.state == coupon_pb2.Coupon.STATE_ISSUED

        async def killer() -> None:
            for _ in range(5):
                await asyncio.sleep(rng.uniform(0.2, 0.6))
                service.kill()
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                await service.start()

        shares = [coupons[i::20] for i in range(20)]
        await asyncio.gather(killer(), *(worker(share) for share in shares))
        assert service.kills == 5
    finally:
        await channel.close()
        service.stop()

    assert attempts > 3 * len(coupons)  # some calls really were cut off and retried
    for name, answers in first_answers.items():
        fresh = [a for a in answers if not a.replayed]
        assert len(fresh) <= 1, name  # at most one answer was the redemption itself ...
        assert len({(a.discount_fen, a.payable_fen, a.coupon.order_id) for a in answers}) == 1, (
            name
        )  # ... all agree
        assert answers[0].discount_fen == min((5_000 + answers[0].coupon.user_id) * 1500 // 10_000, 2000)

    def facts(tx: Any) -> dict[str, Any]:
        return {
            "redemptions": tx.scalar("SELECT COUNT(*) FROM redemptions"),
            "distinct": tx.scalar("SELECT COUNT(DISTINCT coupon_id) FROM redemptions"),
            "refunded": tx.scalar("SELECT COUNT(*) FROM redemptions WHERE state = 'REFUNDED'"),
            "refunds": tx.scalar("SELECT COUNT(*) FROM refunds"),
            "redeemed": tx.scalar("SELECT COUNT(*) FROM coupons WHERE state = 'REDEEMED'"),
            "orders": tx.scalar("SELECT COUNT(*) FROM orders"),
        }

    stored = await ledger.run(facts, write=False)
    assert stored["redemptions"] == stored["distinct"] == len(coupons) == stored["orders"]
    assert stored["refunded"] == stored["refunds"] == 100 and stored["redeemed"] == 300
    counts = await _invariants(ledger)
    assert all(v == 0 for v in counts.values()), counts
