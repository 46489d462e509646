"""Spans link across a real client/server hop; logs carry the trace id; OTEL_* variables are honoured."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.runtime import instrumented_channel, setup_telemetry
from services.runtime.logs import JsonFormatter

from .conftest import ProbeServer
from .probe import SERVICE

REPO = Path(__file__).resolve().parents[2]


async def _spans(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    # The server span ends just after the response is sent, so give it a moment to arrive.
    for _ in range(100):
        spans = [span for span in exporter.get_finished_spans() if span.name == name]
        if len(spans) >= count:
            return spans
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} spans named {name}, got {exporter.get_finished_spans()}")


async def test_client_and_server_spans_share_the_trace(
    probe_server: ProbeServer, span_exporter: InMemorySpanExporter
) -> None:
    span_exporter.clear()
    method = f"/{SERVICE}/Unary"
    async with instrumented_channel(probe_server.target) as channel:
        assert await channel.unary_unary(method)(b"ok") == b"ok:ok"
    spans = await _spans(span_exporter, method, 2)
    [client] = [s for s in spans if s.kind is trace.SpanKind.CLIENT]
    [server] = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    assert client.context is not None and server.context is not None and server.parent is not None
    assert server.context.trace_id == client.context.trace_id
    assert server.parent.span_id == client.context.span_id
    assert server.parent.is_remote


async def test_error_status_lands_on_server_span(
    probe_server: ProbeServer, span_exporter: InMemorySpanExporter
) -> None:
    span_exporter.clear()
    method = f"/{SERVICE}/Unary"
    async with instrumented_channel(probe_server.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(method)(b"not_found")
    spans = await _spans(span_exporter, method, 2)
    [server] = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]


async def test_health_checks_are_not_traced(
    probe_server: ProbeServer, span_exporter: InMemorySpanExporter
) -> None:
    span_exporter.clear()
    async with instrumented_channel(probe_server.target) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    await asyncio.sleep(0.05)
    kinds = [s.kind for s in span_exporter.get_finished_spans() if s.name.startswith("/grpc.health")]
    assert kinds == [trace.SpanKind.CLIENT]  # the caller's span only; probes do not flood the backend


def test_setup_is_idempotent(span_exporter: InMemorySpanExporter) -> None:
    first = setup_telemetry("runtime-tests")
    assert setup_telemetry("another-name", span_exporter=span_exporter) is first
    assert trace.get_tracer_provider() is first.tracer_provider


def test_json_logs_carry_trace_and_span_ids(span_exporter: InMemorySpanExporter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("runtime-tests"))
    log = logging.getLogger("tests.runtime.json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        log.warning("outside")
        with setup_telemetry("runtime-tests").tracer(__name__).start_as_current_span("work") as span:
            log.info("inside %s", "span", extra={"flashcrowd.pack.size": 42})
    finally:
        log.removeHandler(handler)
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "trace_id" not in outside and outside["level"] == "WARNING"
    context = span.get_span_context()
    assert inside["trace_id"] == trace.format_trace_id(context.trace_id)
    assert inside["span_id"] == trace.format_span_id(context.span_id)
    assert inside["message"] == "inside span"
    assert inside["service"] == "runtime-tests"
    assert inside["logger"] == "tests.runtime.json"
    assert inside["flashcrowd.pack.size"] == 42
    assert inside["timestamp"].endswith("+00:00")


_SCRIPT = """
from services.runtime import setup_telemetry
telemetry = setup_telemetry("from-code")
print("ENABLED", telemetry.enabled, telemetry.service_name, flush=True)
with telemetry.tracer("probe").start_as_current_span("hello"):
    pass
telemetry.shutdown()
"""


def _run_script(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env={**clean, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def test_otel_environment_variables_are_honoured() -> None:
    out = _run_script(
        OTEL_TRACES_EXPORTER="console",
        OTEL_METRICS_EXPORTER="none",
        OTEL_SERVICE_NAME="audience",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test,service.name=ignored",
    )
    first_line, _, exported = out.partition("\n")
    assert first_line == "ENABLED True audience"
    span = json.loads(exported)
    assert span["name"] == "hello"
    assert span["resource"]["attributes"]["service.name"] == "audience"
    assert span["resource"]["attributes"]["deployment.environment"] == "test"
    assert span["resource"]["attributes"]["service.namespace"] == "flashcrowd"


def test_sdk_disabled_and_default_export_nothing() -> None:
    assert (
        _run_script(OTEL_SDK_DISABLED="true", OTEL_TRACES_EXPORTER="console") == "ENABLED False from-code\n"
    )
    # no exporter configured and no endpoint: nothing printed, nothing dialled
    assert _run_script() == "ENABLED True from-code\n"
