"""CheckMembership through one audience server process vs raw in-process pyroaring, same data.

    .venv/bin/python bench/membership.py [--members 1000000] [--universe 10000000] [--packs 3]
        [--batch 1000] [--concurrency 16] [--seconds 8] [--client-procs 1]

Three packs of ``--members`` random users (out of ``--universe``) are published to a temporary local
store; a real ``python -m services.audience`` process serves them. Each call checks ``--batch`` ids
(about a third of them members) against all packs, so one call is batch x packs user-checks.

Figures: single-call latency p50/p99 (one call at a time), throughput with ``--concurrency``
concurrent calls per client process (pre-serialized requests, raw-bytes client so that the client
costs as little CPU as possible), the server's CPU use during the run, and the same checks done in
this process: pyroaring vectorised (``check_batch``'s Roaring path), a plain per-id ``in`` loop,
and the dense-bitset path the server takes for these packs. Ratios are gRPC / raw.
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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from audience_proc import AudienceProcess
from pyroaring import BitMap

from services.audience.membership import check_batch, dense_bits
from services.audience.packstore import PackStore
from services.storage import LocalObjectStore

METHOD = "/flashcrowd.audience.v1.AudienceService/CheckMembership"
TENANT = "bench"


def _batches(
    rng: np.random.Generator, packs: list[BitMap], universe: int, batch: int, count: int
) -> list[np.ndarray]:
    out = []
    members = np.frombuffer(packs[0].to_array(), dtype=np.uint32)
    for _ in range(count):
        ids = rng.integers(0, universe, batch, dtype=np.uint64)
        ids[: batch // 3] = rng.choice(members, batch // 3)  # some certain members
        rng.shuffle(ids)
        out.append(ids)
    return out


def _requests(batches: list[np.ndarray], names: list[str]) -> list[bytes]:
    from flashcrowd.audience.v1 import audience_service_pb2 as api

    return [
        api.CheckMembershipRequest(
            parent=f"tenants/{TENANT}", packs=names, user_ids=b.tolist()
        ).SerializeToString()
        for b in batches
    ]


async def _latency(target: str, requests: list[bytes], calls: int) -> np.ndarray:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        for request in requests[:50]:  # warm-up: caches, connections
            await call(request)
        times = np.empty(calls)
        for i in range(calls):
            t0 = time.perf_counter()
            await call(requests[i % len(requests)])
            times[i] = time.perf_counter() - t0
        return times


async def _throughput(target: str, requests: list[bytes], concurrency: int, seconds: float) -> int:
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD)
        await call(requests[0])
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(offset: int) -> None:
            nonlocal done
            i = offset
            while time.perf_counter() < stop:
                await call(requests[i % len(requests)])
                done += 1
                i += 1

        await asyncio.gather(*(worker(k * 7) for k in range(concurrency)))
        return done


def _client_proc(target: str, requests: list[bytes], concurrency: int, seconds: float, out: mp.Queue) -> None:
    out.put(asyncio.run(_throughput(target, requests, concurrency, seconds)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    parser.add_argument("--universe", type=int, default=10_000_000)
    parser.add_argument("--packs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--latency-calls", type=int, default=3000)
    parser.add_argument("--client-procs", type=int, default=1)
    args = parser.parse_args()

    rng = np.random.default_rng(1)
    root = Path(tempfile.mkdtemp(prefix="flashcrowd-bench-membership-"))
    try:
        from flashcrowd.audience.v1 import pack_pb2

        store = LocalObjectStore(root)
        packs = PackStore(store)
        bitmaps = []
        for i in range(args.packs):
            bm = BitMap(rng.choice(args.universe, args.members, replace=False).astype(np.uint32))
            packs.publish_version(TENANT, f"pack-{i}", bm, pack_pb2.Pack(source=pack_pb2.Pack.SOURCE_UPLOAD))
            bitmaps.append(bm)
        names = [f"tenants/{TENANT}/packs/pack-{i}" for i in range(args.packs)]
        batches = _batches(rng, bitmaps, args.universe, args.batch, 500)
        requests = _requests(batches, names)
        per_call = args.batch * args.packs

        # Raw, in process: the vectorised path the server runs, and a per-id loop.
        for b in batches[:50]:
            check_batch(bitmaps, b)
        raw_times = np.empty(len(batches) * 4)
        t_all = time.perf_counter()
        for i in range(len(raw_times)):
            t0 = time.perf_counter()
            check_batch(bitmaps, batches[i % len(batches)])
            raw_times[i] = time.perf_counter() - t0
        raw_rate = len(raw_times) * per_call / (time.perf_counter() - t_all)
        dense = [dense_bits(bm) for bm in bitmaps]
        dense_times = np.empty(len(batches) * 4)
        t_all = time.perf_counter()
        for i in range(len(dense_times)):
            t0 = time.perf_counter()
            check_batch(bitmaps, batches[i % len(batches)], dense)
            dense_times[i] = time.perf_counter() - t0
        dense_rate = len(dense_times) * per_call / (time.perf_counter() - t_all)
        loop_n = 200
        t0 = time.perf_counter()
        for i in range(loop_n):
            ids = batches[i % len(batches)].tolist()
            _ = [[uid in bm for uid in ids] for bm in bitmaps]
        loop_rate = loop_n * per_call / (time.perf_counter() - t0)
        expected = [[int(u) in bm for u in batches[0]] for bm in bitmaps]
        assert [list(c) for c in check_batch(bitmaps, batches[0])] == expected
        assert [list(c) for c in check_batch(bitmaps, batches[0], dense)] == expected

        with AudienceProcess(root.as_uri()) as server:
            lat = asyncio.run(_latency(server.target, requests, args.latency_calls))
            cpu0, t0 = server.cpu_seconds(), time.perf_counter()
            if args.client_procs == 1:
                calls = asyncio.run(_throughput(server.target, requests, args.concurrency, args.seconds))
            else:
                ctx = mp.get_context("spawn")
                queue: mp.Queue = ctx.Queue()
                procs = [
                    ctx.Process(
                        target=_client_proc,
                        args=(server.target, requests, args.concurrency, args.seconds, queue),
                    )
                    for _ in range(args.client_procs)
                ]
                for p in procs:
                    p.start()
                calls = sum(queue.get() for _ in procs)
                for p in procs:
                    p.join()
            wall = time.perf_counter() - t0
            server_cpu = (server.cpu_seconds() - cpu0) / wall

        grpc_rate = calls * per_call / wall
        p50, p99 = np.percentile(lat, [50, 99]) * 1e3
        r50, r99 = np.percentile(raw_times, [50, 99]) * 1e3
        d50, d99 = np.percentile(dense_times, [50, 99]) * 1e3
        print(f"data             {args.packs} packs x {args.members:,} members of {args.universe:,} users; "
              f"calls of {args.batch:,} ids x {args.packs} packs = {per_call:,} user-checks")  # fmt: skip
        load = os.getloadavg()[0]
        print(
            f"machine          {mp.cpu_count()} CPUs (server and client share them), load average {load:.1f}"
        )
        print("gRPC (one server process, real loopback channel)")
        print(f"  single call    p50 {p50:.3f} ms   p99 {p99:.3f} ms   ({len(lat):,} sequential calls)")
        clients = f"{args.client_procs} client proc x {args.concurrency} concurrent calls"
        print(
            f"  throughput     {grpc_rate:,.0f} user-checks/s  "
            f"({calls / wall:,.0f} calls/s, {clients}, {wall:.1f} s)"
        )
        print(f"  server CPU     {server_cpu * 100:.0f}% of one core -> "
              f"{grpc_rate / max(server_cpu, 1e-9):,.0f} user-checks per server CPU-second")  # fmt: skip
        print("raw in process (same data, same batches)")
        print(f"  pyroaring vectorised  {raw_rate:>12,.0f} user-checks/s  p50 {r50:.3f} ms  p99 {r99:.3f} ms")
        print(f"  pyroaring per-id loop {loop_rate:>12,.0f} user-checks/s")
        print(
            f"  dense bitset (server) {dense_rate:>12,.0f} user-checks/s  p50 {d50:.3f} ms  p99 {d99:.3f} ms"
        )
        print("ratios")
        print(f"  gRPC / pyroaring vectorised throughput   {grpc_rate / raw_rate:.2f}x")
        print(f"  gRPC / pyroaring per-id loop throughput  {grpc_rate / loop_rate:.2f}x")
        print(f"  gRPC / in-process dense throughput       {grpc_rate / dense_rate:.2f}x")
        print(f"  gRPC p50 / pyroaring vectorised p50      {p50 / r50:.1f}x")
        goal_ok = grpc_rate >= 2_000_000 and p99 < 2.0
        print(f"goal (>= 2M checks/s, p99 < 2 ms)   {'met' if goal_ok else 'NOT met'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
