"""Real processes on loopback: audience, retarget and gateway, exporting traces by OTLP to the test.

The test itself runs an OTLP/gRPC trace collector (``opentelemetry.proto`` TraceService), so the
services export exactly as in production (``OTEL_EXPORTER_OTLP_ENDPOINT``), with a short batch delay.
Data: a small world made by ``flashcrowd gen`` in a tmp store; retarget's ledger and the gateway's keys
in tmp SQLite files. Process logs are kept in tmp and printed when a process fails to start.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.fixtures.processes import wait_serving

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = "e2e-bootstrap-admin-key-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    attributes: dict


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver keeping every span in memory."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def Export(self, request, context):  # type: ignore[no-untyped-def]
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                    self.spans.append(
                        Span(
                            service,
                            span.name,
                            span.kind,
                            span.trace_id,
                            span.span_id,
                            span.parent_span_id,
                            attributes,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    def by_id(self) -> dict[bytes, Span]:
        return {span.span_id: span for span in self.spans}


SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT


@dataclass
class Processes:
    root: Path
    collector: Collector
    ports: dict[str, int]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    launch_trace: bytes | None = None

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]


def _env(root: Path, collector_port: int, **values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLASHCROWD_", "OTEL_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "FLASHCROWD_HOST": "127.0.0.1",
            "FLASHCROWD_GRACE_SECONDS": "1",
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    env.update(values)
    return env


@pytest.fixture(scope="module")
async def processes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Processes]:
    root = tmp_path_factory.mktemp("e2e")
    collector = Collector()
    collector_server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, collector_server)
    collector_port = collector_server.add_insecure_port("127.0.0.1:0")
    await collector_server.start()

    store = root / "store"
    subprocess.run(
        [sys.executable, "-m", "services.cli.main", "gen", "--users", "3000", "--days", "3", "--seed", "5",
         "--store", str(store), "--no-progress"],
        cwd=ROOT, check=True, capture_output=True, timeout=120,
    )  # fmt: skip

    ports = {name: free_port() for name in ("audience", "retarget", "gateway", "http")}
    env = {
        "audience": _env(
            root,
            collector_port,
            FLASHCROWD_PORT=str(ports["audience"]),
            FLASHCROWD_STORE_URL=str(store),
            FLASHCROWD_PERSONA_MIN_SIZE="50",
        ),
        "retarget": _env(
            root,
            collector_port,
            FLASHCROWD_PORT=str(ports["retarget"]),
            FLASHCROWD_DATABASE_URL=f"sqlite:///{root / 'retarget.db'}",
            FLASHCROWD_AUDIENCE_TARGET=f"127.0.0.1:{ports['audience']}",
        ),
        "gateway": _env(
            root,
            collector_port,
            FLASHCROWD_PORT=str(ports["gateway"]),
            FLASHCROWD_HTTP_PORT=str(ports["http"]),
            FLASHCROWD_AUDIENCE_TARGET=f"127.0.0.1:{ports['audience']}",
            FLASHCROWD_RETARGET_TARGET=f"127.0.0.1:{ports['retarget']}",
            FLASHCROWD_KEYSTORE_PATH=str(root / "keys.sqlite3"),
            FLASHCROWD_BOOTSTRAP_ADMIN_KEY=BOOTSTRAP,
        ),
    }
    running = Processes(root, collector, ports)
    try:
        for name in ("audience", "retarget", "gateway"):
            log = (root / f"{name}.log").open("wb")
            running.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"], cwd=ROOT, env=env[name], stdout=log, stderr=log
            )
        for name in ("audience", "retarget", "gateway"):
            try:
                await wait_serving(running.target(name), running.procs[name], 30, poll_seconds=0.1)
            except Exception as error:
                raise RuntimeError(f"{name} did not start: {error}\n{running.log(name)}") from error
        yield running
    finally:
        for proc in running.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for name, proc in running.procs.items():
            try:  # off the loop: the in-test collector must keep answering their final span flush
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode not in (0, -15):
                message = f"{name} did not stop cleanly on SIGTERM (exit {proc.returncode})"
                if name == "gateway":
                    raise AssertionError(f"{message}\n{running.log(name)}")
                warnings.warn(message, stacklevel=1)  # another service's shutdown: reported, not ours
        await collector_server.stop(None)
