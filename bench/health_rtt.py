"""Health-check round trip of one service process: p50/p99 of grpc.health.v1 Check over loopback.

Starts ``python -m services.<service>`` as its own process (embedded defaults in a temp dir) and
calls Check sequentially from this process, after a warm-up; prints latency percentiles and
calls/s. Usage: ``.venv/bin/python bench/health_rtt.py [--service audience] [--calls 5000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(port: int, calls: int, warmup: int) -> list[float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30
        while True:  # wait until the process serves
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        for _ in range(warmup):
            await stub.Check(health_pb2.HealthCheckRequest(service=""))
        out = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await stub.Check(health_pb2.HealthCheckRequest(service=""))
            out.append(time.perf_counter() - t0)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--service", default="audience", choices=["audience", "retarget", "gateway"])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(
            os.environ,
            FLASHCROWD_PORT=str(port),
            FLASHCROWD_STORE_URL=f"file://{tmp}/store",
            FLASHCROWD_DATABASE_URL=f"sqlite:///{tmp}/retarget.db",
            FLASHCROWD_KEYSTORE_PATH=f"{tmp}/keys.sqlite3",
            FLASHCROWD_HTTP_PORT="-1",
            FLASHCROWD_LOG_LEVEL="WARNING",
        )
        proc = subprocess.Popen([sys.executable, "-m", f"services.{args.service}"], env=env)
        try:
            lat = asyncio.run(measure(port, args.calls, args.warmup))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    print(f"service {args.service}: {len(lat)} sequential Check calls over loopback")
    print(f"  p50 {q[49] * 1000:.3f} ms   p99 {q[98] * 1000:.3f} ms   max {lat[-1] * 1000:.3f} ms")
    print(f"  {len(lat) / sum(lat):,.0f} calls/s (one client, one call in flight)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
