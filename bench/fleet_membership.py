"""CheckMembership across a fleet: scaling over 1, 2 and 3 audience replicas behind the gateway, and
the serving p99 while 2M-user builds run, with builds on the serving process's threads vs in a worker.

    .venv/bin/python bench/fleet_membership.py [--seconds 5] [--concurrency 32] [--users 2000000]
        [--builds 6] [--cache-dir var/bench] [--skip-scaling] [--skip-builds]

Everything runs as separate processes on this machine (its CPUs are shared by all of them: read the
scaling ratio against the CPU count it prints). Part 1: three packs of 1M random members are
published to a temporary store; 1, 2, then 3 ``python -m services.audience`` replicas (one control
database) serve them behind one gateway whose audience target lists them (round robin); a platform
key calls CheckMembership (1,000 ids x 3 packs) with ``--concurrency`` calls in flight from two
client processes. The raw baseline is the same load sent straight to one replica, no gateway.

Part 2: one replica over a generated world of ``--users`` users (cached in ``--cache-dir``);
CheckMembership p50/p99 with one call at a time, first idle, then while ``--builds`` CreatePack
builds run back to back; once with ``FLASHCROWD_WORKER_PROCESSES=0`` (builds on the serving
process's threads, sharing its GIL) and once with 1 (builds in an ``audience-worker`` process).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashcrowd.audience.v1 import audience_service_pb2 as api
from flashcrowd.audience.v1 import audience_service_pb2_grpc as api_grpc
from flashcrowd.audience.v1 import events_pb2, pack_pb2, spec_pb2
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2
from pyroaring import BitMap

from bench.gateway_overhead import (
    BOOTSTRAP,
    free_port,
    latency_round,
    pct,
    start,
    throughput_round,
    wait_serving,
)
from bench.launch import ensure_world
from services.audience.packstore import PackStore
from services.runtime.assertion import Caller
from services.storage import LocalObjectStore

METHOD = "/flashcrowd.audience.v1.AudienceService/CheckMembership"
TENANT = "bench"
KEY = os.environ.setdefault("FLASHCROWD_GATEWAY_ASSERTION_KEY", "ab" * 32)


def _start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``gateway_overhead.start`` with this run's assertion key (the direct baseline signs with it)."""
    return start(module, {"FLASHCROWD_GATEWAY_ASSERTION_KEY": KEY, **env}, log)


def _requests(packs: list[BitMap], names: list[str], universe: int, count: int = 300) -> list[bytes]:
    rng = np.random.default_rng(3)
    members = np.frombuffer(packs[0].to_array(), dtype=np.uint32)
    out = []
    for _ in range(count):
        ids = rng.integers(0, universe, 1000, dtype=np.uint64)
        ids[:333] = rng.choice(members, 333)
        out.append(api.CheckMembershipRequest(parent=f"tenants/{TENANT}", packs=names, user_ids=ids.tolist()))
    return [r.SerializeToString() for r in out]


def _client(target: str, metadata: tuple, requests: list[bytes], concurrency: int, seconds: float,
            out: mp.Queue) -> None:  # fmt: skip
    async def run() -> float:
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.unary_unary(METHOD)
            turn = iter(range(10**12))
            await call(requests[0], metadata=metadata)
            rate, _ = await throughput_round(
                lambda: call(requests[next(turn) % len(requests)], metadata=metadata), seconds, concurrency
            )
            return rate

    out.put(asyncio.run(run()))


