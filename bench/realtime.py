"""Real-time benchmarks: ingest throughput (gRPC -> JetStream vs raw nats-py), live-pack freshness, memory.

    .venv/bin/python bench/realtime.py [--nats nats://127.0.0.1:4222] [--events 500000] [--raw-messages 5000]
                                       [--rounds 3]

1. Ingest: an EventService process (``python -m services.events.ingest``, bus on NATS) receives
   client batches of 1,000 events over IngestEvents streams (8 in flight); events/s per server
   process, and the server's CPU per event (``/proc``); median of ``--rounds`` rounds, interleaved
   with the raw publishes so that load from elsewhere on the machine hits both alike. The client
   sends requests serialized once beforehand, so that on a small machine its CPU goes to the
   transport, not to re-serializing.
   Same run, raw nats-py publishing the same events, encoded by the service's own encoder, in
   messages of 1,000 (``--raw-messages`` messages, cycling a pool of distinct payloads; the
   service's headers; as many publishes in flight as the service allows), and in messages of the
   size the service really publishes (a request's events split over the shards).
2. Where the time goes: the same requests through ``EventIngestor`` in this process (decode,
   validate, encode, publish per event), the protobuf parse of a request (upb) for comparison, and
   two no-op EventService processes on the same server factory, as ceilings of the gRPC hop: one
   that only counts the request bytes, one that also parses them with protobuf.
3. Freshness: after each IngestEventBatch returns, how long until the event's user is a member of a
   live pack (``LivePackEngine`` following the same stream in this process), p50 / p99, while the
   ingest load of (1) runs from another process.
4. Memory of a live pack's per-minute Roaring buckets: per 1M members in one minute, and per
   window minute for a 15-minute window over 1M active users.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
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
from flashcrowd.audience.v1 import event_service_pb2, events_pb2, spec_pb2  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402

from services.audience.live import LivePackEngine, Series, compile_live_spec  # noqa: E402
from services.events.bus import HEADER_COUNT, HEADER_FORMAT, HEADER_MSG_ID, JetStreamBus  # noqa: E402
from services.events.codec import batches_from_columns, shard_table  # noqa: E402
from services.events.columns import columns_from_wire, validate_columns  # noqa: E402
from services.events.ingest import EventIngestor  # noqa: E402
from services.events.sharding import buckets_np  # noqa: E402
from services.runtime.assertion import platform_channel  # noqa: E402
from services.runtime.scopes import PLATFORM_EVENTS_WRITE  # noqa: E402

INGEST_METHOD = "/flashcrowd.audience.v1.EventService/IngestEvents"


def make_requests(n_events: int, batch: int = 1000, first_id: int = 1) -> list[bytes]:
    """Serialized IngestEventsRequests of ``batch`` events (live-room traffic of 5M users)."""
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
        out.append(req.SerializeToString())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, stream: str, prefix: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        "FLASHCROWD_BUS_URL": f"{url}?stream={stream}&subjects={prefix}",
        "FLASHCROWD_PORT": str(port),
        "FLASHCROWD_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen([sys.executable, "-m", "services.events.ingest"], cwd=ROOT, env=env)
    return proc, port


def start_floor_server(mode: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--floor-server", mode, "--port", str(port)], cwd=ROOT)
    return proc, port


async def serve_floor(mode: str, port: int) -> None:
    """A no-op EventService on the shared server factory: the gRPC hop alone (``bytes``) or with
    the protobuf parse of each request (``proto``)."""
    from services.runtime import BaseServiceSettings, create_server, load_settings

    response = event_service_pb2.IngestEventsResponse

    async def ingest(requests, context):
        async for request in requests:
            # ``bytes``: acknowledges the request without looking at it (the client counts events).
            yield response(accepted=len(request.events) if mode == "proto" else 0)

    def register(server: grpc.aio.Server) -> None:
        parse = event_service_pb2.IngestEventsRequest.FromString if mode == "proto" else None
        handler = grpc.stream_stream_rpc_method_handler(
            ingest, request_deserializer=parse, response_serializer=response.SerializeToString
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "flashcrowd.audience.v1.EventService", {"IngestEvents": handler}
                ),
            )
        )

    settings = load_settings(BaseServiceSettings, port=port, log_json=False)
    server, _ = await create_server(settings, service_names=[], register=register)
    await server.wait_for_termination()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def grpc_ingest(
    port: int, requests: list[bytes], in_flight: int = 8, pid: int | None = None, events: int | None = None
):
    """``(events/s, server CPU seconds, events)`` of IngestEvents over ``in_flight`` streams.

    Events are counted from the answers (accepted + duplicates) unless ``events`` is given.
    """
    # The platform's behaviour stream: a platform principal with events.platform (ingest verifies the
    # assertion; it is signed once per stream).
    async with platform_channel(
        f"127.0.0.1:{port}",
        "bench",
        scopes=[PLATFORM_EVENTS_WRITE],
        options=[("grpc.max_send_message_length", 64 << 20)],
    ) as ch:
        await asyncio.wait_for(ch.channel_ready(), 30)
        call = ch.stream_stream(
            INGEST_METHOD,
            request_serializer=None,  # already serialized
            response_deserializer=event_service_pb2.IngestEventsResponse.FromString,
        )
        chunks = [requests[i::in_flight] for i in range(in_flight)]

        async def one(chunk) -> int:
            async def gen():
                for r in chunk:
                    yield r

            return sum([r.accepted + r.duplicates async for r in call(gen())])

        cpu0 = cpu_seconds(pid) if pid else 0.0
        start = time.perf_counter()
        done = sum(await asyncio.gather(*(one(c) for c in chunks)))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    done = done if events is None else events
    return done / elapsed, cpu, done


def encoded_payloads(requests: list[bytes], shards: int, now: datetime) -> list:
    """The requests' events as the service encodes them (validated, per shard)."""
    table = shard_table(shards)
    out = []
    for r in requests:
        columns = columns_from_wire(r)
        assert columns is not None, "the bench's own requests decode on the fast path"
        ok, _ = validate_columns(columns, now=now)
        valid = columns.take(np.flatnonzero(ok))
        out.extend(batches_from_columns(valid, buckets_np(valid.user_id), table))
    return out


