"""Gateway overhead: GetPack and CheckMembership through the gateway vs direct to the audience service.

    .venv/bin/python bench/gateway_overhead.py [--seconds 4] [--concurrency 16] [--users 20000] [--heavy]

One run starts the audience service and the gateway as separate processes on loopback (a generated
world in a tmp store, a pack built once), then measures, alternating direct and gateway rounds:

- latency: one call at a time (p50 / p99 over every call of the round);
- throughput: ``--concurrency`` calls in flight from one asyncio client.

Direct calls carry the trusted tenant header themselves; gateway calls an API key. Goals (the
issue's): gateway p50 and p99 latency under 1.3x direct, throughput over 75% of direct. The client is
one Python process, so the throughput figures are what one such client can drive; on a 2-core
machine the three processes share the cores.
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
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "gen"))

from flashcrowd.audience.v1 import audience_service_pb2 as apb  # noqa: E402
from flashcrowd.audience.v1 import audience_service_pb2_grpc as apb_grpc  # noqa: E402
from flashcrowd.audience.v1 import pack_pb2, spec_pb2  # noqa: E402
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw  # noqa: E402
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc  # noqa: E402
from google.longrunning import operations_pb2, operations_pb2_grpc  # noqa: E402
from google.protobuf import duration_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

TENANT = "bench"
BOOTSTRAP = "bench-bootstrap-admin-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(module: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FLASHCROWD_", "OTEL_"))}
    base.update(
        {"FLASHCROWD_HOST": "127.0.0.1", "FLASHCROWD_LOG_LEVEL": "WARNING", "OTEL_SDK_DISABLED": "false"}
    )
    base.update(env)
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=ROOT, env=base, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


async def wait_serving(target: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{target}: process exited {proc.returncode}")
            try:
                if (await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)).status == 1:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(target)
            await asyncio.sleep(0.1)


Call = Callable[[], Awaitable[object]]


async def latency_round(call: Call, seconds: float) -> list[float]:
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), for CPU cost per call."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput_round(call: Call, seconds: float, concurrency: int) -> tuple[float, int]:
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started), done


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/gateway rounds per figure")
    parser.add_argument(
        "--heavy", action="store_true", help="also CheckMembership of users/2 ids and GetPackPersona"
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    store = tmp / "store"
    subprocess.run(
        [sys.executable, "-m", "services.cli.main", "gen", "--users", str(args.users), "--days", "3",
         "--seed", "3", "--store", str(store), "--no-progress"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    a_port, g_port = free_port(), free_port()
    audience = start(
        "services.audience",
        {"FLASHCROWD_PORT": str(a_port), "FLASHCROWD_STORE_URL": str(store)},
        tmp / "audience.log",
    )
    gateway = start(
        "services.gateway",
        {
            "FLASHCROWD_PORT": str(g_port),
            "FLASHCROWD_AUDIENCE_TARGET": f"127.0.0.1:{a_port}",
            "FLASHCROWD_KEYSTORE_PATH": str(tmp / "keys.sqlite3"),
            "FLASHCROWD_BOOTSTRAP_ADMIN_KEY": BOOTSTRAP,
            "FLASHCROWD_DEFAULT_RATE_LIMIT": '{"rate": 1000000, "burst": 1000000}',
        },
        tmp / "gateway.log",
    )
    try:
        await wait_serving(f"127.0.0.1:{a_port}", audience)
        await wait_serving(f"127.0.0.1:{g_port}", gateway)
        direct_channel = grpc.aio.insecure_channel(f"127.0.0.1:{a_port}")
        gateway_channel = grpc.aio.insecure_channel(f"127.0.0.1:{g_port}")
        trusted = (("x-flashcrowd-tenant", TENANT),)

        admin = gw_grpc.GatewayServiceStub(gateway_channel)
        boot = (("x-api-key", BOOTSTRAP),)
        await admin.CreateTenant(gw.CreateTenantRequest(tenant_id=TENANT), metadata=boot)
        key = await admin.CreateApiKey(
            gw.CreateApiKeyRequest(parent=f"tenants/{TENANT}", scopes=["packs.read", "packs.write"]),
            metadata=boot,
        )
        keyed = (("x-api-key", key.secret),)

        direct = apb_grpc.AudienceServiceStub(direct_channel)
        spec = spec_pb2.PackSpec(
            shortcut=spec_pb2.Shortcut(
                kind=spec_pb2.Shortcut.KIND_CLICKERS,
                window=spec_pb2.TimeWindow(last=duration_pb2.Duration(seconds=259200)),
            )
        )
        operation = await direct.CreatePack(
            apb.CreatePackRequest(
                parent=f"tenants/{TENANT}", pack_id="clickers", pack=pack_pb2.Pack(spec=spec)
            ),
            metadata=trusted,
        )
        ops = operations_pb2_grpc.OperationsStub(direct_channel)
        done = await ops.WaitOperation(
            operations_pb2.WaitOperationRequest(
                name=operation.name, timeout=duration_pb2.Duration(seconds=120)
            ),
            metadata=trusted,
        )
        assert done.done and not done.HasField("error"), done
        pack = f"tenants/{TENANT}/packs/clickers"
        via_gateway = apb_grpc.AudienceServiceStub(gateway_channel)
        get = apb.GetPackRequest(name=pack)
        check = apb.CheckMembershipRequest(
            parent=f"tenants/{TENANT}", packs=[pack], user_ids=list(range(0, 2000, 7))
        )

        calls: dict[str, dict[str, Call]] = {
            "GetPack": {
                "direct": lambda: direct.GetPack(get, metadata=trusted),
                "gateway": lambda: via_gateway.GetPack(get, metadata=keyed),
            },
            "CheckMembership": {
                "direct": lambda: direct.CheckMembership(check, metadata=trusted),
                "gateway": lambda: via_gateway.CheckMembership(check, metadata=keyed),
            },
        }
        if args.heavy:
            # Heavier calls show that the gateway's cost is a constant per call, not a factor.
            big = apb.CheckMembershipRequest(
                parent=f"tenants/{TENANT}", packs=[pack], user_ids=list(range(args.users // 2))
            )
            persona = apb.GetPackPersonaRequest(name=pack)
            calls["CheckMembership/10k"] = {
                "direct": lambda: direct.CheckMembership(big, metadata=trusted),
                "gateway": lambda: via_gateway.CheckMembership(big, metadata=keyed),
            }
            calls["GetPackPersona"] = {
                "direct": lambda: direct.GetPackPersona(persona, metadata=trusted),
                "gateway": lambda: via_gateway.GetPackPersona(persona, metadata=keyed),
            }
        print(
            f"gateway overhead: {args.users} users, rounds of {args.seconds:g}s x {args.rounds}, "
            f"throughput at concurrency {args.concurrency}, cpus={os.cpu_count()}"
        )
        print(
            f"{'method':<20}{'path':<9}{'p50 ms':>8}{'p99 ms':>8}{'calls/s':>10}"
            f"{'audience cpu/call':>19}{'gateway cpu/call':>18}"
        )
        verdicts: list[str] = []
        for method, paths in calls.items():
            for call in paths.values():  # warm up both paths (connections, caches)
                for _ in range(20 if method != "GetPack" and method != "CheckMembership" else 200):
                    await call()
            latencies: dict[str, list[float]] = {"direct": [], "gateway": []}
            rates: dict[str, list[float]] = {"direct": [], "gateway": []}
            # CPU seconds of (audience, gateway) and calls, during the throughput rounds of each path.
            cpu: dict[str, list[float]] = {"direct": [0.0, 0.0, 0.0], "gateway": [0.0, 0.0, 0.0]}
            for _ in range(args.rounds):
                for path, call in paths.items():
                    latencies[path] += await latency_round(call, args.seconds / 2)
                    before = (cpu_seconds(audience.pid), cpu_seconds(gateway.pid))
                    rate, count = await throughput_round(call, args.seconds / 2, args.concurrency)
                    cpu[path][0] += cpu_seconds(audience.pid) - before[0]
                    cpu[path][1] += cpu_seconds(gateway.pid) - before[1]
                    cpu[path][2] += count
                    rates[path].append(rate)
            figures = {
                path: (pct(latencies[path], 0.5), pct(latencies[path], 0.99), statistics.mean(rates[path]))
                for path in paths
            }
            for path, (p50, p99, rate) in figures.items():
                a_cpu, g_cpu, n_calls = cpu[path]
                per_call = f"{a_cpu / n_calls * 1e6:>16.0f}us" + (
                    f"{g_cpu / n_calls * 1e6:>16.0f}us" if path == "gateway" else f"{'-':>18}"
                )
                print(f"{method:<20}{path:<9}{p50:>8.2f}{p99:>8.2f}{rate:>10.0f}{per_call}")
            d, g = figures["direct"], figures["gateway"]
            ratio50, ratio99, share = g[0] / d[0], g[1] / d[1], g[2] / d[2]
            ok = ratio50 < 1.3 and ratio99 < 1.3 and share > 0.75
            verdicts.append(
                f"{method}: latency x{ratio50:.2f} (p50) x{ratio99:.2f} (p99), "
                f"+{g[0] - d[0]:.2f} ms at p50, throughput {share:.0%} of direct"
                f" -> {'meets' if ok else 'misses'} the goal (<1.3x, >75%)"
            )
        print()
        for line in verdicts:
            print(line)
        await direct_channel.close()
        await gateway_channel.close()
    finally:
        for proc in (gateway, audience):
            proc.terminate()
        for proc in (gateway, audience):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    asyncio.run(main())