def _load(target: str, metadata: tuple, requests: list[bytes], concurrency: int, seconds: float) -> float:
    """Calls/s from two client processes (so the client is not the bottleneck)."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(target, metadata, requests, concurrency // 2, seconds, queue))
             for _ in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    # A client that failed puts nothing: give up after the round's time instead of waiting forever.
    total = sum(queue.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join()
    return total


async def _platform_key(gateway: str) -> str:
    async with grpc.aio.insecure_channel(gateway) as channel:
        admin = gw_grpc.GatewayServiceStub(channel)
        key = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent="platform", scopes=["members.read"]),
            metadata=(("x-api-key", BOOTSTRAP),),
        )
        return key.secret


def _direct_metadata(method: str = METHOD) -> tuple:
    """A platform assertion for ``method`` that a replica accepts without the gateway (what the
    gateway would sign)."""
    from services.runtime.assertion import AssertionSigner, load_assertion_key

    signer = AssertionSigner(load_assertion_key(KEY), ttl_seconds=3600)  # outlives the run
    caller = Caller.platform("bench", {"members.read", "packs.read", "packs.write"})
    return (signer.metadata(caller, method),)


async def scaling(args: argparse.Namespace, tmp: Path) -> None:
    store_dir = tmp / "packs-store"
    packs = PackStore(LocalObjectStore(store_dir))
    rng = np.random.default_rng(1)
    bitmaps = []
    for i in range(3):
        bm = BitMap(rng.choice(10_000_000, 1_000_000, replace=False).astype(np.uint32))
        packs.publish_version(TENANT, f"pack-{i}", bm, pack_pb2.Pack(source=pack_pb2.Pack.SOURCE_UPLOAD))
        bitmaps.append(bm)
    names = [f"tenants/{TENANT}/packs/pack-{i}" for i in range(3)]
    requests = _requests(bitmaps, names, 10_000_000)
    control = f"sqlite:///{tmp / 'control.sqlite3'}"
    ports = [free_port() for _ in range(3)]
    replicas = [
        _start("services.audience", {"FLASHCROWD_PORT": str(p), "FLASHCROWD_STORE_URL": str(store_dir),
                                    "FLASHCROWD_CONTROL_DATABASE_URL": control}, tmp / f"audience{i}.log")
        for i, p in enumerate(ports)
    ]  # fmt: skip
    procs = list(replicas)
    try:
        for port, proc in zip(ports, replicas, strict=True):
            await wait_serving(f"127.0.0.1:{port}", proc, 180)
        direct = _load(f"127.0.0.1:{ports[0]}", _direct_metadata(), requests, args.concurrency, args.seconds)
        rates = {}
        for n in (1, 2, 3):
            gport = free_port()
            gateway = _start(
                "services.gateway",
                {"FLASHCROWD_PORT": str(gport), "FLASHCROWD_HTTP_PORT": str(free_port()),
                 "FLASHCROWD_AUDIENCE_TARGET": "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports[:n]),
                 "FLASHCROWD_KEYSTORE_PATH": str(tmp / f"keys{n}.sqlite3"),
                 "FLASHCROWD_BOOTSTRAP_ADMIN_KEY": BOOTSTRAP,
                 "FLASHCROWD_DEFAULT_RATE_LIMIT": '{"rate": 1000000, "burst": 1000000}'},
                tmp / f"gateway{n}.log",
            )  # fmt: skip
            procs.append(gateway)
            await wait_serving(f"127.0.0.1:{gport}", gateway, 180)
            key = await _platform_key(f"127.0.0.1:{gport}")
            rates[n] = _load(f"127.0.0.1:{gport}", (("x-api-key", key),), requests, args.concurrency,
                             args.seconds)  # fmt: skip
            gateway.terminate()
            gateway.wait(30)
        print(f"machine          {os.cpu_count()} CPUs shared by replicas, gateway and clients; "
              f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        print("part 1: CheckMembership of 1,000 ids x 3 packs of 1M members, "
              f"{args.concurrency} calls in flight, {args.seconds:g} s per figure")  # fmt: skip
        checks = direct * 3000 / 1e6
        print(f"  raw: one replica, no gateway    {direct:9,.0f} calls/s  ({checks:,.1f}M checks/s)")
        for n, rate in rates.items():
            print(f"  gateway -> {n} replica(s)        {rate:9,.0f} calls/s  "
                  f"x{rate / rates[1]:.2f} of 1 replica, x{rate / direct:.2f} of raw")  # fmt: skip
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait(30)


CLICKED = spec_pb2.PackSpec(
    behavior=spec_pb2.BehaviorCondition(
        event_types=[events_pb2.EVENT_TYPE_CLICK],
        window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=30 * 86400)),
    )
)


async def _during_builds(target: str, count: int, seconds: float) -> tuple[list[float], list[float], float]:
    """(idle latencies, latencies while ``count`` builds run, seconds the builds took)."""
    metadata = _direct_metadata()
    create_metadata = _direct_metadata("/flashcrowd.audience.v1.AudienceService/CreatePack")
    operation_metadata = _direct_metadata("/google.longrunning.Operations/GetOperation")
    async with grpc.aio.insecure_channel(target) as channel:
        stub = api_grpc.AudienceServiceStub(channel)
        ops = operations_pb2_grpc.OperationsStub(channel)

        async def create(pack_id: str) -> str:
            request = api.CreatePackRequest(
                parent=f"tenants/{TENANT}", pack_id=pack_id, pack=pack_pb2.Pack(spec=CLICKED)
            )
            return (await stub.CreatePack(request, metadata=create_metadata)).name

        async def done(name: str) -> bool:
            request = operations_pb2.GetOperationRequest(name=name)
            return (await ops.GetOperation(request, metadata=operation_metadata)).done

        seed = await create("seed")
        while not await done(seed):
            await asyncio.sleep(0.2)
        check_call = channel.unary_unary(METHOD)
        payload = api.CheckMembershipRequest(
            parent=f"tenants/{TENANT}",
            packs=[f"tenants/{TENANT}/packs/seed"],
            user_ids=list(range(0, 2000, 2)),
        ).SerializeToString()

        async def check() -> object:
            return await check_call(payload, metadata=metadata)

        await latency_round(check, 1.0)  # warm: cache, connection
        idle = await latency_round(check, seconds)
        started = time.perf_counter()
        names = [await create(f"b{i}") for i in range(count)]
        busy: list[float] = []
        while True:
            busy += await latency_round(check, 0.5)
            if all([await done(name) for name in names]):
                return idle, busy, time.perf_counter() - started


async def builds(args: argparse.Namespace, tmp: Path) -> None:
    world = ensure_world(Path(args.cache_dir), args.users)
    print(f"part 2: CheckMembership p50/p99 (one call at a time) on one replica over {world.name}, "
          f"idle vs during {args.builds} back-to-back builds of 'clicked in 30 days'")  # fmt: skip
    for workers in (0, 1):
        port = free_port()
        prefix = f"bench-fleet-{os.getpid()}-{workers}/"
        proc = _start(
            "services.audience",
            {"FLASHCROWD_PORT": str(port), "FLASHCROWD_STORE_URL": str(world),
             "FLASHCROWD_PACKS_PREFIX": prefix,
             "FLASHCROWD_CONTROL_DATABASE_URL": f"sqlite:///{tmp / f'control-{workers}.sqlite3'}",
             "FLASHCROWD_WORKER_PROCESSES": str(workers), "FLASHCROWD_MAX_CONCURRENT_BUILDS": "1"},
            tmp / f"audience-build-{workers}.log",
        )  # fmt: skip
        try:
            await wait_serving(f"127.0.0.1:{port}", proc, 180)
            idle, busy, took = await _during_builds(f"127.0.0.1:{port}", args.builds, args.seconds)
        finally:
            proc.terminate()
            proc.wait(60)
            shutil.rmtree(world / prefix, ignore_errors=True)
        where = "in an audience-worker process  " if workers else "on the serving process's threads"
        print(f"  builds {where}: idle p50 {pct(idle, 0.5):.2f} ms p99 {pct(idle, 0.99):.2f} ms | "
              f"during builds p50 {pct(busy, 0.5):.2f} ms p99 {pct(busy, 0.99):.2f} ms "
              f"(x{pct(busy, 0.99) / pct(idle, 0.99):.1f} of idle; {args.builds} builds took "
              f"{took:.1f} s, {len(busy):,} calls)")  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--users", type=int, default=2_000_000)
    parser.add_argument("--builds", type=int, default=6)
    parser.add_argument("--cache-dir", default="var/bench")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-builds", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleet-membership-"))
    try:
        if not args.skip_scaling:
            await scaling(args, tmp)
        if not args.skip_builds:
            await builds(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
