"""Metrics per method and tenant, and HTTP spans joined to the caller's trace and the backend's."""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from flashcrowd.audience.v1 import audience_service_pb2 as pb
from flashcrowd.audience.v1 import audience_service_pb2_grpc as pb_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.gateway.metrics import METRIC_DURATION, METRIC_ERRORS, METRIC_REQUESTS, GatewayMetrics
from services.runtime import setup_telemetry


def points(reader: InMemoryMetricReader, name: str) -> list:
    data = reader.get_metrics_data()
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def test_metrics_per_method_and_tenant(fake_stack) -> None:
    stack, _ = fake_stack
    reader = InMemoryMetricReader()
    stack.app.gateway.metrics = GatewayMetrics(MeterProvider(metric_readers=[reader]))
    stub = pb_grpc.AudienceServiceStub(stack.channel)
    await stub.GetPack(pb.GetPackRequest(name="tenants/alpha/packs/p1"), metadata=stack.auth("alpha"))
    await stub.GetPack(pb.GetPackRequest(name="tenants/alpha/packs/p2"), metadata=stack.auth("alpha"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetPack(pb.GetPackRequest(name="tenants/alpha/packs/p1"), metadata=stack.auth("beta"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetPack(pb.GetPackRequest(name="tenants/alpha/packs/p1"))

    requests = {
        (
            p.attributes["flashcrowd.tenant"],
            p.attributes["rpc.method"],
            p.attributes["rpc.grpc.status_code"],
        ): p.value
        for p in points(reader, METRIC_REQUESTS)
    }
    assert requests == {("alpha", "GetPack", 0): 2, ("beta", "GetPack", 5): 1, ("", "GetPack", 16): 1}
    errors = {
        (p.attributes["flashcrowd.tenant"], p.attributes["rpc.grpc.status_code"])
        for p in points(reader, METRIC_ERRORS)
    }
    assert errors == {("beta", 5), ("", 16)}
    (alpha_latency,) = [
        p for p in points(reader, METRIC_DURATION) if p.attributes["flashcrowd.tenant"] == "alpha"
    ]
    assert alpha_latency.count == 2 and alpha_latency.sum > 0


async def test_http_span_joins_callers_trace_and_backend(fake_stack) -> None:
    exporter = InMemorySpanExporter()
    setup_telemetry("gateway-tests", span_exporter=exporter)
    stack, _ = fake_stack
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    caller_span = "00f067aa0ba902b7"
    async with (
        aiohttp.ClientSession(base_url=stack.http_url) as http,
        http.get(
            "/v1/tenants/alpha/packs/p1",
            headers={"X-Api-Key": stack.keys["alpha"], "traceparent": f"00-{trace_id}-{caller_span}-01"},
        ) as response,
    ):
        assert response.status == 200
    spans = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    by_id = {s.context.span_id: s for s in spans}
    (http_span,) = [s for s in spans if s.kind == SpanKind.SERVER and s.name.startswith("GET /v1/")]
    assert format(http_span.parent.span_id, "016x") == caller_span
    assert http_span.attributes["flashcrowd.tenant"] == "alpha"
    (client,) = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert client.parent.span_id == http_span.context.span_id
    (backend,) = [s for s in spans if s.kind == SpanKind.SERVER and s is not http_span]
    assert backend.parent.span_id == client.context.span_id and backend.name.endswith(
        "AudienceService/GetPack"
    )
    assert set(by_id) == {http_span.context.span_id, client.context.span_id, backend.context.span_id}
