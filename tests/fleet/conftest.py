"""A fleet on loopback: every service as several real processes sharing PostgreSQL, NATS and Redis.

3 audience replicas (each with one ``audience-worker`` child that runs the builds), 2 retarget, 2
sale monitors and 2 gateways; the gateways spread calls over the backends' replicas (one
``ipv4:`` target listing all of them, round robin). Data: a small world made by ``flashcrowd gen``
in a tmp local store that every audience replica opens. Process logs stay in tmp and are printed
when a process fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import psycopg
import pytest
from flashcrowd.gateway.v1 import gateway_service_pb2 as gw
from flashcrowd.gateway.v1 import gateway_service_pb2_grpc as gw_grpc

from tests.fixtures.postgres import create_pg_database, drop_pg_database, pg_reachable
from tests.fixtures.processes import ROOT, free_ports, service_env, wait_serving

BOOTSTRAP = "fleet-bootstrap-admin-key-0123456789abcdef"
TENANT = "shop"
#: Owner leases of build operations (s): a SIGKILLed worker's build is taken over after this.
LEASE_SECONDS = 3
#: The gateways' ListPacks bucket per tenant (calls/s and burst), shared through Redis.
LIST_RATE = 20
#: Shutdown grace of every process.
GRACE_SECONDS = 2


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Fleet:
    root: Path
    database_url: str
    ports: dict[str, int]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    tenant_key: str = ""
    platform_key: str = ""

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def names(self, kind: str) -> list[str]:
        return sorted(name for name in self.ports if name.startswith(kind) and name[len(kind) :].isdigit())

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def children(self, name: str, command: str = "services.audience.worker") -> list[int]:
        """Pids of a process's live children running ``command`` (an audience replica's workers)."""
        parent = self.procs[name].pid
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                state, ppid = stat.rsplit(")", 1)[1].split()[:2]
                if int(ppid) == parent and state != "Z":  # a dead, not yet reaped worker is no worker
                    with contextlib.suppress(OSError):
                        if command in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                            found.append(int(entry.name))
        return found

    def sql(self, query: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.database_url) as conn:
            return list(conn.execute(query, params).fetchall())


@pytest.fixture(scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    for why in (pg_reachable(),):
        if why is not None:
            pytest.skip(why)
    for port, what in ((4222, "NATS with JetStream"), (6379, "Redis")):
        if not _reachable(port):
            pytest.skip(f"{what} is not running on 127.0.0.1:{port} (scripts/services.sh starts it)")
    root = tmp_path_factory.mktemp("fleet")
    store = root / "store"
    subprocess.run(
        [sys.executable, "-m", "services.cli.main", "gen", "--users", "20000", "--days", "3", "--seed", "9",
         "--store", str(store), "--no-progress"],
        cwd=ROOT, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    database = create_pg_database("fleet")
    names = ["audience1", "audience2", "audience3", "retarget1", "retarget2", "monitor1", "monitor2",
             "gateway1", "gateway2", "http1", "http2"]  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    audiences = ",".join(f"127.0.0.1:{ports[n]}" for n in names if n.startswith("audience"))
    retargets = ",".join(f"127.0.0.1:{ports[n]}" for n in names if n.startswith("retarget"))
    bus = f"nats://127.0.0.1:4222?stream=FLEET_{uuid.uuid4().hex[:8]}&subjects=fleet{uuid.uuid4().hex[:8]}"
    env: dict[str, dict[str, str]] = {}
    for n in ("audience1", "audience2", "audience3"):
        env[n] = service_env(
            GRACE_SECONDS, FLASHCROWD_PORT=str(ports[n]), FLASHCROWD_STORE_URL=str(store),
            FLASHCROWD_CONTROL_DATABASE_URL=database, FLASHCROWD_WORKER_PROCESSES="1",
            FLASHCROWD_COMPUTE_PROCESSES="1",
            FLASHCROWD_OPERATION_LEASE_SECONDS=str(LEASE_SECONDS), FLASHCROWD_BUS_URL=bus,
            FLASHCROWD_MAX_CONCURRENT_BUILDS="1",
        )  # fmt: skip
    for n in ("retarget1", "retarget2"):
        env[n] = service_env(
            GRACE_SECONDS, FLASHCROWD_PORT=str(ports[n]), FLASHCROWD_DATABASE_URL=database,
            FLASHCROWD_AUDIENCE_TARGET=f"ipv4:{audiences}",
        )  # fmt: skip
    for n in ("monitor1", "monitor2"):
        env[n] = service_env(
            GRACE_SECONDS, FLASHCROWD_PORT=str(ports[n]), FLASHCROWD_BUS_URL=bus,
            FLASHCROWD_RETARGET_TARGET=f"ipv4:{retargets}",
            FLASHCROWD_RULES_LEASE_KEY=f"fleet-{uuid.uuid4().hex[:8]}", FLASHCROWD_RULES_LEASE_SECONDS="3",
        )  # fmt: skip
    for i, n in enumerate(("gateway1", "gateway2"), start=1):
        env[n] = service_env(
            GRACE_SECONDS, FLASHCROWD_PORT=str(ports[n]), FLASHCROWD_HTTP_PORT=str(ports[f"http{i}"]),
            FLASHCROWD_AUDIENCE_TARGET=f"ipv4:{audiences}", FLASHCROWD_RETARGET_TARGET=f"ipv4:{retargets}",
            FLASHCROWD_KEYSTORE_URL=database, FLASHCROWD_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP,
            FLASHCROWD_REDIS_URL="redis://127.0.0.1:6379/0", FLASHCROWD_GATEWAY_REPLICAS="2",
            FLASHCROWD_RATE_LIMITS=json.dumps({"ListPacks": {"rate": LIST_RATE, "burst": LIST_RATE}}),
        )  # fmt: skip
    running = Fleet(root, database, ports)
    modules = {"audience": "services.audience", "retarget": "services.retarget",
               "monitor": "services.monitor", "gateway": "services.gateway"}  # fmt: skip
    try:
        # The first retarget migrates the ledger; the first gateway creates the key store's tables.
        order = [["audience1", "retarget1", "monitor1", "gateway1"],
                 ["audience2", "audience3", "retarget2", "monitor2", "gateway2"]]  # fmt: skip
        for group in order:
            for n in group:
                log = (root / f"{n}.log").open("wb")
                running.procs[n] = subprocess.Popen(
                    [sys.executable, "-m", modules[n.rstrip("0123456789")]],
                    cwd=ROOT, env=env[n], stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            for n in group:
                try:
                    await wait_serving(running.target(n), running.procs[n])
                except Exception as error:
                    raise RuntimeError(f"{n} did not start: {error}\n{running.log(n)}") from error
        async with grpc.aio.insecure_channel(running.target("gateway1")) as channel:
            admin = gw_grpc.GatewayServiceStub(channel)
            boot = (("x-api-key", BOOTSTRAP),)
            await admin.CreateTenant(gw.CreateTenantRequest(tenant_id=TENANT), metadata=boot)
            key = await admin.CreateApiKey(
                gw.CreateApiKeyRequest(
                    parent=f"tenants/{TENANT}",
                    scopes=["packs.read", "packs.write", "campaigns.read", "campaigns.write"],
                ),
                metadata=boot,
            )
            serving = await admin.CreateApiKey(
                gw.CreateApiKeyRequest(
                    parent="platform", scopes=["members.read", "models.train", "packs.read"]
                ),
                metadata=boot,
            )
        running.tenant_key, running.platform_key = key.secret, serving.secret
        yield running
    finally:
        for proc in running.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in running.procs.values():
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        drop_pg_database(database)