async def raw_publish(
    url: str, prefix: str, batches: list, messages: int, pending: int
) -> tuple[float, float]:
    """(events/s, publisher CPU s per event) of nats-py publishing ``messages`` of these payloads (cycled)."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=pending)
    token = uuid.uuid4().hex[:8]
    events = 0
    cpu = time.process_time()
    start = time.perf_counter()
    futures = []
    for i in range(messages):
        b = batches[i % len(batches)]
        headers = {HEADER_MSG_ID: f"raw-{token}-{i}", HEADER_COUNT: str(b.count), HEADER_FORMAT: b.format}
        futures.append(await js.publish_async(f"{prefix}.{b.shard}", b.payload, headers=headers))
        events += b.count
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await nc.close()
    return events / elapsed, cpu / events


async def stage_timings(bus: JetStreamBus, requests: list[bytes]) -> dict[str, float]:
    """Nanoseconds per event of each ingest stage, in this process, one request after the other."""
    ingestor = EventIngestor(bus)
    await ingestor.ingest(requests[0])
    totals: dict[str, float] = {}
    for r in requests[1:]:
        result = await ingestor.ingest(r)
        for k, v in result.timings.items():
            totals[k] = totals.get(k, 0.0) + v
    n = 1000 * (len(requests) - 1)
    parse = time.perf_counter()
    for r in requests:
        event_service_pb2.IngestEventsRequest.FromString(r)
    totals["protobuf parse (upb), for comparison"] = time.perf_counter() - parse
    return {k: v / n * 1e9 for k, v in totals.items()}


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
            event_types=[events_pb2.EVENT_TYPE_CLICK],
            window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=900))))
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


def spread(values: list[float]) -> str:
    """Median [min-max] of a few rounds."""
    return f"{statistics.median(values):,.0f} [{min(values):,.0f}-{max(values):,.0f}]"


async def measure_ingest(args, bus: JetStreamBus, prefix: str, proc: subprocess.Popen, port: int) -> None:
    await grpc_ingest(port, make_requests(20_000, first_id=1 << 45), pid=proc.pid)  # warm-up
    now = datetime.now(UTC)
    requests = make_requests(args.events)
    per_1000 = encoded_payloads(requests[:200], 1, now)
    per_shard = encoded_payloads(requests[:200], bus.shard_count, now)
    rates, cpus, raws, raw_cpus, shardeds, sharded_cpus = [], [], [], [], [], []
    for k in range(args.rounds):  # interleaved, so that load from elsewhere hits all alike
        if k:
            requests = make_requests(args.events, first_id=1 + (k << 32))
        rate, cpu, done = await grpc_ingest(port, requests, pid=proc.pid)
        rates.append(rate)
        cpus.append(cpu / done * 1e9)
        raw, raw_cpu = await raw_publish(args.nats, prefix, per_1000, args.raw_messages, bus.max_pending)
        raws.append(raw)
        raw_cpus.append(raw_cpu * 1e9)
        sharded, sharded_cpu = await raw_publish(
            args.nats, prefix, per_shard, args.raw_messages, bus.max_pending
        )
        shardeds.append(sharded)
        sharded_cpus.append(sharded_cpu * 1e9)
    rate, raw, sharded = (statistics.median(v) for v in (rates, raws, shardeds))
    mean = sum(b.count for b in per_shard) / len(per_shard)
    print(f"(median [min-max] of {args.rounds} interleaved rounds on {os.cpu_count()} CPUs shared by client, "
          "server and nats-server)")  # fmt: skip
    print(f"ingest via gRPC into JetStream: {spread(rates)} events/s per server process ({done:,} events "
          f"a round, client batches of 1,000, 8 streams); server CPU {spread(cpus)} ns/event")  # fmt: skip
    print(f"raw nats-py publish, same encoded events, 1,000 per message: {spread(raws)} events/s "
          f"({args.raw_messages:,} messages a round); publisher CPU {spread(raw_cpus)} ns/event")  # fmt: skip
    print(f"raw nats-py publish at the service's message size ({mean:,.0f} events: a request over "
          f"{bus.shard_count} shards): {spread(shardeds)} events/s; publisher CPU {spread(sharded_cpus)} "
          "ns/event")  # fmt: skip
    print(f"ratio gRPC ingest / raw publish: {rate / raw:.2f} (1,000 per message); "
          f"{rate / sharded:.2f} (at the service's message size)")  # fmt: skip

    stages = await stage_timings(bus, make_requests(100_000, first_id=1 << 41))
    print("server stages in-process, ns/event: " + ", ".join(f"{k} {v:,.0f}" for k, v in stages.items()))
    for mode in ("bytes", "proto"):
        floor, floor_port = start_floor_server(mode)
        try:
            await grpc_ingest(floor_port, requests[:20], pid=floor.pid)
            f_rate, f_cpu, f_done = await grpc_ingest(floor_port, requests, pid=floor.pid, events=done)
        finally:
            floor.terminate()
            floor.wait(10)
        what = "the gRPC hop alone" if mode == "bytes" else "gRPC hop + protobuf parse"
        print(f"ceiling, no-op EventService ({what}): {f_rate:,.0f} events/s, server CPU "
              f"{f_cpu / f_done * 1e9:,.0f} ns/event = {f_rate / raw:.2f} of raw publish")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--raw-messages", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor-server", choices=["bytes", "proto"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        await serve_floor(args.floor_server, args.port)
        return
    token = uuid.uuid4().hex[:10]
    stream, prefix = f"BENCH_{token.upper()}", f"bench.{token}"
    bus = JetStreamBus(args.nats, stream=stream, subject_prefix=prefix, duplicate_window=30)
    await bus.start()
    proc, port = start_server(args.nats, stream, prefix)
    try:
        await measure_ingest(args, bus, prefix, proc, port)
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
