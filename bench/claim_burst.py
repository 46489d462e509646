"""Claim burst: 20,000 concurrent claims for 500 coupons through gRPC on PostgreSQL.

    .venv/bin/python bench/claim_burst.py [--claims 20000] [--stock 500] [--repeat-share 0.2]
        [--channels 16] [--in-flight 800] [--hot-claims 5000] [--database-url postgresql://...]

A real ``python -m services.retarget`` process on a throwaway PostgreSQL database (dropped at the
end unless ``--database-url`` is given). The client fires every claim at once from one asyncio
process over ``--channels`` separate connections; ``--in-flight`` caps the RPCs outstanding
because gRPC core cancels requests that queue beyond its pending-request limits (1,000 soft /
3,000 hard per server). ``--repeat-share`` of the claims come from users who already tried
(other request ids): the per-user limit must refuse them.

Figures: claims/s over the burst, time until the last coupon went, p50/p99 latency (all claims,
and the successful ones), outcome counts, the server's CPU, then the invariants read back from
the database: issued == stock, zero users over the limit, counters == coupon rows.

Phase 2 (``--hot-claims``, 0 to skip): as many claims as coupons on one template, so every claim
succeeds and all of them serialise on the one hot counter row: successful claims/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import grpc.aio
from flashcrowd.retarget.v1 import coupon_pb2, retarget_service_pb2, retarget_service_pb2_grpc
from retarget_proc import RetargetProcess, create_pg_database, drop_pg_database

from services.retarget import repository as repo
from services.retarget.db import Database

api = retarget_service_pb2


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def burst(
    target: str, template: str, claims: list[tuple[int, str]], channels: int, in_flight: int
) -> dict[str, Any]:
    options = [("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
    chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    for chan in chans:
        await chan.channel_ready()
    stubs = [retarget_service_pb2_grpc.RetargetServiceStub(chan) for chan in chans]
    window = asyncio.Semaphore(in_flight)
    latencies: list[tuple[str, float, float]] = []
    start = time.perf_counter()

    async def one(i: int, user: int, request_id: str) -> None:
        async with window:
            sent = time.perf_counter()
            request = api.ClaimCouponRequest(coupon_template=template, user_id=user, request_id=request_id)
            try:
                await stubs[i % channels].ClaimCoupon(request, timeout=120)
                kind = "ok"
            except grpc.aio.AioRpcError as error:
                kind = error.code().name
                if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    from services.runtime import error_details

                    kind = error_details(error).reason or kind
            done = time.perf_counter()
            latencies.append((kind, done - sent, done - start))

    await asyncio.gather(*(one(i, user, rid) for i, (user, rid) in enumerate(claims)))
    elapsed = time.perf_counter() - start
    for chan in chans:
        await chan.close()
    ok = [lat for kind, lat, _ in latencies if kind == "ok"]
    last_ok = max((at for kind, _, at in latencies if kind == "ok"), default=float("nan"))
    return {
        "elapsed": elapsed,
        "kinds": Counter(kind for kind, _, _ in latencies),
        "all": [lat for _, lat, _ in latencies],
        "ok": ok,
        "last_ok": last_ok,
    }


def report_latency(label: str, values: list[float]) -> None:
    p50, p99 = percentile(values, 0.50) * 1e3, percentile(values, 0.99) * 1e3
    worst, count = max(values) * 1e3, len(values)
    print(f"  {label:<22} p50 {p50:8.1f} ms   p99 {p99:8.1f} ms   max {worst:8.1f} ms   (n={count})")


async def create_template(target: str, tenant: str, template_id: str, stock: int) -> str:
    async with grpc.aio.insecure_channel(target) as chan:
        stub = retarget_service_pb2_grpc.RetargetServiceStub(chan)
        created = await stub.CreateCouponTemplate(
            api.CreateCouponTemplateRequest(
                parent=f"tenants/{tenant}",
                coupon_template_id=template_id,
                coupon_template=coupon_pb2.CouponTemplate(
                    display_name="500 pieces, hands slow, none left",
                    fixed_amount=coupon_pb2.FixedAmountOff(amount_fen=1000),
                    total_stock=stock,
                    budget_cap_fen=stock * 1000,
                    per_user_limit=1,
                ),
            )
        )
        return created.name


def invariants(url: str) -> dict[str, Any]:
    database = Database.open(url, pool_min=1, pool_max=1)
    try:

        def read(tx):
            return {
                "checks": repo.ledger_invariants(tx),
                "templates": tx.all(
                    "SELECT template_id, total_stock, issued_count, issued_value_fen, budget_cap_fen,"
                    " (SELECT COUNT(*) FROM coupons c WHERE c.template_pk = t.id) AS rows,"
                    " (SELECT COUNT(*) FROM (SELECT user_id FROM coupons c WHERE c.template_pk = t.id"
                    "  GROUP BY user_id HAVING COUNT(*) > 1) x) AS users_with_two"
                    " FROM coupon_templates t ORDER BY id"
                ),
            }

        return database.call(read, write=False)
    finally:
        database.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--claims", type=int, default=20_000)
    parser.add_argument("--stock", type=int, default=500)
    parser.add_argument("--repeat-share", type=float, default=0.2)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=800)
    parser.add_argument("--pool-size", type=int, default=16)
    parser.add_argument("--hot-claims", type=int, default=5000)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    url = args.database_url or create_pg_database()
    rng = random.Random(args.seed)
    try:
        with RetargetProcess(url, pool_max_size=args.pool_size) as server:
            template = await create_template(server.target, "bench", "grab", args.stock)
            distinct = int(args.claims * (1 - args.repeat_share))
            users = list(range(1_000_000, 1_000_000 + distinct))
            claims = [(u, f"c-{u}") for u in users]
            claims += [(rng.choice(users), f"again-{i}") for i in range(args.claims - distinct)]
            rng.shuffle(claims)
            cpu0, client0 = server.cpu_seconds(), time.process_time()
            result = await burst(server.target, template, claims, args.channels, args.in_flight)
            cpu, client_cpu = server.cpu_seconds() - cpu0, time.process_time() - client0
            print(f"claim burst: {args.claims} claims for {args.stock} coupons, {len(users)} distinct users,"
                  f" {args.channels} connections, {args.in_flight} in flight, pool"
                  f" {args.pool_size}")  # fmt: skip
            print(
                f"  claims/s               {args.claims / result['elapsed']:10.0f}  "
                f" ({result['elapsed']:.2f} s)"
            )
            print(f"  sold out after         {result['last_ok']:10.3f} s")
            print(f"  server CPU             {cpu:10.2f} s   ({cpu / result['elapsed']:.2f} cores)")
            share = client_cpu / result["elapsed"]
            print(f"  client CPU             {client_cpu:10.2f} s   ({share:.2f} cores, same machine;"
                  f" {os.cpu_count()} vCPUs, load average {os.getloadavg()[0]:.1f})")  # fmt: skip
            report_latency("latency, all claims", result["all"])
            report_latency("latency, successful", result["ok"])
            print(f"  outcomes               {dict(result['kinds'])}")
            hot = None
            if args.hot_claims:
                hot_template = await create_template(server.target, "bench", "hot", args.hot_claims)
                hot_claims = [(2_000_000 + i, f"h-{i}") for i in range(args.hot_claims)]
                hot = await burst(server.target, hot_template, hot_claims, args.channels, args.in_flight)
        checks = invariants(url)
        print("invariants (read back from PostgreSQL):")
        for row in checks["templates"]:
            print(
                f"  {row['template_id']:<5} stock {row['total_stock']:>6}  issued {row['issued_count']:>6}"
                f"  coupon rows {row['rows']:>6}  users with 2+ coupons {row['users_with_two']}"
                f"  issued value {row['issued_value_fen']} / cap {row['budget_cap_fen']} fen"
            )
        bad = {k: v for k, v in checks["checks"].items() if v}
        print(f"  ledger checks          {bad or 'all zero'}")
        grab = checks["templates"][0]
        assert grab["issued_count"] == grab["rows"] == args.stock and grab["users_with_two"] == 0, grab
        assert result["kinds"]["ok"] == args.stock
        if hot is not None:
            print(f"hot row: {args.hot_claims} claims for {args.hot_claims} coupons (every claim succeeds)")
            print(
                f"  successful claims/s    {args.hot_claims / hot['elapsed']:10.0f}  "
                f" ({hot['elapsed']:.2f} s)"
            )
            report_latency("latency", hot["all"])
            print(f"  outcomes               {dict(hot['kinds'])}")
    finally:
        if not args.database_url:
            drop_pg_database(url)


if __name__ == "__main__":
    asyncio.run(main())
