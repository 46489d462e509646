"""Real-time benchmarks: ingest throughput (gRPC -> JetStream vs raw nats-py), live-pack freshness, memory.

    .venv/bin/python bench/realtime.py [--nats nats://127.0.0.1:4222] [--events 300000]

1. Ingest: an EventService process (``python -m services.events.ingest``, bus on NATS) receives
   client batches of 1,000 events over one IngestEvents stream (8 requests in flight); events/s per
   server process. Same run: raw nats-py publishing the same events, already encoded, in messages of
   1,000 (256 publishes in flight, ``publish_async``). Plus where the server's time goes (in-process
   EventIngestor stage timings).
2. Freshness: after each IngestEventBatch returns, how long until the event's user is a member of a
   live pack (``LivePackEngine`` following the same stream in this process), p50 / p99, while the
   ingest load of (1) runs from another process.
3. Memory of a live pack's per-minute Roaring buckets: per 1M members in one minute, and per
   window minute for a 15-minute window over 1M active users.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "gen"))

import grpc  # noqa: E402
import grpc.aio  # noqa: E402
from flashcrowd.audience.v1 import event_service_pb2, event_service_pb2_grpc, events_pb2, spec_pb2  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402

from services.audience.live import LivePackEngine, Series, compile_live_spec  # noqa: E402
from services.events.bus import JetStreamBus  # noqa: E402
from services.events.codec import encode_batch, events_from_proto  # noqa: E402
from services.events.ingest import EventIngestor  # noqa: E402
from services.events.schema import validate_events  # noqa: E402


def make_requests(
    n_events: int, batch: int = 1000, first_id: int = 1
) -> list[event_service_pb2.IngestEventsRequest]:
    now = datetime.now(UTC) - timedelta(seconds=2)
    rng = np.random.default_rng(1)
    users = rng.integers(1, 5_000_000, n_events)
    types = rng.choice([3, 4, 5, 6], n_events)
    out = []
    for lo in range(0, n_events, batch):
        req = event_service_pb2.IngestEventsRequest()
        for i in range(lo, min(lo + batch, n_events)):
            e = req.events.add(
                event_id=first_id + i,
                user_id=int(users[i]),
                event_type=int(types[i]),
                item_id=100001,
                campaign_id=900002,
            )
            e.event_time.FromDatetime(now)
        out.append(req)
    return out


def start_server(url: str, stream: str, prefix: str) -> tuple[subprocess.Popen, int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "FLASHCROWD_BUS_URL": f"{url}?stream={stream}&subjects={prefix}",
        "FLASHCROWD_PORT": str(port),
        "FLASHCROWD_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "services.events.ingest"], cwd=ROOT, env=env)
    return proc, port


async def grpc_ingest(port: int, requests, in_flight: int = 8) -> float:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        await asyncio.wait_for(ch.channel_ready(), 30)
        stub = event_service_pb2_grpc.EventServiceStub(ch)
        chunks = [requests[i::in_flight] for i in range(in_flight)]

        async def one(chunk) -> int:
            async def gen():
                for r in chunk:
                    yield r

            return sum([r.accepted + r.duplicates async for r in stub.IngestEvents(gen())])

        start = time.perf_counter()
        done = sum(await asyncio.gather(*(one(c) for c in chunks)))
        elapsed = time.perf_counter() - start
    assert done == sum(len(r.events) for r in requests), done
    return done / elapsed


async def raw_publish(url: str, stream: str, prefix: str, requests) -> float:
    import nats

    # Same events, validated and encoded as the service would, in messages of 1,000.
    payloads = []
    for r in requests:
        valid, _ = validate_events(events_from_proto(r.events))
        payloads.append(encode_batch(valid))
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=256)
    start = time.perf_counter()
    futures = []
    for i, p in enumerate(payloads):
        futures.append(await js.publish_async(f"{prefix}.{i % 4}", p, headers={"Nats-Msg-Id": f"raw-{i}"}))
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - start
    await nc.close()
    return sum(len(r.events) for r in requests) / elapsed


async def stage_timings(bus: JetStreamBus, requests) -> dict[str, float]:
    ingestor = EventIngestor(bus)
    totals: dict[str, float] = {}
    for r in requests:
        result = await ingestor.ingest(r.events)
        for k, v in result.timings.items():
            totals[k] = totals.get(k, 0.0) + v
    n = sum(len(r.events) for r in requests)
    return {k: v / n * 1e6 for k, v in totals.items()}  # microseconds per event


async def freshness(bus: JetStreamBus, samples: int = 200) -> tuple[float, float]:
    engine = LivePackEngine(bus)
    spec = spec_pb2.PackSpec(
        behavior=spec_pb2.BehaviorCondition(
            event_types=[events_pb2.EVENT_TYPE_CLICK],
            window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=900)),
        )
    )
    await engine.create("bench", "clickers", "", spec)
    engine.start()
    await asyncio.wait_for(engine.ready.wait(), 30)
    ingestor = EventIngestor(bus)
    latencies = []
    for k in range(samples):
        user = 10_000_000 + k
        event = events_pb2.Event(event_id=(1 << 62) + k, user_id=user, event_type=events_pb2.EVENT_TYPE_CLICK)
        event.event_time.FromDatetime(datetime.now(UTC))
        await ingestor.ingest([event])
        returned = time.perf_counter()
        while user not in engine.live_members("bench", "clickers")[1]:
            await asyncio.sleep(0.001)
        latencies.append(time.perf_counter() - returned)
        await asyncio.sleep(0.01)
    await engine.stop()
    return float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def memory() -> tuple[int, int]:
    rng = np.random.default_rng(7)
    leaf = next(iter(compile_live_spec(
        spec_pb2.PackSpec(behavior=spec_pb2.BehaviorCondition(
            event_types=[5], window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=900))))
    ).leaves()))  # fmt: skip
    minute = int(time.time() // 60)

    def frame(users: np.ndarray, minute: int) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "event_type": np.full(users.size, 5, dtype=np.uint8),
                "user_id": users.astype(np.uint32),
                "ts": pl.Series(np.full(users.size, minute * 60_000_000, dtype=np.int64)).cast(
                    pl.Datetime("us", "UTC")
                ),
                "item_id": np.zeros(users.size, dtype=np.uint32),
                "category_id": np.zeros(users.size, dtype=np.uint32),
                "campaign_id": np.zeros(users.size, dtype=np.uint32),
                "video_id": np.zeros(users.size, dtype=np.uint32),
                "amount_fen": np.zeros(users.size, dtype=np.int64),
            }
        )

    one = Series(leaf)
    one.apply(frame(rng.choice(50_000_000, 1_000_000, replace=False), minute), 0)
    per_million = one.memory_bytes()
    window = Series(leaf)
    active = rng.choice(50_000_000, 1_000_000, replace=False)
    for m in range(15):  # 1M active users over 15 minutes, each active in ~1/15 of them
        window.apply(frame(active[m::15], minute - m), 0)
    return per_million, window.memory_bytes() // 15


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--events", type=int, default=300_000)
    args = parser.parse_args()
    token = uuid.uuid4().hex[:10]
    stream, prefix = f"BENCH_{token.upper()}", f"bench.{token}"
    bus = JetStreamBus(args.nats, stream=stream, subject_prefix=prefix, duplicate_window=30)
    await bus.start()
    proc, port = start_server(args.nats, stream, prefix)
    try:
        requests = make_requests(args.events)
        grpc_rate = await grpc_ingest(port, requests)
        raw_rate = await raw_publish(args.nats, stream, prefix, make_requests(args.events, first_id=1 << 40))
        stages = await stage_timings(bus, make_requests(50_000, first_id=1 << 41))
        print(f"ingest via gRPC into JetStream: {grpc_rate:,.0f} events/s per server process "
              f"({args.events:,} events, client batches of 1,000)")  # fmt: skip
        print(f"raw nats-py publish, same encoded events, 1,000 per message: {raw_rate:,.0f} events/s")
        print(f"ratio gRPC ingest / raw publish: {grpc_rate / raw_rate:.2f}")
        print("server time per event (us): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))

        loader = (
            "import asyncio, sys; sys.path[:0] = ['.', 'gen']; import bench.realtime as b; "
            f"asyncio.run(b.grpc_ingest({port}, b.make_requests({args.events}, first_id=1 << 50)))"
        )
        load = subprocess.Popen([sys.executable, "-c", loader], cwd=ROOT)
        p50, p99 = await freshness(bus)
        load.wait(120)
        print(f"freshness IngestEvents return -> live-pack member, under load: p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(10)
        await bus._js.delete_stream(stream)
        await bus.close()
    per_million, per_minute = memory()
    print(f"live pack memory: {per_million / 1e6:.2f} MB per 1M members (one minute bucket, ids < 50M); "
          f"{per_minute / 1e6:.2f} MB per window minute (15-min window, 1M active users)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
