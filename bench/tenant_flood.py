"""Tenant flood: one tenant's live packs under a steady event stream vs another tenant's CheckMembership.

    .venv/bin/python bench/tenant_flood.py [--nats nats://127.0.0.1:4222] [--live-packs 300] [--rate 20]
        [--batch-events 1000] [--seconds 10] [--rounds 3] [--calls-per-second 200] [--members 1000000]
        [--ids 1000] [--packs 3]

One ``python -m services.audience`` process follows the event bus: **NATS JetStream** (the machine's
server, a private stream per run, deleted at the end), so the flood is published by a separate
process straight into the stream, as EventService replicas would, and the audience process only
follows it (the in-process ``memory://`` bus would put the ingest itself into the measured process).

* tenant A (a tenant principal; ``FLASHCROWD_TENANT_MAX_LIVE_PACKS`` raised for the run) creates
  ``--live-packs`` live packs over gRPC, each "clicked item k in the last 15 min and not paid", so
  every pack has two leaves of its own (no two packs share work);
* tenant B's ad serving (a platform principal acting for B) calls CheckMembership at a steady
  ``--calls-per-second`` (open loop, as ad requests arrive: a call's latency counts from when it was
  due, so a stalled server cannot hide behind the client waiting for it): ``--ids`` ids against
  ``--packs`` packs of ``--members`` members each;
* idle: B's calls for ``--seconds`` with A's packs defined and no events; flood: the same while a
  publisher process sends ``--rate`` requests/s of ``--batch-events`` events each (clicks, views,
  carts and pays of 5M users on A's 300 items; one request is split over the 4 shards). The two
  alternate for ``--rounds`` rounds, so that load from elsewhere on a shared machine hits both alike.

Figures: B's CheckMembership p50 / p99 idle and under the flood per round and over all rounds, and
their ratio (goal: p99 within 2x of idle); how far A's packs got (their stream sequence against the
stream's last, and how long after each flood they caught up, so a flood that was only queued would
show), and the audience process's CPU. No assertion: the script prints figures.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "gen"))
sys.path.insert(0, str(ROOT / "bench"))

from audience_proc import AudienceProcess  # noqa: E402
from pyroaring import BitMap  # noqa: E402

from services.audience.packstore import PackStore  # noqa: E402
from services.storage import LocalObjectStore  # noqa: E402

TENANT_A, TENANT_B = "flooder", "serving"
ITEM0 = 100_000
METHOD = "/flashcrowd.audience.v1.AudienceService/CheckMembership"
CLICK, VIEW, CART, PAY = 5, 4, 6, 8  # EventType codes (services.events.schema.EventType)
SHARDS = 4


# --- the flood (a separate process) -----------------------------------------------------------------


def _requests(count: int, events: int, items: int, first_id: int) -> list[list]:
    """``count`` requests of ``events`` events as the bus messages ingest would publish (per shard)."""
    import polars as pl

    from services.events.codec import shard_table, split_batches
    from services.events.schema import EVENTS_SCHEMA, OWNER, PLATFORM_OWNER
    from services.events.sharding import buckets_np

    rng = np.random.default_rng(3)
    table = shard_table(SHARDS)
    now_us = int(datetime.now(UTC).timestamp() * 1_000_000)
    out = []
    for r in range(count):
        users = rng.integers(1, 5_000_000, events).astype(np.uint32)
        kinds = rng.choice(np.array([CLICK, VIEW, CART, PAY], dtype=np.uint8), events, p=[0.4, 0.4, 0.1, 0.1])
        frame = pl.DataFrame(
            {
                "event_id": np.arange(first_id + r * events, first_id + (r + 1) * events, dtype=np.uint64),
                "user_id": users,
                "bucket": buckets_np(users).astype(np.uint8),
                "ts": np.full(events, now_us, dtype=np.int64),
                "event_type": kinds,
                "item_id": (ITEM0 + rng.integers(0, items, events)).astype(np.uint32),
                "category_id": np.full(events, 7, dtype=np.uint32),
                "campaign_id": np.full(events, 900_002, dtype=np.uint32),
                "video_id": np.zeros(events, dtype=np.uint32),
                "order_id": np.where(kinds == PAY, rng.integers(1, 1 << 40, events), 0).astype(np.uint64),
                "amount_fen": np.where(kinds == PAY, 2990, 0).astype(np.int64),
            }
        ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
        frame = frame.with_columns(
            *[
                pl.when(pl.col(c) == 0).then(None).otherwise(pl.col(c)).alias(c)
                for c in ("video_id", "order_id")
            ],
            pl.lit(PLATFORM_OWNER).alias(OWNER),  # the platform's behaviour stream
        ).cast(EVENTS_SCHEMA)
        out.append(split_batches(frame, table))
    return out


def _publisher(url: str, stream: str, prefix: str, args: dict, commands, out) -> None:
    """For each ``"flood"`` command, publish ``rate`` requests/s for ``seconds``; report each flood's
    ``(requests, events, last stream sequence)``. ``"ready"`` is reported once the stream exists."""
    from services.events.bus import JetStreamBus

    per_flood = int(args["rate"] * args["seconds"]) + 1
    requests = _requests(per_flood * args["rounds"], args["batch_events"], args["items"], 1 << 40)

    async def flood(bus: JetStreamBus, first: int) -> tuple[int, int, int]:
        sent = events = last = 0
        interval = 1.0 / args["rate"]
        start = time.perf_counter()
        stop = start + args["seconds"]
        while time.perf_counter() < stop and sent < per_flood:
            batches = requests[first + sent]
            results = await bus.publish(batches, timeout=10)
            last = max([last, *(r.seq for r in results)])
            events += sum(b.count for b in batches)
            sent += 1
            delay = start + sent * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        return sent, events, last

    async def run() -> None:
        bus = JetStreamBus(url, shard_count=SHARDS, stream=stream, subject_prefix=prefix)
        await bus.start()
        out.put("ready")
        first = 0
        while await asyncio.to_thread(commands.get) == "flood":
            out.put(await flood(bus, first))
            first += per_flood
        await bus.close()

    asyncio.run(run())


# --- tenant B's calls ------------------------------------------------------------------------------


async def _calls(target: str, requests: list[bytes], seconds: float, rate: float) -> tuple[np.ndarray, int]:
    """Latencies of CheckMembership calls sent at ``rate`` per second for ``seconds`` (open loop),
    and how many failed (a failed call's latency is the time until it failed).

    Each call's latency runs from the moment it was due, not from when it was sent: a server that
    stalls for a second makes every call due in that second late (a closed loop of one call at a
    time would count such a stall once and hide it from the percentiles).
    """
    import grpc

    from services.runtime.assertion import platform_channel
    from services.runtime.scopes import MEMBERS_READ

    async with platform_channel(target, "ad-serving", scopes={MEMBERS_READ}) as channel:
        call = channel.unary_unary(METHOD)
        for request in requests[:50]:  # warm-up
            await call(request)
        count = int(seconds * rate)
        latencies = np.zeros(count)
        failed = 0
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            nonlocal failed
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await call(requests[i % len(requests)], timeout=120)
            except grpc.aio.AioRpcError:
                failed += 1
            latencies[i] = time.perf_counter() - due

        await asyncio.gather(*(one(i) for i in range(count)))
        return latencies, failed


async def _create_live_packs(target: str, count: int, items: int) -> None:
    from flashcrowd.audience.v1 import events_pb2, live_pack_pb2, live_pack_pb2_grpc, spec_pb2
    from google.protobuf import duration_pb2

    from services.runtime.assertion import Caller, asserting_channel
    from services.runtime.scopes import TENANT_SCOPES

    window = spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=15 * 60))

    def behavior(event_type: events_pb2.EventType, **flt) -> spec_pb2.PackSpec:
        return spec_pb2.PackSpec(
            behavior=spec_pb2.BehaviorCondition(
                event_types=[event_type], window=window, filter=spec_pb2.EventFilter(**flt)
            )
        )

    caller = Caller.for_tenant(TENANT_A, "bench", TENANT_SCOPES)
    async with asserting_channel(target, caller) as channel:
        stub = live_pack_pb2_grpc.LivePackServiceStub(channel)
        for k in range(count):
            spec = spec_pb2.PackSpec(
                exclude=spec_pb2.ExcludeOperands(
                    base=behavior(events_pb2.EVENT_TYPE_CLICK, item_ids=[ITEM0 + k % items]),
                    subtract=[behavior(events_pb2.EVENT_TYPE_PAY, item_ids=[ITEM0 + k % items])],
                )
            )
            await stub.CreateLivePack(
                live_pack_pb2.CreateLivePackRequest(
                    parent=f"tenants/{TENANT_A}",
                    live_pack_id=f"item-{k}",
                    live_pack=live_pack_pb2.LivePack(spec=spec),
                )
            )


async def _live_sequence(target: str, pack: str) -> tuple[int, int]:
    from flashcrowd.audience.v1 import live_pack_pb2, live_pack_pb2_grpc

    from services.runtime.assertion import platform_channel

    async with platform_channel(target, "bench") as channel:
        stub = live_pack_pb2_grpc.LivePackServiceStub(channel)
        got = await stub.GetLivePack(live_pack_pb2.GetLivePackRequest(name=pack))
        return got.stream_sequence, got.size


def _progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _percentiles(times: np.ndarray) -> tuple[float, float, float]:
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    return float(p50), float(p99), float(times.max() * 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--live-packs", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0, help="flood requests per second")
    parser.add_argument("--batch-events", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each idle and flood phase")
    parser.add_argument("--rounds", type=int, default=3, help="idle/flood phases, interleaved")
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--universe", type=int, default=10_000_000)
    parser.add_argument("--packs", type=int, default=3)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--calls-per-second", type=float, default=200.0, help="tenant B's call rate")
    args = parser.parse_args()

    from flashcrowd.audience.v1 import audience_service_pb2 as api
    from flashcrowd.audience.v1 import pack_pb2

    rng = np.random.default_rng(1)
    root = Path(tempfile.mkdtemp(prefix="flashcrowd-bench-flood-"))
    token = uuid.uuid4().hex[:10]
    stream, prefix = f"BENCH_FLOOD_{token.upper()}", f"benchflood.{token}"
    try:
        packs = PackStore(LocalObjectStore(root))
        names = []
        for i in range(args.packs):
            members = BitMap(rng.choice(args.universe, args.members, replace=False).astype(np.uint32))
            packs.publish_version(
                TENANT_B, f"pack-{i}", members, pack_pb2.Pack(source=pack_pb2.Pack.SOURCE_UPLOAD)
            )
            names.append(f"tenants/{TENANT_B}/packs/pack-{i}")
        requests = [
            api.CheckMembershipRequest(
                parent=f"tenants/{TENANT_B}",
                packs=names,
                user_ids=rng.integers(0, args.universe, args.ids).tolist(),
            ).SerializeToString()
            for _ in range(200)
        ]
        ctx = mp.get_context("spawn")
        commands, out = ctx.Queue(), ctx.Queue()
        settings = {
            "bus_url": f"{args.nats}?stream={stream}&subjects={prefix}",
            "tenant_max_live_packs": str(max(args.live_packs, 1)),
        }
        flood_args = {
            "rate": args.rate,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "batch_events": args.batch_events,
            "items": max(args.live_packs, 1),
        }
        pack = f"tenants/{TENANT_A}/livePacks/item-0"
        idle: list[np.ndarray] = []
        flood: list[np.ndarray] = []
        failed = [0, 0]
        floods: list[tuple[int, int, int]] = []
        cpu = 0.0
        _progress("starting the audience process and the publisher")
        with AudienceProcess(root.as_uri(), **settings) as server:
            publisher = ctx.Process(
                target=_publisher, args=(args.nats, stream, prefix, flood_args, commands, out)
            )
            publisher.start()
            assert out.get(timeout=300) == "ready"  # the stream exists, the flood's requests are encoded
            _progress(f"creating {args.live_packs} live packs of tenant A")
            t0 = time.perf_counter()
            asyncio.run(_create_live_packs(server.target, args.live_packs, max(args.live_packs, 1)))
            created = time.perf_counter() - t0
            for round_ in range(args.rounds):
                _progress(f"round {round_ + 1}: tenant B idle")
                times, errors = asyncio.run(
                    _calls(server.target, requests, args.seconds, args.calls_per_second)
                )
                idle.append(times)
                failed[0] += errors
                _progress(f"round {round_ + 1}: tenant B under the flood")
                cpu0, wall0 = server.cpu_seconds(), time.perf_counter()
                commands.put("flood")
                times, errors = asyncio.run(
                    _calls(server.target, requests, args.seconds, args.calls_per_second)
                )
                flood.append(times)
                failed[1] += errors
                floods.append(out.get(timeout=600))
                cpu += (server.cpu_seconds() - cpu0) / (time.perf_counter() - wall0) / args.rounds
                applied, _ = asyncio.run(_live_sequence(server.target, pack))
                settle = time.perf_counter()
                while applied < floods[-1][2] and time.perf_counter() - settle < 120:
                    time.sleep(0.2)
                    applied, _ = asyncio.run(_live_sequence(server.target, pack))
                floods[-1] = (*floods[-1][:2], time.perf_counter() - settle)  # type: ignore[assignment]
            commands.put("stop")
            publisher.join(30)
            applied, size = asyncio.run(_live_sequence(server.target, pack))
            last_seq = asyncio.run(_stream_last(args.nats, stream))

        sent = sum(f[0] for f in floods)
        events = sum(f[1] for f in floods)
        lag = max(f[2] for f in floods)
        print(
            f"machine          {mp.cpu_count()} CPUs shared by the audience process, the publisher, "
            f"this client and NATS; load average {os.getloadavg()[0]:.1f}"
        )
        print(f"bus              NATS JetStream {args.nats} (stream {stream}, {SHARDS} shards)")
        print(f"tenant A         {args.live_packs} live packs (2 leaves each), gRPC in {created:.1f} s")
        print(
            f"flood            {args.rounds} x {args.seconds:.0f} s of {args.rate:g} requests/s x "
            f"{args.batch_events} events ({events / (args.rounds * args.seconds):,.0f} events/s, "
            f"{sent * SHARDS} bus messages in all); A's packs applied up to stream seq {applied} of "
            f"{last_seq} (at most {lag:.1f} s after a flood ended; item-0 has {size} members)"
        )
        print(f"audience CPU     {cpu * 100:.0f}% of one core during the floods (B's calls included)")
        print(
            f"tenant B         CheckMembership of {args.ids:,} ids x {args.packs} packs of "
            f"{args.members:,} members, {args.calls_per_second:g} calls/s (open loop: latency from when due)"
        )
        for round_, (quiet, busy) in enumerate(zip(idle, flood, strict=True), 1):
            q50, q99, _ = _percentiles(quiet)
            b50, b99, _ = _percentiles(busy)
            print(
                f"  round {round_}        idle p50 {q50:6.3f} ms p99 {q99:7.3f} ms | "
                f"flood p50 {b50:6.3f} ms p99 {b99:7.3f} ms | p99 ratio {b99 / q99:.2f}x"
            )
        i50, i99, imax = _percentiles(np.concatenate(idle))
        f50, f99, fmax = _percentiles(np.concatenate(flood))
        calls = sum(len(x) for x in idle)
        print(
            f"  all idle       p50 {i50:.3f} ms  p99 {i99:.3f} ms  max {imax:.1f} ms  "
            f"({calls:,} calls, {failed[0]} failed)"
        )
        print(
            f"  all flood      p50 {f50:.3f} ms  p99 {f99:.3f} ms  max {fmax:.1f} ms  "
            f"({calls:,} calls, {failed[1]} failed)"
        )
        print(f"ratio flood/idle p50 {f50 / i50:.2f}x   p99 {f99 / i99:.2f}x   (goal: p99 <= 2x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        asyncio.run(_drop_stream(args.nats, stream))
    return 0


async def _stream_last(url: str, stream: str) -> int:
    import nats

    nc = await nats.connect(url, connect_timeout=2)
    try:
        info = await nc.jetstream().stream_info(stream)
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def _drop_stream(url: str, stream: str) -> None:
    import nats

    try:
        nc = await nats.connect(url, connect_timeout=2)
    except Exception:
        return
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception:
        pass
    finally:
        await nc.close()


if __name__ == "__main__":
    sys.exit(main())
